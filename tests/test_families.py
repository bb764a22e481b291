"""Family adapters and the load-time self-check: every family gets its own adapter, a broken adapter is refused,
the generic path is refused exactly where a family passes something between layers, unknown families load only
when the generic path is exact, and a passing verdict is cached by weight fingerprint."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from raee.backbones import BACKBONE_CLASSES, FAMILIES, Family, load_backbone, selfcheck
from raee.backbones.families.gemma2 import Gemma2
from raee.backbones.family import LayerTypedMasks
from raee.errors import BackboneError
from raee.tasks import BUILTIN_TASKS
from tests.tiny import FAMILIES as TINY
from tests.tiny import KIND_OF, VOCAB, family_params, make_tokenizer, save_checkpoint, tiny_backbone, tiny_model

TASK = BUILTIN_TASKS["sst2"]
EXPECTED_ADAPTER = {name: name.removesuffix("-mlm").removesuffix("-encoder") for name in TINY}


@pytest.mark.parametrize("name", family_params(TINY))
def test_every_family_is_driven_by_its_own_adapter(name):
    backbone = tiny_backbone(name)
    assert backbone.family.name == EXPECTED_ADAPTER[name] and backbone.identity()["family"] == EXPECTED_ADAPTER[name]
    assert set(EXPECTED_ADAPTER.values()) <= set(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_the_self_check_refuses_a_deliberately_broken_adapter(name):
    """An adapter that runs layers 2 and 3 in each other's place: refused, naming the family and the layer."""
    model = tiny_model(name)
    adapter = type(tiny_backbone(name).family)

    class Swapped(adapter):
        def run_layer(self, fwd, index):
            return super().run_layer(fwd, {1: 2, 2: 1}.get(index, index))

    with pytest.raises(BackboneError, match=rf"the {adapter.name} adapter's state after layer 2 differs"):
        BACKBONE_CLASSES[KIND_OF[name]](model, make_tokenizer(), source=name, family=Swapped(model))


@pytest.mark.parametrize("name, layer", [("deberta-v2-mlm", 1), ("qwen2", 2), ("gemma2", 2)])
def test_the_generic_path_is_refused_where_a_family_passes_state_between_layers(name, layer):
    """DeBERTa-v2's conv after layer 1, Qwen2's and Gemma-2's sliding-window layers: the generic path (the first
    layer's inputs for every layer) is off, and the self-check says where."""
    model = tiny_model(name)
    with pytest.raises(BackboneError, match=rf"generic adapter's state after layer {layer} differs .* has no raee "
                                            "adapter"):
        BACKBONE_CLASSES[KIND_OF[name]](model, make_tokenizer(), source=name, family=Family(model))


def test_the_generic_path_cannot_even_find_t5s_layers():
    model = tiny_model("t5")
    with pytest.raises(BackboneError, match="cannot find the layer stack"):
        BACKBONE_CLASSES["encoder-decoder"](model, make_tokenizer(), source="t5", family=Family(model))


def test_a_gemma2_head_without_soft_capping_is_refused():
    class NoSoftcap(LayerTypedMasks):
        name = "gemma2-without-softcap"
        stack_paths, final_norm_paths = Gemma2.stack_paths, Gemma2.final_norm_paths

    model = tiny_model("gemma2")
    with pytest.raises(BackboneError, match="causal-lm head gives logits .* away from the model's own"):
        BACKBONE_CLASSES["causal-lm"](model, make_tokenizer(), source="gemma2", family=NoSoftcap(model))


def _unknown(model_type: str) -> torch.nn.Module:
    v, small = len(VOCAB), dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=80, pad_token_id=0)
    torch.manual_seed(0)
    models = {"mpnet": lambda: tf.MPNetForMaskedLM(tf.MPNetConfig(vocab_size=v, **small)),
              "olmo": lambda: tf.OlmoForCausalLM(tf.OlmoConfig(vocab_size=v, **small)),
              "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(vocab_size=v, **small))}
    return models[model_type]().eval()


@pytest.mark.parametrize("model_type, kind", [("mpnet", "masked-lm"), ("olmo", "causal-lm")])
def test_an_unknown_family_loads_when_the_generic_path_is_exact(model_type, kind):
    assert model_type not in FAMILIES
    backbone = BACKBONE_CLASSES[kind](_unknown(model_type), make_tokenizer(), source=model_type)
    assert backbone.family.name == "generic"
    prompting = TASK.prompting(kind, backbone.mask_token)
    assert backbone.all_layers(prompting.prompts(["good film"]), backbone.head(prompting.head)).label_logits.shape \
        == (1, 3, 2)


def test_an_unknown_family_is_refused_with_a_clear_message_when_it_is_not():
    """Phi's final norm is named final_layernorm, which the generic path does not know: its last state is off."""
    with pytest.raises(BackboneError, match="state after layer 2 differs .* model type 'phi' has no raee adapter"):
        BACKBONE_CLASSES["causal-lm"](_unknown("phi"), make_tokenizer(), source="phi")


def test_a_passing_verdict_is_cached_by_weight_fingerprint(monkeypatch):
    runs = []
    real = selfcheck.run_self_check
    monkeypatch.setattr(selfcheck, "run_self_check", lambda backbone: runs.append(backbone) or real(backbone))
    tiny_backbone("llama")
    tiny_backbone("llama")
    assert len(runs) <= 1  # the session may have checked these very weights already
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # other weights: checked again
    before = len(runs)
    BACKBONE_CLASSES["causal-lm"](model, make_tokenizer(), source="llama-changed")
    assert len(runs) == before + 1


def test_t5_encoder_exits_run_no_decoder_layer():
    backbone = tiny_backbone("t5")
    prompting = TASK.prompting("encoder-decoder")
    head = backbone.head(prompting.head)
    calls = {"encoder": 0, "decoder": 0}
    hooks = [block.register_forward_hook(lambda *_a, s=stack: calls.__setitem__(s, calls[s] + 1))
             for stack in calls for block in getattr(backbone.model, stack).block]
    try:
        for exit_layer in range(backbone.num_encoder_layers + 1):
            backbone.finish(backbone.start(prompting.prompts(["good film", "dull plot"])),
                            torch.full((2,), exit_layer), head)
        assert calls == {"encoder": 0 + 1 + 2 + 3, "decoder": 0}
        backbone.finish(backbone.start(prompting.prompts(["good film"])),
                        torch.tensor([backbone.num_encoder_layers + 1]), head)
        assert calls == {"encoder": 6 + 3, "decoder": 1}  # a decoder exit: the whole encoder and one decoder layer
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.slow
def test_a_sentence_encoder_pools_as_its_checkpoint_says(tmp_path):
    """A CLS-pooled sentence-transformers checkpoint: raee's last-layer reading is the model's own embedding."""
    from sentence_transformers import SentenceTransformer, models

    transformer_dir = save_checkpoint("bert-encoder", tmp_path / "bert")
    st = SentenceTransformer(modules=[models.Transformer(str(transformer_dir)),
                                      models.Pooling(32, pooling_mode="cls"), models.Normalize()])
    st.save(str(tmp_path / "st"))
    backbone = load_backbone(str(tmp_path / "st"))
    assert backbone.kind == "sentence-encoder" and str(backbone.pooling) == "cls"
    texts = ["good film", "a dull and slow plot with weak acting"]
    fwd = backbone.start(texts)
    while fwd.layer < backbone.num_layers:
        fwd.advance()
    ours = backbone.pooled(fwd, torch.ones(2, dtype=torch.bool))
    theirs = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts, convert_to_tensor=True,
                                                                            normalize_embeddings=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_sentence_transformers_module_after_pooling_is_refused(tmp_path):
    from sentence_transformers import SentenceTransformer, models

    transformer_dir = save_checkpoint("bert-encoder", tmp_path / "bert")
    st = SentenceTransformer(modules=[models.Transformer(str(transformer_dir)), models.Pooling(32),
                                      models.Dense(32, 8)])
    st.save(str(tmp_path / "st"))
    with pytest.raises(BackboneError, match="Dense .* is not supported"):
        load_backbone(str(tmp_path / "st"))
