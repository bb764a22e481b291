"""Tiny seeded backbones of every supported family, built from transformers configs (2-3 layers, hidden 32), a
word-level tokenizer, and synthetic labelled data: no files from the network, no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from raee.backbones import BACKBONE_CLASSES, Backbone

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PROMPT_WORDS = ("it was terrible great what is the sentiment of sentence print negative or positive answer this "
                "subjective objective").split()
CONTENT_WORDS = ("good bad fine awful boring lovely film movie plot acting actor scene story music dull bright "
                 "slow fast funny sad warm cold long short clever silly brilliant weak strong solid messy clean "
                 "charming tedious fresh stale vivid flat").split()
PUNCTUATION = [".", "?", "'", ",", ":", "!"]
VOCAB = SPECIALS + PROMPT_WORDS + CONTENT_WORDS + PUNCTUATION
POSITIVE = {"good", "fine", "lovely", "bright", "funny", "warm", "clever", "brilliant", "strong", "solid", "clean",
            "charming", "fresh", "vivid", "fast"}


def make_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer that wraps inputs in [CLS] ... [SEP]."""
    return bert_style_tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"),
                                pre_tokenizers.Whitespace(), model_max_length=64)


def bert_style_tokenizer(model: models.Model, pre_tokenizer: pre_tokenizers.PreTokenizer,
                         model_max_length: int) -> tf.PreTrainedTokenizerFast:
    """A lower-casing tokenizer over `model` that wraps inputs in [CLS] ... [SEP] (ids 2 and 3), as BERT's does."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
DECODER = dict(SMALL, num_key_value_heads=1, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def _configs() -> dict[str, tuple[type, tf.PretrainedConfig]]:
    """Model class and config of each tiny family, named "<family>-<kind>" or after the family (causal LMs).
    Each exercises what its adapter exists for: DeBERTa-v2's conv and relative positions, Qwen2's and Gemma-2's
    sliding-window layers (window 4, shorter than the probes), Gemma-2's logit soft-capping, OPT's projection,
    ELECTRA's narrower embeddings, T5's relative position biases and an unequal decoder depth."""
    v = len(VOCAB)
    return {
        "bert-mlm": (tf.BertForMaskedLM, tf.BertConfig(vocab_size=v, num_hidden_layers=3, **SMALL)),
        "roberta-mlm": (tf.RobertaForMaskedLM, tf.RobertaConfig(vocab_size=v, num_hidden_layers=3, pad_token_id=0,
                                                               **{**SMALL, "max_position_embeddings": 80})),
        "xlm-roberta-mlm": (tf.XLMRobertaForMaskedLM, tf.XLMRobertaConfig(
            vocab_size=v, num_hidden_layers=3, pad_token_id=0, **{**SMALL, "max_position_embeddings": 80})),
        "distilbert-mlm": (tf.DistilBertForMaskedLM, tf.DistilBertConfig(
            vocab_size=v, n_layers=3, dim=32, n_heads=2, hidden_dim=64, max_position_embeddings=64)),
        "deberta-v2-mlm": (tf.DebertaV2ForMaskedLM, tf.DebertaV2Config(
            vocab_size=v, num_hidden_layers=3, conv_kernel_size=3, relative_attention=True, position_buckets=8,
            max_relative_positions=16, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", **SMALL)),
        "electra-mlm": (tf.ElectraForMaskedLM, tf.ElectraConfig(vocab_size=v, num_hidden_layers=3, embedding_size=16,
                                                               **SMALL)),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=v, n_layer=3, n_embd=32, n_head=2, n_positions=64,
                                                   bos_token_id=2, eos_token_id=3)),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(vocab_size=v, num_hidden_layers=3, **DECODER)),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig(vocab_size=v, num_hidden_layers=3, sliding_window=4,
                                                           **DECODER)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(vocab_size=v, num_hidden_layers=3, use_sliding_window=True,
                                                     sliding_window=4, max_window_layers=1, **DECODER)),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig(vocab_size=v, num_hidden_layers=3, hidden_size=32,
                                                num_attention_heads=2, ffn_dim=64, max_position_embeddings=64,
                                                word_embed_proj_dim=16, pad_token_id=0, bos_token_id=2,
                                                eos_token_id=3)),
        "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(vocab_size=v, num_hidden_layers=3, head_dim=16,
                                                        sliding_window=4, final_logit_softcapping=0.5,
                                                        attn_logit_softcapping=5.0, **DECODER)),
        "t5": (tf.T5ForConditionalGeneration, tf.T5Config(
            vocab_size=v, d_model=32, d_kv=16, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
            eos_token_id=3, decoder_start_token_id=0)),
        "bert-encoder": (tf.BertModel, tf.BertConfig(vocab_size=v, num_hidden_layers=3, **SMALL)),
    }


CONFIGS = _configs()
FAMILIES = list(CONFIGS)  # every tiny model, one per supported family (bert twice: masked LM and encoder)
# make test-fast runs family-parametrized tests on one family per kind; make test runs every family.
INNER_LOOP_FAMILIES = ("bert-mlm", "llama", "bert-encoder", "t5")


def family_params(names: list[str]) -> list:
    """pytest parameters for `names`, the families outside INNER_LOOP_FAMILIES marked slow."""
    return [name if name in INNER_LOOP_FAMILIES else pytest.param(name, marks=pytest.mark.slow) for name in names]


KIND_OF = {name: ("masked-lm" if name.endswith("-mlm") else "sentence-encoder" if name.endswith("-encoder")
                  else "encoder-decoder" if name == "t5" else "causal-lm") for name in FAMILIES}


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model_class, config = CONFIGS[name]
    return model_class(config).eval()


def tiny_backbone(name: str, **kwargs) -> Backbone:
    return BACKBONE_CLASSES[KIND_OF[name]](tiny_model(name), make_tokenizer(), source=f"tiny-{name}", **kwargs)


def synthetic_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs of 3-9 content words; the label is the majority polarity of the words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(CONTENT_WORDS) for _ in range(rng.randint(3, 9))]
        positive = sum(w in POSITIVE for w in words) * 2 >= len(words)
        out.append((" ".join(words) + rng.choice([" .", " !", ""]), "positive" if positive else "negative"))
    return out


def save_checkpoint(name: str, directory: Path) -> Path:
    """Write a tiny model and its tokenizer as a local checkpoint directory, as a user would bring one."""
    tiny_model(name).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    # Name the tokenizer class, or transformers picks the family's own (Qwen2Tokenizer, ...) for this vocabulary.
    config_file = directory / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


def all_layers(backbone: Backbone, task, texts: list[str], **kwargs):
    """backbone.all_layers on a task's prompts and head: the label logits at every layer, the slow obvious way."""
    prompting = task.prompting(backbone.kind, backbone.mask_token)
    return backbone.all_layers(prompting.prompts(texts), backbone.head(prompting.head), **kwargs)
