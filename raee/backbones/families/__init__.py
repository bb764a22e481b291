"""One adapter per model family, keyed by `config.model_type`. Importing this package registers them all.

Encoders (masked LM, sentence encoder): bert, roberta, xlm-roberta, distilbert, deberta-v2, electra.
Decoders (causal LM): gpt2, llama, mistral, qwen2, opt, gemma2. Encoder-decoder: t5.
"""

from raee.backbones.families import (  # noqa: F401  # noqa: F401
    bert,
    deberta_v2,
    distilbert,
    electra,
    gemma2,
    gpt2,
    llama,
    mistral,
    opt,
    qwen2,
    roberta,
    t5,  # noqa: F401
    xlm_roberta,
)
