"""Every backbone kind: truncated passes equal the full pass, layers past the exit never run, and a batch with mixed
exits answers exactly as one row at a time."""

from __future__ import annotations

import pytest
import torch

from raee.backbones import mean_pool
from raee.errors import InputError
from raee.tasks import BUILTIN_TASKS
from tests.conftest import synthetic_texts

TASK = BUILTIN_TASKS["sst2"]
TEXTS = [t for t, _ in synthetic_texts(6, seed=3)]


def full_pass_hidden_states(backbone, texts):
    """The model's own forward with output_hidden_states: the slow obvious reference."""
    enc = backbone.tokenizer([backbone.prompt(t, TASK) for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = backbone.base(**enc, output_hidden_states=True)
    return out.hidden_states, enc["attention_mask"]


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_truncated_pass_equals_full_pass_hidden_state(backbone, layer):
    reference, mask = full_pass_hidden_states(backbone, TEXTS)
    fwd = backbone.start(TEXTS, TASK)
    for _ in range(layer):
        fwd.advance()
    ours = fwd.hidden
    if layer == backbone.num_layers and backbone.kind == "causal-lm":
        with torch.inference_mode():
            ours = backbone.final_norm(ours)  # the model reports its last state after the final norm
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[layer][real], atol=1e-5, rtol=1e-4)


class LayerCallCounter:
    """Counts, per layer, how many rows each call of the layer carried. Warms the backbone first: the
    sentence-encoder kind runs its label verbalizations once, on first use, and caches them."""

    def __init__(self, layers, backbone=None):
        if backbone is not None:
            backbone.finish(backbone.start(TEXTS[:1], TASK), torch.tensor([0]), TASK)
        self.rows = [0] * len(layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i):
        def hook(_module, args, _output):
            hidden = args[0] if args else None
            self.rows[i] += hidden.shape[0] if hidden is not None else 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("exit_layer", [0, 1, 2])
def test_layers_past_the_exit_never_run(backbone, exit_layer):
    counter = LayerCallCounter(backbone.layers, backbone)
    try:
        fwd = backbone.start(TEXTS, TASK)
        backbone.finish(fwd, torch.full((len(TEXTS),), exit_layer), TASK)
    finally:
        counter.remove()
    assert counter.rows == [len(TEXTS) if i < exit_layer else 0 for i in range(backbone.num_layers)]


def test_rows_leave_the_batch_at_their_own_exit(backbone):
    exits = torch.tensor([0, 3, 1, 2, 1, 3])
    counter = LayerCallCounter(backbone.layers, backbone)
    try:
        backbone.finish(backbone.start(TEXTS, TASK), exits, TASK)
    finally:
        counter.remove()
    # layer i (1-based i+1) runs exactly the rows whose exit is past it
    assert counter.rows == [int((exits > i).sum()) for i in range(backbone.num_layers)]


def test_mixed_exit_batch_answers_as_one_row_at_a_time(backbone):
    exits = torch.tensor([2, 0, 3, 1, 3, 2])
    batched = backbone.finish(backbone.start(TEXTS, TASK), exits, TASK)
    for i, text in enumerate(TEXTS):
        alone = backbone.finish(backbone.start([text], TASK), exits[i:i + 1], TASK)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-4)
        assert int(batched[i].argmax()) == int(alone[0].argmax())


def test_all_layers_agrees_with_truncated_passes(backbone):
    every = backbone.all_layers(TEXTS, TASK, pooled_layers=(1,))
    assert every.label_logits.shape == (len(TEXTS), backbone.num_layers + 1, 2)
    for layer in range(backbone.num_layers + 1):
        truncated = backbone.finish(backbone.start(TEXTS, TASK), torch.full((len(TEXTS),), layer), TASK)
        torch.testing.assert_close(torch.from_numpy(every.label_logits[:, layer]), truncated, atol=1e-5, rtol=1e-4)
    fwd = backbone.start(TEXTS, TASK)
    fwd.advance()
    torch.testing.assert_close(torch.from_numpy(every.pooled[1]), mean_pool(fwd.hidden, fwd.attention_mask))


def test_masked_lm_reads_the_mask_position():
    from tests.conftest import tiny_backbone
    backbone = tiny_backbone("bert-mlm")
    fwd = backbone.start(["good film"], TASK)
    ids = backbone.tokenizer(backbone.prompt("good film", TASK))["input_ids"]
    assert int(fwd.answer_positions[0]) == ids.index(backbone.tokenizer.mask_token_id)


def test_causal_prompt_ends_on_a_word_not_a_space():
    from tests.conftest import tiny_backbone
    backbone = tiny_backbone("llama")
    assert backbone.prompt("good film", TASK).endswith("The answer is")


@pytest.mark.parametrize("texts, message", [([], "no texts"), (["good", "  "], "text 1 is empty"),
                                            (["good " * 100], "tokens")])
def test_bad_texts_are_refused_with_a_reason(encoder_backbone, texts, message):
    with pytest.raises(InputError, match=message):
        encoder_backbone.start(texts, TASK)


def test_exit_layers_out_of_range_are_refused(encoder_backbone):
    fwd = encoder_backbone.start(TEXTS[:2], TASK)
    with pytest.raises(InputError):
        encoder_backbone.finish(fwd, torch.tensor([1, 9]), TASK)
    with pytest.raises(InputError):
        encoder_backbone.finish(fwd, torch.tensor([1]), TASK)


def test_one_backbone_is_safe_to_share_between_threads():
    """A server validates requests (token counts) in RPC threads while its batcher tokenizes padded batches; the
    fast tokenizer's shared padding state once made such batches fail to pad."""
    import threading
    from tests.conftest import tiny_backbone
    backbone = tiny_backbone("bert-encoder")
    texts = [t for t, _ in synthetic_texts(40, seed=5)]
    errors = []

    def hammer(i):
        try:
            for j in range(150):
                if (i + j) % 2:
                    backbone.token_counts(texts[j % 40:j % 40 + 3], TASK)
                else:
                    backbone.start(texts[j % 40:j % 40 + 5], TASK)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_label_logits_at_the_last_layer_equal_the_models_own_logits(backbone):
    """The head reading (label-word rows only) against the model's full forward and full vocabulary logits."""
    if backbone.kind == "sentence-encoder":
        pytest.skip("a sentence encoder has no LM head")
    enc = backbone.tokenizer([backbone.prompt(t, TASK) for t in TEXTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = backbone.model(**enc).logits  # (B, T, V)
    if backbone.kind == "masked-lm":
        positions = (enc["input_ids"] == backbone.tokenizer.mask_token_id).int().argmax(dim=1)
    else:
        positions = enc["attention_mask"].sum(dim=1) - 1
    expected = logits[torch.arange(len(TEXTS)), positions][:, backbone.label_ids(TASK)]
    ours = backbone.finish(backbone.start(TEXTS, TASK), torch.full((len(TEXTS),), backbone.num_layers), TASK)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
