"""The onnxruntime runtime: the backbone exported once per weights to one ONNX graph for the embeddings and one per
layer, so that a batch still stops at each row's exit layer, now on onnxruntime's kernels.

Graphs pass the hidden state between them as CPU tensors shared with torch without copying (torch.from_numpy),
so the rest of raee (row selection, heads, pooling) is the same code on either runtime; the heads, a few rows of a
few matrices, stay in torch.

Exports live in the cache directory (raee.cache), keyed by what they are made from: the weight fingerprint, the
model config, this module's code, and the torch, transformers and onnxruntime versions. Each holds a meta.json with
the sha256 of every graph; an export whose files do not match is stale and rebuilt, never mixed. A read-only
deployment ships them (`raee-index export`, at image build); where the cache cannot be written, the export goes to
a temporary directory with a warning.

A store keyed `prefix:K` also gets a prefix graph (PrefixGraph): the embeddings, layers 1..K and the key's pooling
as one graph, exported on first use beside the per-layer graphs and checked against them wherever it is loaded.

Threads: every session raee makes runs on one intra-op pool for the whole process (onnxruntime's global thread
pool, made on first use with the configured thread count and spinning between calls as a lone session's pool
does). With a pool per session, spinning had to be off (seven spinning pools on two cores ran 7x slower), and then
each graph call woke sleeping threads: 0.43-0.61 ms per call. On the shared pool a call costs 0.13-0.15 ms, and
the per-layer graphs at full depth ran mr at batch 1 in 5.11 ms against 7.62 (docs/PERFORMANCE.md). Once the
global pool exists, onnxruntime refuses sessions that ask for a pool of their own in this process ("use_per_
session_threads must be false when using a global thread pool"): other code sharing the process makes its
sessions with `session_options()`, or the process sets RAEE_ONNXRUNTIME_POOL=per-session before raee loads a
backbone, to have raee's sessions keep pools of their own (sleeping between calls: slower at small batches).

Before an export is used, its fp32 graphs are run on the self-check's probe and compared layer by layer with the
torch adapter (float tolerance). int8 graphs (onnxruntime dynamic quantization of the checked fp32 graphs) cannot
equal fp32, so the check there is that every layer's states stay close in direction to fp32's (mean cosine),
which catches a broken quantization, not the expected rounding.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from raee import cache, runtime
from raee.backbones.family import ExportableEncoder, Family, PrefixStates, VocabularyHead
from raee.errors import BackboneError
from raee.runtime import ONNXRUNTIME_PRECISIONS, Precision, thread_count

if TYPE_CHECKING:
    from raee.backbones.base import Backbone
    from raee.backbones.layerwise import LayerwiseForward

log = logging.getLogger(__name__)

OPSET = 17
PREFIX_GRAPH = "prefix.onnx"
TOKEN_AXES = {0: "batch", 1: "tokens"}  # the dynamic axes of a (B, T, ...) input or output
POOL_ENV = "RAEE_ONNXRUNTIME_POOL"  # "per-session": every session keeps a pool of its own (default: one shared)


def session_options(threads: int | None = None) -> Any:
    """Options for an onnxruntime session in this process, with the graph optimizations on: on the process-wide
    pool (made now, on first use, with `threads` threads, default raee.runtime.thread_count(); a later, different
    count is not applied, with a warning), or, with RAEE_ONNXRUNTIME_POOL=per-session, on a pool of its own that
    sleeps between calls."""
    import onnxruntime as ort

    wanted = threads or thread_count()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if runtime.onnxruntime_pool is None and os.environ.get(POOL_ENV, "").strip().lower() == "per-session":
        # Spinning off: seven spinning pools on two cores ran 7x slower than one graph.
        options.intra_op_num_threads, options.inter_op_num_threads = wanted, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return options
    if runtime.onnxruntime_pool is None:
        from onnxruntime.capi import _pybind_state

        try:
            _pybind_state.set_global_thread_pool_sizes(wanted, 1)
            runtime.onnxruntime_pool = wanted
            log.info("onnxruntime: one pool of %d threads for every session, spinning between calls", wanted)
        except _pybind_state.Fail as e:  # made already in this process, by other code: shared as it is
            runtime.onnxruntime_pool = 0
            log.warning("onnxruntime: the process's thread pool was made by other code, with a size raee does not "
                        "know; sharing it (%s)", e)
    elif runtime.onnxruntime_pool and wanted != runtime.onnxruntime_pool:
        log.warning("onnxruntime: %d threads asked for, but the process's pool keeps the %d it was made with",
                    wanted, runtime.onnxruntime_pool)
    options.use_per_session_threads = False
    return options


class OrtLayer:
    """One layer's onnxruntime session, called like the torch layer it replaces; forward hooks work as on a torch
    module (hook(layer, (hidden,), output)), so call-counting tests run unchanged on either runtime."""

    def __init__(self, session: Any, index: int) -> None:
        self.session, self.index = session, index
        self._hooks: dict[int, Any] = {}

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(self.session.run(None, {"hidden": _numpy(hidden), "mask": _numpy(mask)})[0])
        self.ran(hidden, out)
        return out

    def ran(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """Tell the forward hooks this layer ran (here, or inside a prefix graph)."""
        for hook in list(self._hooks.values()):
            hook(self, (hidden,), out)

    def register_forward_hook(self, hook: Any) -> Any:
        key = id(hook)
        self._hooks[key] = hook
        hooks = self._hooks

        class Handle:
            def remove(self) -> None:
                hooks.pop(key, None)

        return Handle()


class PrefixGraph:
    """The embeddings and layers 1..K as one graph that returns the state after each and the prefix keys pooled at
    layer K. A prefix key then costs one graph call instead of K + 1, with no torch work between them: on the
    project's 2-core machine every hand-over between onnxruntime and Python costs a few hundred microseconds at
    batch 1 (onnxruntime leaves the caches cold), which is what the embeddings and two key layers paid three times.
    The layers' forward hooks fire as if they had been called one by one."""

    def __init__(self, session: Any, layers: list[OrtLayer]) -> None:
        self.session, self.layers = session, layers

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> PrefixStates:
        *states, keys = (torch.from_numpy(out) for out in
                         self.session.run(None, {"input_ids": _numpy(input_ids), "mask": _numpy(mask)}))
        for i, layer in enumerate(self.layers):
            layer.ran(states[i], states[i + 1])
        return PrefixStates(states, {"mask": mask}, {}, keys)


class OnnxRuntimeFamily(Family):
    """A family adapter whose layers run on onnxruntime; everything else (heads, the reference pass the self-check
    compares with) is the torch adapter's."""

    runtime = "onnxruntime"

    def __init__(self, torch_family: Family, directory: Path, precision: Precision, threads: int | None = None) -> None:
        self.torch_family = torch_family
        self.name = torch_family.name
        self.model, self.config, self.base = torch_family.model, torch_family.config, torch_family.base
        self.final_norm = torch_family.final_norm
        self.shared_inputs = torch_family.shared_inputs
        self.directory, self._precision = directory, precision
        self._options = session_options(threads)
        self.embeddings = self._session(directory / "embeddings.onnx")
        self.layers = [OrtLayer(self._session(directory / f"layer_{i:03d}.onnx"), i)
                       for i in range(torch_family.num_layers)]
        self._prefixes: dict[int, PrefixGraph | None] = {}

    def _session(self, path: Path) -> Any:
        import onnxruntime as ort

        return ort.InferenceSession(str(path), self._options, providers=["CPUExecutionProvider"])

    @property
    def precision(self) -> Precision:
        return self._precision

    def begin(self, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        hidden = torch.from_numpy(self.embeddings.run(None, {"input_ids": _numpy(input_ids)})[0])
        return hidden, {"mask": attention_mask.to(torch.float32)}, {}

    def run_layer(self, fwd: LayerwiseForward, index: int) -> torch.Tensor:
        return self.layers[index](fwd.hidden, fwd.inputs["mask"])

    def prepare_prefix(self, backbone: Backbone, depth: int) -> bool:
        """Export (or find) the prefix graph to layer `depth` and check it on the self-check's probe against these
        per-layer graphs, which the store's records came from: states at every layer 0..depth and the keys within
        float tolerance. A graph that fails its check, or cannot be exported or loaded, is not used (a warning says
        so): keys are then computed layer by layer, slower but the same."""
        if depth in self._prefixes:
            return self._prefixes[depth] is not None
        graph: PrefixGraph | None = None
        try:
            directory = ensure_export(backbone, self._precision, prefix=depth)
            graph = PrefixGraph(self._session(directory / PREFIX_GRAPH), self.layers[:depth])
            _check_prefix(backbone, self, graph, depth)
        except Exception as e:  # an export, file or session error too: the per-layer graphs still serve
            log.warning("no prefix graph to layer %d (%s: %s); prefix keys there are computed layer by layer", depth,
                        type(e).__name__, e)
            graph = None
        self._prefixes[depth] = graph
        return graph is not None

    def run_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   depth: int) -> PrefixStates | None:
        graph = self._prefixes.get(depth)
        return graph(input_ids, attention_mask.to(torch.float32)) if graph is not None else None

    def trim_tokens(self, inputs: dict[str, Any], carry: dict[str, Any],
                    width: int) -> tuple[dict[str, Any], dict[str, Any]]:
        # The graphs take the hidden state and the (B, T) padding mask, nothing else.
        return {**inputs, "mask": inputs["mask"][:, :width]}, carry

    def finalize(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.torch_family.finalize(hidden)

    def reference_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        return self.torch_family.reference_states(input_ids, attention_mask)

    def comparable(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.torch_family.comparable(layer, hidden)

    def mlm_head(self) -> VocabularyHead:
        return self.torch_family.mlm_head()

    def lm_head(self) -> VocabularyHead:
        return self.torch_family.lm_head()


def supports_onnxruntime(backbone: Backbone) -> bool:
    """Whether this backbone can run on onnxruntime: an exportable family, on the CPU, in float32 weights."""
    return backbone.family.exportable and backbone.device.type == "cpu" and backbone.dtype == torch.float32


def use_onnxruntime(backbone: Backbone, precision: Precision = "fp32", threads: int | None = None,
                    verify: bool = True) -> None:
    """Move a (self-checked, torch) backbone's layers onto onnxruntime: export or find the graphs, check them, and
    self-check the backbone again on the new runtime."""
    if precision not in ONNXRUNTIME_PRECISIONS:
        raise BackboneError(f"precision {precision!r} is not one the onnxruntime runtime runs "
                            f"({', '.join(ONNXRUNTIME_PRECISIONS)})")
    if not supports_onnxruntime(backbone):
        raise BackboneError(f"{backbone.source}: the onnxruntime runtime runs {backbone.kind} backbones of the "
                            f"exportable families ({', '.join(_exportable_families())}) on the CPU in float32; this "
                            f"one is {backbone.family.name} on {backbone.device.type} in "
                            f"{str(backbone.dtype).removeprefix('torch.')}. Use --runtime torch.")
    directory = ensure_export(backbone, precision)
    backbone.use_family(OnnxRuntimeFamily(backbone.family, directory, precision, threads), verify)
    if torch.get_num_threads() != 1:
        # What torch still does here (row selection, pooling, the head's few rows) is small, and its OpenMP pool,
        # spinning after each op, took the cores from onnxruntime's: batch-1 calls ran 3x slower on 2 cores.
        log.info("torch runs single-threaded from now on: onnxruntime runs the layers")
        torch.set_num_threads(1)


def ensure_export(backbone: Backbone, precision: Precision, prefix: int | None = None) -> Path:
    """The directory of this backbone's checked graphs at `precision`, exported now if missing or stale; with
    `prefix`, of its prefix graph to that layer instead (PREFIX_GRAPH, checked where it is loaded)."""
    key = export_key(backbone, prefix)
    graph = "embeddings.onnx" if prefix is None else PREFIX_GRAPH  # what a complete export must hold
    if prefix is None:
        def export(staging: Path) -> dict[str, Any]:
            return _export_fp32(backbone, staging, key)
    else:
        def export(staging: Path) -> dict[str, Any]:
            return _export_prefix(backbone, staging, prefix)
    root = cache.cache_dir() / "onnx"
    directory = root / f"{key}-{precision}"
    if _is_complete(directory, key, graph):
        return directory
    if directory.exists():
        log.warning("onnxruntime export %s is incomplete or does not match its checksums; rebuilding it", directory)
    fp32 = directory if precision == "fp32" else root / f"{key}-fp32"
    try:
        root.mkdir(parents=True, exist_ok=True)
        writable = os.access(root, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        root = Path(tempfile.mkdtemp(prefix="raee-onnx-"))
        log.warning("the export cache %s cannot be written; exporting to %s for this process only. Ship exports "
                    "with the deployment (raee-index export)", cache.cache_dir(), root)
        directory, fp32 = root / f"{key}-{precision}", root / f"{key}-fp32"
    with _exporting(root, key):
        if _is_complete(directory, key, graph):  # another process exported it while this one waited
            return directory
        if precision == "int8" and not _is_complete(fp32, key, graph):
            _publish(fp32, export)
        if precision == "fp32":
            _publish(directory, export)
        else:
            _publish(directory, lambda staging: _quantize_int8(backbone, fp32, staging, check=prefix is None))
    return directory


@contextlib.contextmanager
def _exporting(root: Path, key: str) -> Iterator[None]:
    """Hold the export lock of `key` in `root`: processes sharing a cache (replicas starting together) export it
    once, and none replaces a directory another is loading."""
    with open(root / f".{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def export_key(backbone: Backbone, prefix: int | None = None) -> str:
    """What an export is made from: weights, config, the family's and this module's code, library versions (and
    for a prefix graph, its code and depth, which the key ends with)."""
    import onnxruntime
    import transformers

    code = [inspect.getsource(cls) for cls in type(_torch_adapter(backbone.family)).__mro__ if cls is not object]
    exporting = [_export_fp32, _export, _tracing_batch, _Embeddings, OnnxRuntimeFamily]
    parts = [backbone.fingerprint(), backbone.model.config.to_json_string(),
             *(inspect.getsource(obj) for obj in exporting), *code, torch.__version__, transformers.__version__,
             onnxruntime.__version__, str(OPSET)]
    if prefix is not None:
        from raee.backbones.base import mean_pool

        parts += [inspect.getsource(_Prefix), inspect.getsource(_export_prefix), inspect.getsource(mean_pool)]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    return digest if prefix is None else f"{digest}-prefix{prefix}"


def _export_fp32(backbone: Backbone, staging: Path, key: str) -> dict[str, Any]:
    """Export the embeddings and every layer to staging/, check them against the torch adapter on the probe;
    returns what meta.json records beyond the checksums."""
    family = _exported_adapter(backbone)
    started = time.perf_counter()
    hidden_size = backbone.hidden_size
    ids, mask = _tracing_batch(backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on traced Python control flow
        try:
            _export(_Embeddings(family), (ids,), staging / "embeddings.onnx", {"input_ids": TOKEN_AXES},
                    {"out": TOKEN_AXES})
            for i in range(family.num_layers):
                _export(family.export_layer(i), (torch.zeros(2, 8, hidden_size), mask),
                        staging / f"layer_{i:03d}.onnx", {"hidden": TOKEN_AXES, "mask": TOKEN_AXES},
                        {"out": TOKEN_AXES})
        finally:
            backbone.model.eval()  # the exporter may leave modules in training mode: dropout would then be on
    differences = _compare_with_torch(backbone, staging, "fp32")
    worst = max(differences)
    log.info("exported %s to onnxruntime (%d layers) in %.1f s; worst layer difference from torch %.2g",
             backbone.source, family.num_layers, time.perf_counter() - started, worst)
    return {"precision": "fp32", "max_difference_by_layer": differences}


def _export_prefix(backbone: Backbone, staging: Path, depth: int) -> dict[str, Any]:
    """Export the embeddings and layers 1..depth with the keys' pooling as one graph (PrefixGraph)."""
    ids, mask = _tracing_batch(backbone)
    states = {f"state_{i}": TOKEN_AXES for i in range(depth + 1)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _export(_Prefix(_exported_adapter(backbone), depth), (ids, mask), staging / PREFIX_GRAPH,
                    {"input_ids": TOKEN_AXES, "mask": TOKEN_AXES}, {**states, "keys": {0: "batch"}})
        finally:
            backbone.model.eval()
    log.info("exported the prefix graph of %s to layer %d", backbone.source, depth)
    return {"precision": "fp32", "prefix": depth}


def _check_prefix(backbone: Backbone, family: OnnxRuntimeFamily, graph: PrefixGraph, depth: int) -> None:
    """Raise BackboneError unless the prefix graph gives what the per-layer graphs give on the probe, at every
    layer 0..depth and for the keys (float tolerance: the same kernels on the same weights)."""
    from raee.backbones.base import mean_pool
    from raee.backbones.selfcheck import compare_states, probe_prompts

    input_ids, mask = backbone.encode(probe_prompts(backbone))
    float_mask = mask.to(torch.float32)
    ran = PrefixGraph(graph.session, [])(input_ids, float_mask)  # no hooks: the probe is not traffic
    real = mask.bool()
    hidden = torch.from_numpy(family.embeddings.run(None, {"input_ids": _numpy(input_ids)})[0])
    for layer in range(depth + 1):
        if layer:
            hidden = torch.from_numpy(family.layers[layer - 1].session.run(
                None, {"hidden": _numpy(hidden), "mask": _numpy(float_mask)})[0])
        difference, off, tolerance = compare_states(ran.states[layer][real], hidden[real], "fp32")
        if off:
            raise BackboneError(f"{backbone.source}: the prefix graph parts from the per-layer graphs at layer "
                                f"{layer} (difference {difference:.3g}; {tolerance})")
    difference, off, tolerance = compare_states(ran.keys, mean_pool(hidden, mask), "fp32")
    if off:
        raise BackboneError(f"{backbone.source}: the prefix graph's keys part from the per-layer graphs' "
                            f"(difference {difference:.3g}; {tolerance})")


def _quantize_int8(backbone: Backbone, fp32: Path, staging: Path, check: bool = True) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # the quantizer logs every tensor it leaves alone on the root logger
    try:
        for source in sorted(fp32.glob("*.onnx")):
            quantize_dynamic(str(source), str(staging / source.name), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    if not check:  # a prefix graph, checked against the int8 layer graphs where it is loaded
        return {"precision": "int8", "quantized_from": fp32.name}
    differences = _compare_with_torch(backbone, staging, "int8")
    log.info("quantized %s to int8 (onnxruntime dynamic quantization); largest layer difference from fp32 %.3g",
             backbone.source, max(differences))
    return {"precision": "int8", "max_difference_by_layer": differences, "quantized_from": fp32.name}


@torch.inference_mode()
def _compare_with_torch(backbone: Backbone, directory: Path, precision: Precision) -> list[float]:
    """Run the self-check's probe through the graphs in `directory` and the torch adapter side by side; raise
    BackboneError where they part (raee.backbones.selfcheck.compare_states: float tolerance for fp32, direction
    for int8). Returns the largest difference per layer."""
    from raee.backbones.layerwise import LayerwiseForward
    from raee.backbones.selfcheck import compare_states, probe_prompts

    family = backbone.family
    input_ids, mask = backbone.encode(probe_prompts(backbone))

    def start(f: Family) -> LayerwiseForward:
        hidden, inputs, carry = f.begin(input_ids, mask)
        return LayerwiseForward(f, hidden, inputs, mask, None, carry)

    theirs, ours = start(family), start(OnnxRuntimeFamily(family, directory, precision))
    real = mask.bool()
    differences = []
    for layer in range(family.num_layers + 1):
        difference, off, tolerance = compare_states(ours.hidden[real], theirs.hidden[real], precision)
        differences.append(difference)
        if off:
            raise BackboneError(f"{backbone.source}: the {precision} onnxruntime graphs part from the torch "
                                f"{family.name} adapter after layer {layer} (difference {difference:.3g}; "
                                f"{tolerance}); refusing the export. Use --runtime torch.")
        if layer < family.num_layers:
            ours.advance()
            theirs.advance()
    return differences


def _publish(directory: Path, build: Any) -> None:
    """Build an export into a staging directory beside `directory`, write meta.json with every file's sha256, and
    rename it into place: a crash leaves no half export under the final name."""
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700: another uid (the serving image's) could not read it
    try:
        meta = build(staging)
        meta["files"] = {p.name: _sha256(p) for p in sorted(staging.glob("*.onnx"))}
        meta["key"] = directory.name.rsplit("-", 1)[0]
        meta["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_complete(directory: Path, key: str, graph: str) -> bool:
    """A finished export of this key, holding `graph`, whose graphs all match their recorded checksums."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    files = meta.get("files") or {}
    if meta.get("key") != key or graph not in files:
        return False
    return all((directory / name).is_file() and _sha256(directory / name) == digest for name, digest in files.items())


def _export(module: nn.Module, args: tuple[Any, ...], path: Path, inputs: dict[str, dict[int, str]],
            outputs: dict[str, dict[int, str]]) -> None:
    """Export `module` called on `args`; inputs and outputs: name -> its dynamic axes, in call and return order."""
    torch.onnx.export(module.eval(), args, str(path), input_names=list(inputs), output_names=list(outputs),
                      dynamic_axes={**inputs, **outputs}, opset_version=OPSET, dynamo=False)


def _tracing_batch(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (2, 8), mask (2, 8)) the exports are traced on: the second row padded, so masks are exercised."""
    ids = torch.full((2, 8), backbone.tokenizer.pad_token_id or 0, dtype=torch.long)
    ids[:, :6] = torch.arange(6) + 5
    mask = torch.ones(2, 8)
    mask[1, 6:] = 0
    return ids, mask


def _torch_adapter(family: Family) -> Family:
    """The torch adapter the graphs are made from, whichever runtime `family` runs on."""
    return family.torch_family if isinstance(family, OnnxRuntimeFamily) else family


def _exported_adapter(backbone: Backbone) -> ExportableEncoder:
    family = _torch_adapter(backbone.family)
    if not isinstance(family, ExportableEncoder):  # supports_onnxruntime said so before any export
        raise BackboneError(f"the {family.name} family does not export to onnxruntime")
    return family


class _Prefix(nn.Module):
    def __init__(self, family: ExportableEncoder, depth: int) -> None:
        super().__init__()
        self.embeddings = _Embeddings(family)
        self.layers = nn.ModuleList(family.export_layer(i) for i in range(depth))

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from raee.backbones.base import mean_pool

        states = [self.embeddings(input_ids)]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return (*states, mean_pool(states[-1], mask))


class _Embeddings(nn.Module):
    def __init__(self, family: ExportableEncoder) -> None:
        super().__init__()
        self.family = family
        self.base = family.base  # registered, so export and eval() see the embedding weights

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.family.embed(input_ids)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _exportable_families() -> list[str]:
    from raee.backbones.family import FAMILIES

    return sorted(name for name, cls in FAMILIES.items() if cls.exportable)
