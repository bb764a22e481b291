"""How a backbone runs: the names of the choices, light enough (no torch) for CLIs and configs to list them."""

from __future__ import annotations

# Weight dtypes a torch backbone loads in.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
