"""raee against what a user would deploy instead, in one process, on the same texts, repeats interleaved.

Rows, all with the same thread count and tokenizer:
  torch eager, full depth            the plain model forward (fp32), and with dynamic int8 Linear layers
  onnxruntime whole model            the model exported the ordinary way (one graph, no exits), fp32 and int8
                                     (onnxruntime.quantization dynamic), read by the same head at full depth; a
                                     batch runs in groups of similar length as raee's does (the ratios' base),
                                     and at fp32 also as one padded batch
  raee full depth (onnxruntime)      the per-layer graphs run to the end: what cutting the graph costs
  raee served policy                 the store's own policy on torch fp32, onnxruntime fp32 and onnxruntime int8
                                     (int8 needs a store built at int8: --store-int8)
For each: accuracy (or MCC) on the whole test file, batch-1 latency p50/p99 and batch-32 throughput on a sample,
the rows taking short turns in a shuffled order (25 texts at batch 1, one batch of 32) so machine noise hits all
rows alike. Then over gRPC: C
closed-loop clients against raee-serve on the store, served policy and full depth alternating on the same server.

    python bench/baselines.py --store stores/sst2 --store-int8 stores/sst2-int8 --test data/sst2/test.jsonl \\
        --json out/baselines-sst2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from raee import runtime  # noqa: E402
from raee.backbones import Backbone  # noqa: E402
from raee.backbones.base import Batch  # noqa: E402
from raee.backbones.loading import resolve_source  # noqa: E402
from raee.backbones.onnx import session_options  # noqa: E402
from raee.data import read_examples  # noqa: E402
from raee.engine import Engine  # noqa: E402
from raee.metrics import task_score  # noqa: E402
from raee.runtime import configure_threads  # noqa: E402
from raee.tasks import Verbalizations  # noqa: E402

Classify = Callable[[list[str]], np.ndarray]  # texts -> predicted label indexes


class WholeModel:
    """The backbone's model run whole (no exits) on torch or one onnxruntime graph, read by raee's head at the last
    layer: the baseline a user gets without raee. Sentence encoders: pooled state vs label prototypes made by this
    same model; masked LMs: the MLM logits of the label words at the mask."""

    def __init__(self, engine: Engine, runtime: str, int8: bool, workdir: Path, threads: int,
                 length_groups: bool = True) -> None:
        backbone: Backbone = engine.backbone
        self.backbone, self.engine, self.runtime = backbone, engine, runtime
        self.length_groups = length_groups
        self.kind = backbone.kind
        if self.kind not in ("sentence-encoder", "masked-lm"):
            raise SystemExit(f"baselines: {self.kind} backbones are not benchmarked yet")
        model = _fresh_model(backbone)
        if runtime == "torch":
            self.model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8) \
                if int8 else model
        else:
            self.session = whole_graph(model, workdir, int8, threads)
        if self.kind == "sentence-encoder":
            spec: Verbalizations = engine.prompting.head
            sentences = [s for group in spec.groups for s in group]
            states = self._states(sentences)
            pooled, start = [], 0
            for group in spec.groups:
                pooled.append(states[start:start + len(group)].mean(axis=0))
                start += len(group)
            self.prototypes = _normalize(np.stack(pooled))
        else:
            self.label_ids = engine.head.ids.numpy()

    def _run(self, prompts: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(model output (B, T, H) or logits (B, T, V), input ids, attention mask)."""
        # raee's own tokenizing (Backbone.encode: the Rust encoder called directly where it gives the same ids),
        # so that the rows differ in how far the model runs, not in how the texts are tokenized
        input_ids, attention_mask = self.backbone.encode(prompts)
        ids, mask = input_ids.cpu().numpy(), attention_mask.cpu().numpy()
        if self.runtime == "torch":
            with torch.inference_mode():
                out = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            out = (out.last_hidden_state if self.kind == "sentence-encoder" else out.logits).numpy()
        else:
            out = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out, ids, mask

    def _states(self, prompts: Batch) -> np.ndarray:
        out, _, mask = self._run(prompts)
        pooled = self.backbone.pooling(torch.from_numpy(out), torch.from_numpy(mask)).numpy()
        return _normalize(pooled)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Predicted label indexes. A batch runs in groups of similar length (Backbone.length_groups), as raee's rows
        do, so that the baseline pads no more than they do; without length_groups, as one padded batch."""
        tokens = self.backbone.tokens(self.engine.prompting.prompts(texts))  # once, as raee's rows do
        predicted = np.zeros(len(tokens), dtype=np.int64)
        groups = self.backbone.length_groups(tokens) if self.length_groups else [np.arange(len(tokens))]
        for rows in groups:
            predicted[rows] = self._predict(tokens.rows(rows))
        return predicted

    def _predict(self, prompts: Batch) -> np.ndarray:
        if self.kind == "sentence-encoder":
            return (self._states(prompts) @ self.prototypes.T).argmax(axis=1)
        logits, ids, _ = self._run(prompts)
        at_mask = logits[np.arange(len(ids)), (ids == self.backbone.tokenizer.mask_token_id).argmax(axis=1)]
        return at_mask[:, self.label_ids].argmax(axis=1)


def raee_row(engine: Engine, policy: str) -> Classify:
    def classify(texts: list[str]) -> np.ndarray:
        return np.array([r.label_index for r in engine.classify(texts, policy=policy)])
    return classify


def with_torch_threads(fn: Classify, threads: int) -> Classify:
    """Run a row with torch's pool at its own size: all the threads where torch runs the layers, one where
    onnxruntime does (as raee sets it when a backbone moves onto onnxruntime)."""
    def classify(texts: list[str]) -> np.ndarray:
        torch.set_num_threads(threads)
        return fn(texts)
    return classify


BLOCK = 30  # texts a row runs at batch 1 in one turn before the next row's
WARM = 5  # the first texts of a turn, not timed: the row finds the caches full of the row before it


def measure(rows: dict[str, Classify], texts: list[str], repeats: int, batch: int) -> dict[str, dict]:
    """Batch-1 latencies and batch-`batch` throughput per row, the rows taking turns in a new order for every block
    of texts: BLOCK texts at batch 1 (the first WARM untimed), one batch for throughput. Turns this short put the
    machine's drift (a whole-run block of 200 texts per row scattered ratios by 10-15% here) on every row alike,
    and the untimed texts keep a row from paying for the caches the row before it filled, which a server running
    one model never pays."""
    latencies: dict[str, list[float]] = {name: [] for name in rows}
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():
        fn(texts[:batch])  # warm-up: first calls allocate and fill caches
    order = list(rows)
    rng = random.Random(0)
    for _ in range(repeats):
        for start in range(0, len(texts), BLOCK - WARM):
            warm = [texts[(start - WARM + i) % len(texts)] for i in range(WARM)]  # each text is timed once a repeat
            rng.shuffle(order)
            for name in order:
                for text in warm:
                    rows[name]([text])
                for text in texts[start:start + BLOCK - WARM]:
                    started = time.perf_counter()
                    rows[name]([text])
                    latencies[name].append((time.perf_counter() - started) * 1e3)
        spent = dict.fromkeys(rows, 0.0)
        for start in range(0, len(texts), batch):
            rng.shuffle(order)
            for name in order:
                started = time.perf_counter()
                rows[name](texts[start:start + batch])
                spent[name] += time.perf_counter() - started
        for name in rows:
            seconds[name].append(spent[name])
    return {name: {"p50_ms": float(np.percentile(latencies[name], 50)),
                   "p99_ms": float(np.percentile(latencies[name], 99)),
                   "texts_per_s": len(texts) / statistics.median(seconds[name])} for name in rows}


def stage_profile(engine: Engine, texts: list[str], batch: int) -> dict[str, float]:
    """Mean ms per text of each stage of the served policy (tokenize + embeddings + key layers, search, the rest of
    the backbone), at one batch size."""
    totals = {"key": 0.0, "search": 0.0, "backbone": 0.0}
    for i in range(0, len(texts), batch):
        results = engine.classify(texts[i:i + batch])
        t = results[0].times
        totals["key"] += t.key_ms
        totals["search"] += t.search_ms
        totals["backbone"] += t.backbone_ms
    return {stage: ms / len(texts) for stage, ms in totals.items()}


def grpc_rows(store: str, task: str, texts: list[str], clients: int, seconds: float, rounds: int,
              threads: int) -> dict[str, dict]:
    """Closed-loop clients against one raee-serve on the store: the served policy and full depth alternating."""
    from load import run_policy

    from service.launch import ServerProcess

    server = ServerProcess([store], "--threads", str(threads), metrics=True)
    try:
        if not server.wait_serving():
            raise SystemExit(f"raee-serve did not come up:\n{server.output()[-2000:]}")
        run_policy(server.address, task, "calibrated", texts, clients, 2.0, 1)  # warm-up
        runs: dict[str, list[dict]] = {"calibrated": [], "full": []}
        for _ in range(rounds):
            for policy in runs:
                runs[policy].append(run_policy(server.address, task, policy, texts, clients, seconds, 1, server))
    finally:
        server.stop()
    return {policy: {"texts_per_s": statistics.median(r["texts_per_s"] for r in rs),
                     "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                     "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                     "codes": rs[-1]["codes"],
                     "server": {k: statistics.median(r["server"][k] for r in rs) for k in rs[0]["server"]}}
            for policy, rs in runs.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="exit store built at fp32 (its served policy is measured)")
    p.add_argument("--store-int8", default=None, help="the same store built at int8 (raee-index build --precision "
                                                      "int8 with the same settings)")
    p.add_argument("--test", required=True, help="labelled test file: accuracy on all of it, timing on a sample")
    p.add_argument("--sample", type=int, default=200, help="test texts timed per row and repeat (200)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (3)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the throughput column (32)")
    p.add_argument("--threads", type=int, default=None, help="threads for every row (default: the CPU quota)")
    p.add_argument("--grpc-clients", type=int, default=8, help="closed-loop gRPC clients (8; 0 = skip)")
    p.add_argument("--grpc-seconds", type=float, default=15.0, help="seconds per policy and round (15)")
    p.add_argument("--grpc-rounds", type=int, default=2, help="alternating rounds per policy (2)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    threads = configure_threads(args.threads)

    engines = {"torch fp32": Engine.load(args.store, runtime="torch"),
               "onnxruntime fp32": Engine.load(args.store, runtime="onnxruntime")}
    if args.store_int8:
        engines["onnxruntime int8"] = Engine.load(args.store_int8, runtime="onnxruntime")
    reference = engines["onnxruntime fp32"]
    task = reference.task
    examples = read_examples(args.test, task)
    texts = [e.text for e in examples]
    gold = np.array([e.label for e in examples])
    sample = texts[:args.sample]
    with tempfile.TemporaryDirectory() as workdir:
        def whole(runtime: str, int8: bool) -> WholeModel:
            return WholeModel(reference, runtime, int8, Path(workdir), threads)

        rows: dict[str, Classify] = {
            "torch eager, full depth, fp32": whole("torch", False),
            "torch eager, full depth, dynamic int8 Linear": whole("torch", True),
            "onnxruntime whole model, full depth, fp32": whole("onnxruntime", False),
            "onnxruntime whole model, full depth, int8": whole("onnxruntime", True),
            "onnxruntime whole model, full depth, fp32, one padded batch":
                WholeModel(reference, "onnxruntime", False, Path(workdir), threads, length_groups=False),
            "raee per-layer graphs, full depth, onnxruntime fp32": raee_row(reference, "full"),
        }
        for name, engine in engines.items():
            rows[f"raee served policy, {name}"] = raee_row(engine, "calibrated")
        rows = {name: with_torch_threads(fn, threads if name.startswith("torch") or "torch fp32" in name else 1)
                for name, fn in rows.items()}
        accuracy = {}
        for name, fn in rows.items():
            predicted = np.concatenate([fn(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)])
            accuracy[name] = task_score(task.metric, predicted, gold)
        layers = {name: float(np.mean([r.layers_run for i in range(0, len(texts), args.batch)
                                       for r in engine.classify(texts[i:i + args.batch])]))
                  for name, engine in engines.items()}
        timing = measure(rows, sample, args.repeats, args.batch)
    profile = {}
    for name, engine in engines.items():
        torch.set_num_threads(threads if engine.backbone.runtime == "torch" else 1)
        profile[name] = {size: stage_profile(engine, sample, size) for size in (1, args.batch)}
    grpc = (grpc_rows(args.store, task.name, texts, args.grpc_clients, args.grpc_seconds, args.grpc_rounds, threads)
            if args.grpc_clients else None)
    report(args, task, reference, threads, accuracy, layers, timing, profile, grpc, len(texts))
    return 0


def report(args, task, reference: Engine, threads: int, accuracy, layers, timing, profile, grpc, n: int) -> None:
    whole = {precision: timing[f"onnxruntime whole model, full depth, {precision}"] for precision in ("fp32", "int8")}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads"
    policy = reference.calibrated().name
    print(f"\n## {task.name}: {n} test texts ({task.metric}), timing on {min(args.sample, n)} of them, "
          f"{args.repeats} interleaved repeats; {machine}; backbone {reference.backbone.source}, "
          f"{reference.num_layers} layers; served policy (the store's calibrated one) {policy}\n")
    print("| how | score | layers run | batch-1 p50 ms | batch-1 p99 ms | batch-32 texts/s | "
          "vs whole-model onnxruntime (same precision): p50 / throughput |")
    print("|---|---|---|---|---|---|---|")
    out_rows = []
    for name, t in timing.items():
        precision = "int8" if "int8" in name else "fp32"
        base = whole[precision]
        run = next((v for k, v in layers.items() if name.endswith(k) and "served" in name), None)
        run = run if run is not None else reference.num_layers
        print(f"| {name} | {100 * accuracy[name]:.2f} | {run:.2f} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | "
              f"{t['texts_per_s']:.0f} | {t['p50_ms'] / base['p50_ms']:.2f}x / "
              f"{t['texts_per_s'] / base['texts_per_s']:.2f}x |")
        out_rows.append({"row": name, "score": accuracy[name], "layers_run": run, **t,
                         "p50_vs_whole_onnxruntime": t["p50_ms"] / base["p50_ms"],
                         "throughput_vs_whole_onnxruntime": t["texts_per_s"] / base["texts_per_s"]})
    cut, one = timing["raee per-layer graphs, full depth, onnxruntime fp32"], whole["fp32"]
    calls = reference.num_layers + 1  # the embeddings graph and one per layer, against one graph
    per_call = {"batch 1 (p50)": (cut["p50_ms"] - one["p50_ms"]) / calls,
                f"batch {args.batch} (per batch)": (args.batch / cut["texts_per_s"] - args.batch / one["texts_per_s"])
                * 1e3 / calls}
    print(f"\nCost of cutting the model into {calls} graphs, per graph call: " +
          ", ".join(f"{k} {v:+.3f} ms" for k, v in per_call.items()) +
          f" (whole model: {one['p50_ms']:.2f} ms at batch 1)")
    print("\nWhere the served policy's time goes (ms per text; key = tokenizing, embeddings and the key's layers):\n")
    print("| runtime | batch | key | search | rest of the backbone |")
    print("|---|---|---|---|---|")
    for name, by_size in profile.items():
        for size, stages in by_size.items():
            print(f"| {name} | {size} | {stages['key']:.3f} | {stages['search']:.3f} | {stages['backbone']:.3f} |")
    if grpc:
        base = whole["fp32"]
        print(f"\nOver gRPC: {args.grpc_clients} closed-loop clients, one text per request, raee-serve on "
              f"{args.store} (onnxruntime fp32); medians of {args.grpc_rounds} alternating rounds of "
              f"{args.grpc_seconds:.0f} s\n")
        print("| policy | texts/s | p50 ms | p99 ms | status codes |")
        print("|---|---|---|---|---|")
        for policy, r in grpc.items():
            print(f"| {policy} | {r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['codes']} |")
        from load import print_server_profiles

        print()
        print_server_profiles({policy: r["server"] for policy, r in grpc.items()})
        ratio = grpc["calibrated"]["texts_per_s"] / grpc["full"]["texts_per_s"]
        print(f"\nserved policy / full depth on the same server: {ratio:.2f}x; whole-model onnxruntime in process "
              f"(no gRPC), batch {args.batch}: {base['texts_per_s']:.0f} texts/s (as one padded batch: "
              f"{timing['onnxruntime whole model, full depth, fp32, one padded batch']['texts_per_s']:.0f}), "
              f"batch 1: {1e3 / base['p50_ms']:.0f} texts/s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "task": task.name, "n": n, "machine": machine, "policy": policy, "rows": out_rows,
            "graph_call_overhead_ms": per_call,
            "stage_ms_per_text": profile, "grpc": grpc, "args": vars(args)}, indent=2))


def _fresh_model(backbone: Backbone) -> torch.nn.Module:
    """The checkpoint loaded anew the ordinary way (transformers Auto class, fp32, eval), as a user would."""
    import transformers

    _, path = resolve_source(backbone.source)
    auto = transformers.AutoModel if backbone.kind == "sentence-encoder" else transformers.AutoModelForMaskedLM
    return auto.from_pretrained(path, local_files_only=True).eval()


def whole_graph(model: torch.nn.Module, workdir: Path, int8: bool, threads: int):
    """The whole model as one onnxruntime session (int8: dynamically quantized) on `threads` intra-op threads: the
    graph a user would export, the baseline raee's rows are compared with."""
    import onnxruntime as ort

    class Whole(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits

    path = workdir / f"whole-{id(model)}.onnx"
    dims = {0: "batch", 1: "tokens"}
    ids = torch.ones((2, 8), dtype=torch.long)
    torch.onnx.export(Whole(model).eval(), (ids, torch.ones_like(ids)), str(path), opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["out"],
                      dynamic_axes={"input_ids": dims, "attention_mask": dims, "out": dims})
    model.eval()
    if int8:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantized = path.with_suffix(".int8.onnx")
        logging.disable(logging.WARNING)  # the quantizer's per-tensor notes, on the root logger
        try:
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        path = quantized
    # The raee rows' pool (onnxruntime's process-wide one, spinning between calls as a lone session's pool does), of
    # `threads` threads. Not torch.get_num_threads(): raee sets torch to one thread once its layers move onto
    # onnxruntime, and a baseline sized by that ran single-threaded.
    options = session_options(threads)
    if runtime.onnxruntime_pool not in (None, threads):
        made = runtime.onnxruntime_pool or "an unknown number of"
        raise SystemExit(f"baselines: onnxruntime's pool was made with {made} threads, the rows are measured on "
                         f"{threads}")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


if __name__ == "__main__":
    sys.exit(main())
