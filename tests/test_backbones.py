"""Every supported family: truncated passes equal the model's own pass at every layer, layers past the exit never
run, a batch with mixed exits answers exactly as one row at a time, and the head at full depth equals the model's
own logits."""

from __future__ import annotations

import threading

import pytest
import torch

from raee.backbones import mean_pool
from raee.backbones.base import MAX_CHARS_PER_TOKEN, PREFIX_CHARS_PER_TOKEN
from raee.build import readable_examples
from raee.data import Example
from raee.errors import InputError
from raee.tasks import BUILTIN_TASKS
from tests.tiny import synthetic_texts, tiny_backbone

TASK = BUILTIN_TASKS["sst2"]
TEXTS = [t for t, _ in synthetic_texts(6, seed=3)]


def prompts(backbone, texts=TEXTS):
    return TASK.prompting(backbone.kind, backbone.mask_token).prompts(texts)


def head(backbone):
    return backbone.head(TASK.prompting(backbone.kind, backbone.mask_token).head)


def model_inputs(backbone, texts=TEXTS):
    """The padded batch, tokenized by the tokenizer itself (not by the backbone)."""
    enc = backbone.tokenizer(prompts(backbone, texts), padding=True, return_tensors="pt",
                             add_special_tokens=backbone.add_special_tokens)
    return enc["input_ids"], enc["attention_mask"]


def own_hidden_states(backbone, texts=TEXTS):
    """The model's own forward with output_hidden_states, aligned with raee's layers: the slow obvious reference.
    For an encoder-decoder: the encoder's states, then the decoder's states at the first step."""
    input_ids, mask = model_inputs(backbone, texts)
    with torch.no_grad():
        if backbone.kind == "encoder-decoder":
            start = torch.zeros((len(texts), 1), dtype=torch.long)
            out = backbone.model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start,
                                 output_hidden_states=True)
            return [*out.encoder_hidden_states, *out.decoder_hidden_states[1:]], mask
        return backbone.base(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states, mask


def test_truncated_state_equals_the_models_own_hidden_state_at_every_layer(backbone):
    reference, mask = own_hidden_states(backbone)
    fwd = backbone.start(prompts(backbone))
    for layer in range(backbone.num_layers + 1):
        ours = fwd.hidden
        with torch.inference_mode():
            if backbone.kind == "encoder-decoder" and layer in (backbone.num_encoder_layers, backbone.num_layers):
                stack = backbone.model.encoder if layer == backbone.num_encoder_layers else backbone.model.decoder
                ours = stack.final_layer_norm(ours)  # the model reports each stack's output normed
            elif layer == backbone.num_layers:
                ours = backbone.family.finalize(ours)  # a decoder reports its last state after its final norm
        real = mask.bool() if ours.shape[1] == mask.shape[1] else torch.ones(ours.shape[:2], dtype=torch.bool)
        torch.testing.assert_close(ours[real], reference[layer][real], atol=1e-5, rtol=1e-4)
        if layer < backbone.num_layers:
            fwd.advance()


class LayerCallCounter:
    """Counts, per layer, how many rows each call of the layer carried."""

    def __init__(self, layers):
        self.rows = [0] * len(layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i):
        def hook(_module, args, _output):
            self.rows[i] += args[0].shape[0]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("exit_layer", [0, 1, 2, "last"])
def test_layers_past_the_exit_never_run(backbone, exit_layer):
    exit_layer = backbone.num_layers if exit_layer == "last" else exit_layer
    the_head = head(backbone)  # made before counting: a sentence encoder runs its verbalizations once, cached
    counter = LayerCallCounter(backbone.layers)
    try:
        backbone.finish(backbone.start(prompts(backbone)), torch.full((len(TEXTS),), exit_layer), the_head)
    finally:
        counter.remove()
    assert counter.rows == [len(TEXTS) if i < exit_layer else 0 for i in range(backbone.num_layers)]


def test_rows_leave_the_batch_at_their_own_exit(backbone):
    last = backbone.num_layers
    exits = torch.tensor([0, last, 1, 2, 1, last])
    the_head = head(backbone)
    counter = LayerCallCounter(backbone.layers)
    try:
        backbone.finish(backbone.start(prompts(backbone)), exits, the_head)
    finally:
        counter.remove()
    # layer i (1-based i+1) runs exactly the rows whose exit is past it
    assert counter.rows == [int((exits > i).sum()) for i in range(backbone.num_layers)]


def test_mixed_exit_batch_answers_as_one_row_at_a_time(backbone):
    last = backbone.num_layers
    exits = torch.tensor([2, 0, last, 1, last - 1, 2])
    batched = backbone.finish(backbone.start(prompts(backbone)), exits, head(backbone))
    for i, text in enumerate(TEXTS):
        alone = backbone.finish(backbone.start(prompts(backbone, [text])), exits[i:i + 1], head(backbone))
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-4)
        assert int(batched[i].argmax()) == int(alone[0].argmax())


def test_all_layers_agrees_with_truncated_passes(backbone):
    every = backbone.all_layers(prompts(backbone), head(backbone), pooled_layers=(1,))
    assert every.label_logits.shape == (len(TEXTS), backbone.num_layers + 1, 2)
    for layer in range(backbone.num_layers + 1):
        truncated = backbone.finish(backbone.start(prompts(backbone)), torch.full((len(TEXTS),), layer),
                                    head(backbone))
        torch.testing.assert_close(torch.from_numpy(every.label_logits[:, layer]), truncated, atol=1e-5, rtol=1e-4)
    fwd = backbone.start(prompts(backbone))
    fwd.advance()
    torch.testing.assert_close(torch.from_numpy(every.pooled[1]), mean_pool(fwd.hidden, fwd.attention_mask))


def test_rows_of_keeps_the_rows_asked_for_and_refuses_a_mask_of_another_batch():
    from raee.backbones.layerwise import rows_of

    states = torch.arange(12.0).view(4, 3)
    assert rows_of(states, torch.ones(4, dtype=torch.bool)) is states  # every row: no copy
    assert rows_of(states, torch.tensor([3, 1])).tolist() == [states[3].tolist(), states[1].tolist()]
    for wrong in (torch.ones(3, dtype=torch.bool), torch.ones(0, dtype=torch.bool)):
        with pytest.raises(IndexError):
            rows_of(states, wrong)


def test_tokenize_gives_the_tokenizers_own_ids(backbone):
    """Backbone.tokenize may call the Rust encoder directly; the ids are the tokenizer's own call's, whatever the
    text holds (special tokens, unknown words, accents, emoji, runs of spaces)."""
    tok = backbone.tokenizer
    texts = [*TEXTS, "naïve  café\tand 🙂 東京", "x" * 50, f"{tok.unk_token} word {tok.pad_token}", "GOOD Film!!"]
    if backbone.mask_token is None:
        texts.append(f"{tok.eos_token or ''} and more")
    batch = prompts(backbone, texts)
    assert backbone.tokenize(batch) == tok(batch, add_special_tokens=backbone.add_special_tokens)["input_ids"]


def test_the_direct_encoder_is_used_only_for_the_librarys_plain_fast_tokenizer():
    from raee.backbones.base import direct_encoder
    from tests.tiny import make_tokenizer

    plain = make_tokenizer()
    assert direct_encoder(plain, True) is not None
    custom = make_tokenizer()

    class OwnCallPath(type(custom)):  # a tokenizer class that changes how a call tokenizes
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    custom.__class__ = OwnCallPath
    assert direct_encoder(custom, True) is None
    slow = make_tokenizer()
    slow.__class__ = type("Slow", (type(slow),), {"is_fast": property(lambda self: False)})
    assert direct_encoder(slow, True) is None


def test_a_head_read_of_some_rows_by_mask_or_index_equals_the_read_of_all_rows(backbone):
    """label_logits takes rows as a bool mask or as indices; every form reads the same rows' logits."""
    fwd = backbone.start(prompts(backbone))
    fwd.advance()
    every = backbone.label_logits(fwd, torch.ones(len(TEXTS), dtype=torch.bool), head(backbone))
    last = len(TEXTS) - 1
    mask = torch.zeros(len(TEXTS), dtype=torch.bool)
    mask[[1, last]] = True
    for rows in (mask, torch.tensor([1, last]), torch.arange(len(TEXTS))):
        expected = every[rows]
        torch.testing.assert_close(backbone.label_logits(fwd, rows, head(backbone)), expected, atol=1e-5, rtol=1e-4)


def test_label_logits_at_the_last_layer_equal_the_models_own_logits(backbone):
    """The head reading (label-word rows only) against the model's full forward and full-vocabulary logits (for
    Gemma-2, soft-capped; for T5, rescaled and read at the decoder's first step)."""
    if backbone.kind == "sentence-encoder":
        pytest.skip("a sentence encoder has no LM head; its pooling is checked against sentence-transformers")
    input_ids, mask = model_inputs(backbone)
    call = {"input_ids": input_ids, "attention_mask": mask}
    if backbone.kind == "encoder-decoder":
        call["decoder_input_ids"] = torch.zeros((len(TEXTS), 1), dtype=torch.long)
    with torch.no_grad():
        logits = backbone.model(**call).logits  # (B, T, V)
    if backbone.kind == "masked-lm":
        positions = (input_ids == backbone.tokenizer.mask_token_id).int().argmax(dim=1)
    elif backbone.kind == "causal-lm":
        positions = mask.sum(dim=1) - 1
    else:
        positions = torch.zeros(len(TEXTS), dtype=torch.long)
    the_head = head(backbone)
    expected = logits[torch.arange(len(TEXTS)), positions][:, the_head.ids]
    ours = backbone.finish(backbone.start(prompts(backbone)), torch.full((len(TEXTS),), backbone.num_layers),
                           the_head)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_vocabulary_top2_at_every_layer(backbone):
    every = backbone.all_layers(prompts(backbone), head(backbone), with_vocab_top2=True)
    if backbone.kind == "sentence-encoder":
        assert every.vocab_top2 is None
        return
    assert every.vocab_top2.shape == (len(TEXTS), backbone.num_layers + 1, 2)
    assert (every.vocab_top2[..., 0] >= every.vocab_top2[..., 1]).all() and (every.vocab_top2 <= 1).all()


def test_masked_lm_reads_the_mask_position():
    backbone = tiny_backbone("bert-mlm")
    fwd = backbone.start(prompts(backbone, ["good film"]))
    ids = backbone.tokenizer(prompts(backbone, ["good film"])[0])["input_ids"]
    assert int(fwd.answer_positions[0]) == ids.index(backbone.tokenizer.mask_token_id)


@pytest.mark.parametrize("texts, message", [([], "no texts"), (["good", "  "], "text 1 is empty"),
                                            (["good " * 3000], "characters")])
def test_bad_texts_are_refused_with_a_reason(encoder_backbone, texts, message):
    with pytest.raises(InputError, match=message):
        encoder_backbone.check_texts(texts)


def test_over_long_prompts_are_refused_with_a_reason(encoder_backbone):
    with pytest.raises(InputError, match="text 1 is .* tokens"):
        encoder_backbone.start(["good", "good " * 100])


def words(n: int) -> str:
    """n words the tiny word-level tokenizer reads as one token each ([CLS] and [SEP] make n + 2)."""
    return " ".join(["good"] * n)


def test_length_limits_on_both_sides_of_each_bound(encoder_backbone):
    """The one home of the length rule: the character guard at max_tokens * MAX_CHARS_PER_TOKEN characters, the
    token limit at max_tokens (the tiny tokenizer's 64, [CLS] and [SEP] included)."""
    b = encoder_backbone
    assert b.max_tokens == 64 and b.max_chars == 64 * MAX_CHARS_PER_TOKEN
    assert not b.refuses_unread("x" * b.max_chars) and b.refuses_unread("x" * (b.max_chars + 1))
    assert b.reads_whole(64) and not b.reads_whole(65)
    assert b.check_prompts([words(62)]) and b.token_counts([words(62)]) == [64]
    with pytest.raises(InputError, match="text 1 is 65 tokens with its prompt; this backbone reads at most 64"):
        b.check_prompts(["good", words(63)])
    with pytest.raises(InputError, match=f"text 0 has {b.max_chars + 1} characters"):
        b.check_texts(["x" * (b.max_chars + 1)])


def test_a_long_text_has_a_prefix_checked_first_that_ends_at_a_space(encoder_backbone):
    reach = encoder_backbone.max_tokens * PREFIX_CHARS_PER_TOKEN  # 384 characters
    assert len(words(77)) == reach and encoder_backbone.prefix_to_check(words(77)) is None  # tokenized whole
    assert encoder_backbone.prefix_to_check(words(77) + "s") == words(76)  # one character past the reach
    text = "good " * 100  # spaces at 5k + 4: the last one before 384 is at 379
    assert encoder_backbone.prefix_to_check(text) == text[:379] == words(76)
    assert encoder_backbone.prefix_to_check("x" * 500) is None  # no space to cut at: the whole text is tokenized


def test_build_and_evaluation_skip_exactly_the_items_the_engine_refuses(encoder_backbone, caplog):
    b = encoder_backbone
    items = [Example("good film", 1, 1), Example(words(62), 1, 2), Example(words(63), 1, 3),
             Example("x" * (b.max_chars + 1), 0, 4), Example("bad plot", 0, 5)]
    kept, tokens = readable_examples(b, TASK, items)
    assert [e.line for e in kept] == [1, 2, 5] and tokens == [4, 64, 4]
    assert "skipping 2 items longer than 64 tokens (lines 3, 4)" in caplog.text


def test_exit_layers_out_of_range_are_refused(encoder_backbone):
    fwd = encoder_backbone.start(["good film", "bad plot"])
    with pytest.raises(InputError):
        encoder_backbone.finish(fwd, torch.tensor([1, 9]), head(encoder_backbone))
    with pytest.raises(InputError):
        encoder_backbone.finish(fwd, torch.tensor([1]), head(encoder_backbone))


@pytest.mark.slow
def test_one_backbone_is_safe_to_share_between_threads():
    """A server validates requests (token counts) in RPC threads while its batcher tokenizes padded batches, with
    no lock between them: every tokenizer call uses the same settings, so none changes shared state."""
    backbone = tiny_backbone("bert-encoder")
    texts = [t for t, _ in synthetic_texts(40, seed=5)]
    expected = backbone.all_layers(texts[:5], head(backbone)).label_logits
    errors = []

    def hammer(i):
        try:
            for j in range(150):
                if (i + j) % 2:
                    backbone.token_counts(texts[j % 40:j % 40 + 3])
                else:
                    got = backbone.all_layers(texts[:5], head(backbone)).label_logits
                    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
