"""Cutting texts to the backbone's token limit (raee.truncation) and classifying with truncate: the cut fits, is the
longest word prefix that fits, reads a bounded prefix of a huge text, and the answer is the cut text's."""

from __future__ import annotations

import random
import re

import pytest
import transformers as tf
from tokenizers import models, pre_tokenizers

from raee.backbones import MaskedLMBackbone
from raee.engine import Engine
from raee.errors import InputError
from raee.store import load_store
from raee.tasks import BUILTIN_TASKS, Prompting
from raee.truncation import fit_text, fit_texts, last_fitting
from tests.tiny import CONTENT_WORDS, SPECIALS, bert_style_tokenizer, tiny_backbone, tiny_model

TASK = BUILTIN_TASKS["sst2"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
PIECES = SPECIALS + list(LETTERS) + [f"##{c}" for c in LETTERS] + [".", "?", "'", ",", ":", "!"]
PROMPTINGS = {  # the text first, last and in the middle of its prompt
    "text first": TASK.prompting("masked-lm", "[MASK]"),
    "text last": BUILTIN_TASKS["trec"].prompting("masked-lm", "[MASK]"),
    "text inside": TASK.prompting("causal-lm"),
}


def letter_tokenizer(slow_dir=None):
    """A WordPiece tokenizer whose pieces are single letters: a word is as many tokens as letters, so cuts can
    fall inside words. With slow_dir, the pure-Python BertTokenizer over the same pieces (no offsets)."""
    if slow_dir is not None:
        vocab = slow_dir / "vocab.txt"
        vocab.write_text("\n".join(PIECES) + "\n")
        return tf.BertTokenizer(str(vocab), do_lower_case=True)
    return bert_style_tokenizer(models.WordPiece({p: i for i, p in enumerate(PIECES)}, unk_token="[UNK]"),
                                pre_tokenizers.BertPreTokenizer(), model_max_length=128)


@pytest.fixture(scope="module", params=["words", "letters", "letters, slow"])
def backbone(request, tmp_path_factory):
    if request.param == "words":
        return tiny_backbone("bert-mlm")
    tokenizer = letter_tokenizer(tmp_path_factory.mktemp("vocab") if request.param.endswith("slow") else None)
    return MaskedLMBackbone(tiny_model("bert-mlm"), tokenizer, source="tiny letters", max_tokens=128, verify=False)


def tokens(backbone, prompting: Prompting, text: str) -> int:
    return backbone.token_counts(prompting.prompts([text]))[0]


def random_text(rng: random.Random, words: int) -> str:
    """Words of the tiny vocabulary and made-up ones, some long, between spaces, newlines and punctuation."""
    parts = []
    for _ in range(words):
        word = rng.choice(CONTENT_WORDS) if rng.random() < 0.7 else "".join(
            rng.choice(LETTERS) for _ in range(rng.randint(1, 14)))
        parts.append(word + rng.choice(["", "", ",", "!", "."]) + rng.choice([" ", " ", "  ", "\n", " \t"]))
    return "".join(parts).rstrip()


@pytest.mark.parametrize("where", PROMPTINGS)
def test_the_cut_is_the_longest_word_prefix_whose_prompt_fits(backbone, where):
    prompting, limit = PROMPTINGS[where], backbone.max_tokens
    rng = random.Random(0)
    for words in [5, 20, 40, 55, 60, 70, 90, 150, 400]:
        text = random_text(rng, words)
        cut = fit_text(backbone, prompting, text)
        if tokens(backbone, prompting, text) <= limit:
            assert cut == text
            continue
        ends = [m.end() for m in re.finditer(r"\S+", text)]
        assert text.startswith(cut) and len(cut) in ends  # a prefix, ending where a word ends
        assert tokens(backbone, prompting, cut) <= limit
        assert tokens(backbone, prompting, text[:ends[ends.index(len(cut)) + 1]]) > limit  # the next word is over


def test_a_first_word_too_long_for_the_limit_is_cut_inside_it(backbone):
    if backbone.source != "tiny letters":
        pytest.skip("a word of the word-level tokenizer is one token")
    prompting = PROMPTINGS["text inside"]
    text = "  " + "".join(LETTERS[i % 26] for i in range(90)) + " good film"  # 90 letters: 90 tokens
    cut = fit_text(backbone, prompting, text)
    assert text.startswith(cut) and len(cut) > 2
    assert tokens(backbone, prompting, cut) <= backbone.max_tokens < tokens(backbone, prompting, text[:len(cut) + 1])


def test_texts_that_fit_are_left_alone_and_the_cut_ones_named(backbone):
    prompting = PROMPTINGS["text first"]
    texts = ["good film", "good film " * 200, "bad plot"]
    fitted, cut = fit_texts(backbone, prompting, texts)
    assert cut == [False, True, False] and fitted[0] == texts[0] and fitted[2] == texts[2]
    assert fitted[1] == fit_text(backbone, prompting, texts[1])


class CountingTokenizer:
    """Stands in for a backbone's tokenizer and records how many characters each call is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, texts, *args, **kwargs):
        self.calls.append(sum(map(len, [texts] if isinstance(texts, str) else texts)))
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("text", ["good film " * 200_000, "x" * 2_000_000, "good" + " " * 2_000_000 + "film"],
                         ids=["words", "one unknown word", "whitespace"])
def test_a_huge_text_is_cut_reading_a_bounded_prefix(backbone, monkeypatch, text):
    prompting = PROMPTINGS["text first"]
    counting = CountingTokenizer(backbone.tokenizer)
    monkeypatch.setattr(backbone, "tokenizer", counting)
    cut = fit_text(backbone, prompting, text)
    assert max(counting.calls) <= backbone.max_chars + len(prompting.template)
    if backbone.tokenizer.is_fast:  # the offsets point at the cut: the window, then two checks
        assert len(counting.calls) <= 4
    assert sum(counting.calls) <= 20 * backbone.max_chars <= len(text) / 20  # a few windows, not the text
    assert text.startswith(cut) and tokens(backbone, prompting, cut) <= backbone.max_tokens
    assert cut == fit_text(backbone, prompting, text[:backbone.max_chars + 1])  # as if it had been cut unread


def test_a_prompt_without_room_for_text_cannot_be_cut(backbone):
    prompting = Prompting("good " * 200 + "{x}", PROMPTINGS["text first"].head)
    with pytest.raises(InputError, match="text 0 cannot be cut to fit"):
        fit_texts(backbone, prompting, ["good", "film"])


def test_the_search_finds_the_last_fitting_cut_whatever_the_guess():
    rng = random.Random(1)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, 500), rng.randint(0, 30)))
        limit = rng.randint(0, 520)
        asked = []
        found = last_fitting(cuts, lambda c: asked.append(c) or c <= limit, rng.choice([None, *range(-5, 520)]))
        expected = max((c for c in cuts if c <= limit), default=None)  # the slow obvious way
        assert found == expected
        assert len(asked) <= 2 + max(len(cuts), 1).bit_length()


# -- the engine -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(stores):
    return Engine(load_store(stores["current"]), stores["backbone"])


LONG = "good film with a dull plot " * 30  # 180 words: far past the tiny model's 64 tokens
HUGE = "good film " * 1000  # past the character guard too (max_chars 2048)


@pytest.mark.parametrize("policy", ["raee", "full", "static:1"])
def test_the_engine_answers_an_over_long_text_as_its_cut(engine, policy):
    with pytest.raises(InputError, match="tokens"):
        engine.classify([LONG], policy=policy)
    results = engine.classify(["awful plot", LONG, HUGE], policy=policy, truncate=True)
    cuts = [fit_text(engine.backbone, engine.prompting, text) for text in (LONG, HUGE)]
    expected = engine.classify(["awful plot", *cuts], policy=policy)
    assert [r.truncated for r in results] == [False, True, True] and not any(r.truncated for r in expected)
    for r, e in zip(results, expected):
        assert (r.label, r.exit_layer, r.layers_run) == (e.label, e.exit_layer, e.layers_run)
        assert r.scores == pytest.approx(e.scores, abs=1e-6)


def test_truncate_changes_nothing_for_texts_that_fit(engine):
    texts = ["good film", "awful dull plot", "a lovely story"]
    plain, truncated = engine.classify(texts, policy="raee"), engine.classify(texts, policy="raee", truncate=True)
    assert [(r.label, r.exit_layer, r.scores, r.truncated) for r in truncated] == \
        [(r.label, r.exit_layer, r.scores, False) for r in plain]
    with pytest.raises(InputError, match="text 1 is empty"):
        engine.classify(["good", " "], truncate=True)  # truncate cuts; it does not admit empty texts
