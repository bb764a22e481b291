"""Tiny backbones built from transformers configs (2-3 layers, hidden 32, seeded), a word-level tokenizer, and
synthetic labelled data: no files from the network, no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM)

from raee.backbones import CausalLMBackbone, MaskedLMBackbone, SentenceEncoderBackbone

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


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer that wraps inputs in [CLS] ... [SEP]."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    v = len(VOCAB)
    if kind == "bert-mlm":
        return BertForMaskedLM(BertConfig(vocab_size=v, num_hidden_layers=3, **SMALL)).eval()
    if kind == "roberta-mlm":
        return RobertaForMaskedLM(RobertaConfig(vocab_size=v, num_hidden_layers=3, pad_token_id=0,
                                                **{**SMALL, "max_position_embeddings": 80})).eval()
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=v, num_hidden_layers=3, num_key_value_heads=1,
                                            pad_token_id=0, bos_token_id=2, eos_token_id=3, **SMALL)).eval()
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=v, n_layer=3, n_embd=32, n_head=2, n_positions=64,
                                          bos_token_id=2, eos_token_id=3)).eval()
    if kind == "bert-encoder":
        return BertModel(BertConfig(vocab_size=v, num_hidden_layers=3, **SMALL)).eval()
    raise ValueError(kind)


BACKBONE_CLASSES = {"bert-mlm": MaskedLMBackbone, "roberta-mlm": MaskedLMBackbone, "llama": CausalLMBackbone,
                    "gpt2": CausalLMBackbone, "bert-encoder": SentenceEncoderBackbone}
KINDS = list(BACKBONE_CLASSES)


def tiny_backbone(kind: str):
    return BACKBONE_CLASSES[kind](tiny_model(kind), make_tokenizer(), source=f"tiny-{kind}")


@pytest.fixture(scope="session", params=KINDS)
def backbone(request):
    return tiny_backbone(request.param)


@pytest.fixture(scope="session")
def encoder_backbone():
    return tiny_backbone("bert-encoder")


def synthetic_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs of 3-9 content words; the label is the majority polarity of the words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(CONTENT_WORDS) for _ in range(rng.randint(3, 9))]
        positive = sum(w in POSITIVE for w in words) * 2 >= len(words)
        out.append((" ".join(words) + rng.choice([" .", " !", ""]), "positive" if positive else "negative"))
    return out


@pytest.fixture(scope="session")
def sst2_like(tmp_path_factory) -> Path:
    """A JSONL calibration file in the sst2 label names."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in synthetic_texts(240)))
    return path


def save_checkpoint(kind: str, directory: Path) -> Path:
    """Write a tiny model and its tokenizer as a local checkpoint directory, as a user would bring one."""
    tiny_model(kind).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def stores(tmp_path_factory, sst2_like):
    """Two versions of an sst2 store on a tiny BERT MLM checkpoint, and one store built on another backbone, all
    under one directory (the servers' store root)."""
    from raee.backbones import load_backbone
    from raee.build import build_store
    from raee.data import read_examples
    from raee.keys import KeySpec
    from raee.tasks import BUILTIN_TASKS
    task = BUILTIN_TASKS["sst2"]
    base = tmp_path_factory.mktemp("svc")
    checkpoint = save_checkpoint("bert-mlm", base / "bert")
    backbone = load_backbone(str(checkpoint))
    examples = read_examples(sst2_like, task)
    build_store(base / "sst2", task, backbone, examples[:120], key=KeySpec("prefix", 1), progress=False)
    build_store(base / "sst2-next", task, backbone, examples[120:], key=KeySpec("prefix", 1), progress=False)
    other = load_backbone(str(save_checkpoint("llama", base / "llama")))
    build_store(base / "sst2-llama", task, other, examples[:60], key=KeySpec("prefix", 1), progress=False)
    return {"checkpoint": checkpoint, "backbone": backbone, "root": str(base), "current": str(base / "sst2"),
            "next": str(base / "sst2-next"), "other": str(base / "sst2-llama")}


@pytest.fixture
def serve(stores):
    """serve(**settings) -> a started RaeeServer on 127.0.0.1 (port 0) over the current sst2 store, with an admin
    listener on 127.0.0.1 whose store root holds every test store; stopped after the test."""
    from service.config import ServerConfig
    from service.server import RaeeServer
    started = []

    def start(wait: bool = True, backbone=None, **overrides):
        settings = {"stores": (stores["current"],), "host": "127.0.0.1", "port": 0, "metrics_port": 0,
                    "drain_s": 0.0, "admin": True, "admin_port": 0, "store_roots": (stores["root"],), **overrides}
        server = RaeeServer(ServerConfig(**settings), backbone=backbone or stores["backbone"]).start()
        started.append(server)
        if wait:
            server.loaded.wait(60)
            assert server.load_error is None, server.load_error
        return server

    yield start
    for server in started:
        server.stop(1)
