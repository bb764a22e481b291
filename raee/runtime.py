"""How a backbone runs: runtime, precision and threads. Light (no torch import at module level) so that CLIs and
configs can list the choices.

Runtimes: `torch` (eager PyTorch, any device) and `onnxruntime` (the backbone exported once per weights to one
ONNX graph per layer, CPU; encoder families). `auto` picks onnxruntime on CPU where the family supports the export,
torch elsewhere. Precision: `fp32`, or `int8` (onnxruntime dynamic quantization); torch also runs fp16/bf16 weights.
Threads: one count for torch's intra-op pool, onnxruntime's sessions and FAISS's OpenMP; by default the CPU quota
of the container (cgroup), not the node's core count.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Literal, get_args

log = logging.getLogger(__name__)

# Weight dtypes a torch backbone loads in.
DType = Literal["float32", "float16", "bfloat16"]
DTYPE_NAMES: tuple[DType, ...] = get_args(DType)
DEFAULT_DTYPE: DType = "float32"
# What runs a backbone's layers (recorded in a store's manifest), and what a user may ask for: auto picks one.
Runtime = Literal["torch", "onnxruntime"]
RuntimeChoice = Literal["auto", Runtime]
BACKBONE_RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
RUNTIMES: tuple[RuntimeChoice, ...] = get_args(RuntimeChoice)
# The numbers a backbone computes in: a torch weight dtype's, or int8 (onnxruntime dynamic quantization).
Precision = Literal["fp32", "fp16", "bf16", "int8"]
OnnxruntimePrecision = Literal["fp32", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
ONNXRUNTIME_PRECISIONS: tuple[OnnxruntimePrecision, ...] = get_args(OnnxruntimePrecision)
# The precision a torch backbone's weight dtype gives.
DTYPE_PRECISION: dict[DType, Precision] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

_threads: int | None = None
# Threads of onnxruntime's process-wide pool once raee has made it (raee.backbones.onnx.session_options): fixed for
# the life of the process. 0: raee found the pool made by other code, its size unknown.
onnxruntime_pool: int | None = None


def cpu_quota(cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """(CPUs this process may use, where that figure came from): the cgroup v2 or v1 CPU quota rounded up, else the
    CPUs in the process's affinity mask, so a container limited to 2 CPUs on a 64-core node gets 2."""
    root = Path(cgroup_root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period))), "cgroup cpu.max"
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            return max(1, math.ceil(quota_us / period_us)), "cgroup cpu.cfs_quota_us"
    except (OSError, ValueError):
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return affinity, "CPU affinity"


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads and FAISS's OpenMP threads, and the count onnxruntime sessions get; log the
    choice once. threads: None = the CPU quota (RAEE_THREADS overrides it)."""
    global _threads
    source = "--threads"
    if threads is None and os.environ.get("RAEE_THREADS"):
        threads, source = int(os.environ["RAEE_THREADS"]), "RAEE_THREADS"
    if threads is None:
        threads, source = cpu_quota()
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    import faiss
    import torch

    torch.set_num_threads(threads)
    if hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(threads)
    if _threads != threads:
        log.info("using %d threads for torch, onnxruntime and FAISS (from %s)", threads, source)
    if onnxruntime_pool is not None and onnxruntime_pool != threads:
        log.warning("onnxruntime's pool keeps the %s threads it was made with before this call; %d apply to torch "
                    "and FAISS only (set the thread count before loading a backbone, or restart)",
                    onnxruntime_pool or "unknown number of", threads)
    _threads = threads
    return threads


def thread_count() -> int:
    """The configured thread count (configure_threads), else the CPU quota."""
    return _threads if _threads is not None else cpu_quota()[0]
