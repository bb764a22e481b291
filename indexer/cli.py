"""raee-index: build, inspect, merge and tune exit stores. Run `raee-index COMMAND --help` for each command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from raee.build import BATCH_SIZE
from raee.calibration import CalibrationSettings
from raee.errors import InputError, RaeeError
from raee.exit_policy import OBJECTIVES
from raee.index import INDEX_TYPES, IndexSpec
from raee.kinds import DEFAULT_SCALE, KIND_HELP, KINDS
from raee.raee_rule import RaeeConfig
from raee.runtime import DEFAULT_DTYPE, DTYPE_NAMES, ONNXRUNTIME_PRECISIONS, RUNTIMES
from raee.tasks import BUILTIN_TASKS
from raee.tuning import HOLDOUT

log = logging.getLogger("raee-index")
SETTINGS, RAEE, INDEX = CalibrationSettings(), RaeeConfig(), IndexSpec()


def _backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=None, metavar="PATH",
                   help="local checkpoint directory (default: the embedded all-MiniLM-L6-v2)")
    g.add_argument("--kind", default="auto", choices=["auto", *KINDS], metavar="KIND",
                   help="backbone kind, read from the checkpoint by default: " +
                        "; ".join(f"{kind}: {text}" for kind, text in KIND_HELP.items()))
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_NAMES, help=f"(default {DEFAULT_DTYPE})")
    g.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help="sentence-encoder kind: cosine scale, i.e. inverse softmax temperature "
                        f"(default: {DEFAULT_SCALE:g})")
    g.add_argument("--embedder", default=None, metavar="PATH",
                   help="sentence-transformers model for embedder keys (default: the embedded all-MiniLM-L6-v2)")
    runtime_args(g, store_precision=False)


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like 2 or 1,2, got {text!r}") from None


def runtime_args(g: argparse._ActionsContainer, store_precision: bool) -> None:
    """--runtime, --precision, --threads and --cache-dir: how the backbone runs (raee.runtime)."""
    g.add_argument("--runtime", default=os.environ.get("RAEE_RUNTIME", "auto"), choices=RUNTIMES,
                   help="auto (default; RAEE_RUNTIME): onnxruntime on the CPU for the encoder families that export "
                        "(BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, sentence encoders), torch elsewhere")
    g.add_argument("--precision", default=None, choices=ONNXRUNTIME_PRECISIONS,
                   help="onnxruntime precision: fp32, or int8 (dynamic quantization; it changes per-layer "
                        "predictions, so stores record it); torch runs in its --dtype " +
                        ("(default: the store's own)" if store_precision else "(default fp32)"))
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for torch, onnxruntime and FAISS (default: RAEE_THREADS, else the container's CPU "
                        "quota)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where onnxruntime exports and self-check verdicts are kept (default: RAEE_CACHE_DIR, else "
                        "~/.cache/raee)")


def quiet_progress(args: argparse.Namespace) -> None:
    """Progress bars only on a terminal: --no-progress is implied when stderr is not one (a log file, a pipe, a
    Job's log), and third-party bars (transformers' weight loading) are off whenever ours are."""
    if not sys.stderr.isatty():
        args.no_progress = True
    if getattr(args, "no_progress", True):
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated in transformers


def require_plotting(*paths: str | None) -> None:
    """InputError now if a plot is asked for and matplotlib is missing: not after the store is written."""
    if any(paths):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install 'raee[plot]' (or matplotlib), or drop --plot") \
                from None


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, help=f"built-in task name ({', '.join(BUILTIN_TASKS)}) "
                                                 "or a YAML/JSON task file")
    p.add_argument("--train", required=True, metavar="FILE", help="labelled calibration data: JSONL, CSV or TSV")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="read only the first N items")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, metavar="N",
                   help=f"items per backbone batch (default {BATCH_SIZE})")


def _shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit()):
        raise argparse.ArgumentTypeError(f"shard {text!r} is not I/N")
    return int(i), int(n)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="raee-index", description=__doc__)
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="run the backbone over calibration data and write an exit store",
                       description="Run the backbone over every labelled item, record which layers answer it "
                                   "correctly, key it, and write a new version of the exit store at --out.")
    _data_args(b)
    b.add_argument("--out", required=True, metavar="DIR", help="store directory (a new version is added)")
    b.add_argument("--key", default=None, metavar="embedder|prefix:K|auto[:K1,K2,...]",
                   help="retrieval key: a sentence embedding, or the backbone's mean-pooled layer-K state, which "
                        "the serving pass reuses; auto (the default; README: 'Why the default key'): calibrate "
                        "with each prefix key (default 1 and 2) at delta over their number and keep the one the "
                        "objective prefers (match-full: fewest layers; best: highest score). A shard cannot "
                        "choose (merging calibrates): give every shard the same prefix:K")
    b.add_argument("--index", default=INDEX.type, choices=INDEX_TYPES,
                   help=f"FAISS index (default {INDEX.type}: exact search over float16 keys, half the memory a "
                   "search reads; flat: over float32 keys; hnsw, ivf: approximate). The build calibrates with the "
                   "index it serves")
    b.add_argument("--like", default=None, metavar="STORE",
                   help="build as STORE (the one serving) was: its task, backbone, key, index, exit-rule and "
                        "calibration settings, runtime and precision, so that replicas accept the new version "
                        "(--backbone only where the checkpoint moved; its weights are checked)")
    b.add_argument("--no-promote", action="store_true",
                   help="write the version without switching CURRENT (roll it out with raee-admin rollout)")
    c = b.add_argument_group(
        "calibration", "The store serves, by default, a policy calibrated here on the calibration items alone "
        "(leave-one-out); its evidence, the calibration curve, is saved with it (raee-index inspect --plot).")
    c.add_argument("--objective", default=SETTINGS.objective, choices=OBJECTIVES,
                   help="match-full: the fewest layers whose accuracy is at most --epsilon below full depth's, "
                        "with probability 1 - --delta (exact test, fixed-sequence over the rule's settings); "
                        "best: the highest calibration score among settings that run at most --depth-budget of "
                        "the layers on average with probability 1 - --delta (exact betting test, fixed-sequence "
                        "over each path); raee: faithful RAEE "
                        f"(default {SETTINGS.objective})")
    c.add_argument("--epsilon", type=float, default=SETTINGS.epsilon,
                   help=f"match-full: accuracy loss allowed, a share (default {SETTINGS.epsilon} = 0.5 point)")
    c.add_argument("--delta", type=float, default=SETTINGS.delta,
                   help=f"match-full, best: chance the guarantee may fail (default {SETTINGS.delta})")
    c.add_argument("--query-items", type=int, default=SETTINGS.query_items, metavar="M",
                   help="match-full: the accuracy guarantee also holds as measured on a file of M queries, whose "
                        "own scatter it allows for (normal approximation); 0 = in expectation only (default "
                        f"{SETTINGS.query_items})")
    c.add_argument("--depth-budget", type=float, default=SETTINGS.depth_budget, metavar="F",
                   help=f"best: share of layers run allowed on average (default {SETTINGS.depth_budget})")
    c.add_argument("--gate-alpha", type=float, default=SETTINGS.gate_alpha,
                   help="off-domain gate: share of in-domain queries its per-query tests (far, disagree) send to "
                        f"full depth; 0 = none (default {SETTINGS.gate_alpha})")
    c.add_argument("--stream-p", type=float, default=SETTINGS.stream_p,
                   help="off-domain gate: in-domain false alarms per query of its stream test; 0 = none "
                        f"(default {SETTINGS.stream_p})")
    c.add_argument("--k", type=int, default=RAEE.k, help=f"faithful RAEE's neighbours (policy raee; {RAEE.k})")
    c.add_argument("--tau", type=float, default=RAEE.tau,
                   help=f"faithful RAEE's record threshold (policy raee; {RAEE.tau})")
    b.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="build only the I-th of N contiguous parts; join parts with raee-index merge")
    b.add_argument("--plot", default=None, metavar="PNG", help="also draw per-layer accuracy and exits")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _backbone_args(b)

    i = sub.add_parser("inspect", help="print a store's manifest, its earliest-correct-layer histogram and the "
                                       "calibrated policy with its evidence")
    i.add_argument("store", metavar="DIR")
    i.add_argument("--plot", default=None, metavar="PNG", help="also draw per-layer accuracy and exits")
    i.add_argument("--calibration-plot", default=None, metavar="PNG",
                   help="also draw the calibration curve: score and risk bound against layers run")

    m = sub.add_parser("merge", help="join shard stores into one store",
                       description="Join the parts written by build --shard I/N into a store that answers "
                                   "exactly as an unsharded build.")
    m.add_argument("out", metavar="OUT")
    m.add_argument("parts", nargs="+", metavar="PART")
    m.add_argument("--no-promote", action="store_true",
                   help="write the version without switching CURRENT (roll it out with raee-admin rollout)")

    e = sub.add_parser("export", help="export a backbone for the onnxruntime runtime into the cache (for images)",
                       description="Export a backbone's graphs for --runtime onnxruntime into the cache directory "
                                   "and check them against torch, so that a read-only deployment can ship them "
                                   "(run it at image build with --cache-dir pointing inside the image).")
    _backbone_args(e)
    e.add_argument("--prefix-layers", type=_layer_list, default=(), metavar="K[,K...]",
                   help="also export the prefix graphs (embeddings and layers 1..K as one graph) for stores keyed "
                        "prefix:K; a server builds a missing one at start")

    t = sub.add_parser("tune", help="choose key, scale, k and tau on a held-out split of the calibration data",
                       description="Split the train file (seeded) into a store part and a held-out part, run the "
                                   "backbone once, and score every combination on the held-out part. The test "
                                   "split is never read.")
    _data_args(t)
    t.add_argument("--holdout", type=float, default=HOLDOUT, help=f"share of items held out (default {HOLDOUT})")
    t.add_argument("--keys", default="prefix:0,prefix:1,prefix:2,embedder", help="comma-separated key sources")
    t.add_argument("--scales", default="10,20,40,80", help="sentence-encoder scales to try")
    t.add_argument("--ks", default="4,12,32", help="neighbour counts to try")
    t.add_argument("--taus", default="0.6,0.75,0.9", help="record thresholds to try")
    t.add_argument("--ratios", default="1,0.9,0.8,0.7,0.6,0.5", help="earliest ratios A to try (1 = RAEE)")
    t.add_argument("--show", type=int, default=25, help="table rows to print, best first (25)")
    t.add_argument("--depth-budget", type=float, default=SETTINGS.depth_budget,
                   help="choose the best score among settings certified to run at most this share of layers "
                        f"on the held-out items (default {SETTINGS.depth_budget}, as build's)")
    t.add_argument("--delta", type=float, default=SETTINGS.delta,
                   help=f"chance the depth budget's certificate may fail (default {SETTINGS.delta}, as build's)")
    t.add_argument("--index", default=INDEX.type, choices=INDEX_TYPES,
                   help=f"FAISS index the trials search (default {INDEX.type}, as build's)")
    t.add_argument("--json", default=None, metavar="OUT", help="write every trial as JSON")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    _backbone_args(t)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from indexer import commands
    from raee import cache
    from raee.runtime import configure_threads
    quiet_progress(args)
    try:
        require_plotting(getattr(args, "plot", None), getattr(args, "calibration_plot", None))
        cache.use(getattr(args, "cache_dir", None))
        configure_threads(getattr(args, "threads", None))
        return getattr(commands, args.command)(args)
    except RaeeError as exc:
        print(f"raee-index {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a plot or JSON path that cannot be written, a disk that fills
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"raee-index {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
