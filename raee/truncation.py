"""Cutting texts to the backbone's token limit: what a caller may ask for instead of having them refused.

The text is cut, never its prompt: the task's template and the tokenizer's special tokens stay whole. The rule:
a text whose prompt fits is left alone; otherwise it keeps its longest prefix that ends where a word ends (at
whitespace, or at the text's end) and whose prompt tokenizes to at most max_tokens, so that adding the next word
would not fit. A text whose first word alone does not fit is cut inside that word, at the longest prefix that fits.
"Longest" takes token counts to grow with the prefix, as they do for every tokenizer at whitespace; where one
does not, the cut still fits.

The cost is bounded whatever the text's length: only a window of its first characters is ever tokenized, first
max_tokens * PREFIX_CHARS_PER_TOKEN characters (which holds the cut for ordinary text), then max_chars (the
character guard: no tokenizer fits more characters into max_tokens tokens). A text whose first max_chars
characters all fit (mostly whitespace, or runs the tokenizer folds into one unknown token) is cut there. The
window's token offsets point at the cut, so it usually costs the window's tokenizing and two short ones to
confirm; a tokenizer without offsets (a slow one) is searched by halving.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence

from raee.backbones.base import PREFIX_CHARS_PER_TOKEN, Backbone
from raee.errors import InputError
from raee.tasks import Prompting


def fit_texts(backbone: Backbone, prompting: Prompting, texts: Sequence[str]) -> tuple[list[str], list[bool]]:
    """Each text as `prompting`'s prompt for `backbone` lets it be read (cut by the rule above), and whether it
    was cut. InputError names a text that cannot be cut to fit (the prompt alone leaves it no room)."""
    fitted = [fit_text(backbone, prompting, text, i) for i, text in enumerate(texts)]
    return fitted, [cut != text for cut, text in zip(fitted, texts)]


def fit_text(backbone: Backbone, prompting: Prompting, text: str, index: int = 0) -> str:
    """`text` itself if its prompt fits, else its prefix by the rule above. index: the text's, for the error."""
    limit = backbone.max_tokens

    def fits(end: int) -> bool:
        return backbone.token_counts(prompting.prompts([text[:end]]))[0] <= limit

    for window in (limit * PREFIX_CHARS_PER_TOKEN, backbone.max_chars):
        piece = text[:window]
        prompt = prompting.prompts([piece])[0]
        spans = backbone.token_spans(prompt)
        count = len(spans) if spans is not None else backbone.token_counts([prompt])[0]
        if count > limit:
            guess = _token_cut(spans, prompting.template.index("{x}"), len(piece), limit)
            return _cut(text, len(piece), fits, guess, index, limit)
        if len(piece) == len(text):
            return text
    ends = word_ends(text, len(piece))  # the first max_chars characters fit: cut there, at a word's end if any
    return text[:ends[-1]] if ends else piece


def word_ends(text: str, within: int) -> list[int]:
    """Positions (ascending, at most `within`) where a word of `text` ends: its last character is not whitespace
    and the next one is, or the text ends there. Reads only the first within + 1 characters."""
    ends = [m.end() for m in re.finditer(r"\S+", text[:within])]
    if ends and ends[-1] == within < len(text) and not text[within].isspace():
        ends.pop()  # the window ends inside this word
    return ends


def _cut(text: str, within: int, fits: Callable[[int], bool], guess: int | None, index: int, limit: int) -> str:
    """The longest prefix of text[:within] (whose prompt does not fit) that fits, at a word's end if one does."""
    ends = word_ends(text, within)
    end = last_fitting(ends, fits, guess)
    if end is None:  # the first word alone is too long: cut inside it
        first = ends[0] if ends else within
        start = len(text[:first]) - len(text[:first].lstrip())
        end = last_fitting(range(start + 1, first), fits, guess)
    if end is None:
        raise InputError(f"text {index} cannot be cut to fit: its prompt is over {limit} tokens with only the "
                         "first character of the text; this backbone reads at most that")
    return text[:end]


def last_fitting(cuts: Sequence[int], fits: Callable[[int], bool], guess: int | None = None) -> int | None:
    """The last of the ascending cut points `cuts` whose prefix fits, taking `fits` to hold up to some point and not
    after it; None if none does. The cut at or before `guess` and the one after it are tried first, then halving."""
    fitting, over = -1, len(cuts)  # cuts[fitting] fits (-1: none known to); cuts[over] does not (or is past the end)
    if guess is not None:
        at = bisect.bisect_right(cuts, guess) - 1
        for i in (at, at + 1):
            if not fitting < i < over:
                continue
            if fits(cuts[i]):
                fitting = i
            else:
                over = i
                break
    while over - fitting > 1:
        middle = (fitting + over) // 2
        if fits(cuts[middle]):
            fitting = middle
        else:
            over = middle
    return cuts[fitting] if fitting >= 0 else None


def _token_cut(spans: list[tuple[int, int]] | None, start: int, length: int, limit: int) -> int | None:
    """Where the tokens of a prompt (their character spans) that leave room for the template's and the special
    tokens end inside the text (at `start`, `length` characters long): the first guess at the cut. None without
    spans."""
    if spans is None:
        return None
    inside = [min(end, start + length) - start for first, end in spans
              if end > first and start <= first < start + length]
    room = limit - (len(spans) - len(inside))
    if room <= 0:
        return 0
    return inside[room - 1] if room <= len(inside) else None
