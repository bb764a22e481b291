"""The raee-index commands: each takes parsed arguments, does one job, prints what it did, returns an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

from indexer.summary import calibration_summary, layer_table, plot_calibration, plot_layers
from raee.backbones import Backbone, SentenceEncoderBackbone, load_backbone
from raee.build import build_store, calibration_settings, check_key_choice, merge_stores, run_calibration_pass
from raee.calibration import CalibrationSettings
from raee.data import Example, read_examples
from raee.engine import load_backbone_for
from raee.errors import BackboneError, InputError
from raee.index import IndexSpec
from raee.keys import DEFAULT_KEY, Embedder, KeySpec, parse_key_choice
from raee.raee_rule import RaeeConfig
from raee.runtime import DEFAULT_DTYPE
from raee.store import load_store, read_manifest
from raee.tasks import TaskDefinition, load_task
from raee.tuning import choose, grid_search
from raee.versions import check_store_root, current_version, resolve_version

log = logging.getLogger("raee-index")


def _load(args: argparse.Namespace) -> tuple[TaskDefinition, list[Example], Backbone]:
    task = load_task(args.task)
    examples = read_examples(args.train, task, text_column=args.text_column, label_column=args.label_column,
                             limit=args.limit)
    return task, examples, _backbone(args)


def _backbone(args: argparse.Namespace) -> Backbone:
    return load_backbone(args.backbone, kind=args.kind, device=args.device, dtype=args.dtype, scale=args.scale,
                         runtime=args.runtime, precision=args.precision)


def backbone_flags(args: argparse.Namespace) -> str:
    """The backbone options a command was given, as flags for the build command it recommends (without them the
    build would silently run on the default model)."""
    given = {"--backbone": args.backbone, "--kind": args.kind, "--dtype": args.dtype, "--runtime": args.runtime,
             "--precision": args.precision, "--embedder": args.embedder, "--text-column": args.text_column,
             "--label-column": args.label_column}
    defaults = {"--kind": "auto", "--dtype": DEFAULT_DTYPE, "--runtime": "auto", "--text-column": "text",
                "--label-column": "label"}
    return "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in given.items()
                   if value is not None and value != defaults.get(flag))


# What build --like takes from the serving store, as the flags that would set it otherwise.
LIKE_FLAGS = ("key", "index", "objective", "epsilon", "delta", "query_items", "depth_budget", "gate_alpha", "stream_p",
              "k", "tau", "kind", "dtype", "scale", "runtime", "precision", "embedder")


def build(args: argparse.Namespace) -> int:
    if args.like:
        return build_like(args)
    if args.task is None:
        raise InputError("build needs --task (or --like STORE, which takes it from a store)")
    settings = CalibrationSettings(args.objective, args.epsilon, args.delta, args.query_items, args.depth_budget,
                                   args.gate_alpha, args.stream_p)  # bad settings are refused before anything loads
    policy = RaeeConfig(k=args.k, tau=args.tau)
    check_store_root(args.out)  # a wrong --out fails now, not after loading the model and the calibration pass
    if args.key is None and args.shard is not None:
        raise InputError("a shard cannot choose its key (merging calibrates), and the default is to choose (auto): "
                         "give every shard the same --key prefix:K")
    keys = parse_key_choice(args.key or DEFAULT_KEY)
    check_key_choice(keys, args.shard)  # before the model loads
    task, examples, backbone = _load(args)
    embedder = Embedder(args.embedder, device=args.device) if keys[0].source == "embedder" else None
    return _build_and_report(args, task, examples, backbone, keys, embedder, IndexSpec(args.index), policy,
                             settings)


def build_like(args: argparse.Namespace) -> int:
    """A new version built as the serving store was: its task, backbone (weights checked), key, index, exit-rule
    and calibration settings, runtime and precision, so that every replica serving it accepts the new version."""
    from indexer.cli import parser
    defaults = parser().parse_args(["build", "--train", "x", "--out", "x"])
    given = [f"--{name.replace('_', '-')}" for name in LIKE_FLAGS if getattr(args, name) != getattr(defaults, name)]
    if given:
        raise InputError(f"--like takes {', '.join(given)} from {args.like}; drop {'them' if len(given) > 1 else 'it'}"
                         " (or build without --like)")
    like = read_manifest(resolve_version(args.like))
    if like.shard is not None:
        raise InputError(f"{args.like} is a shard; --like needs a store that serves (a merged or unsharded one)")
    task = like.task
    if args.task is not None and load_task(args.task) != task:
        raise InputError(f"--task {args.task} is not the task of {args.like} ({task.name}); drop --task")
    check_store_root(args.out)
    examples = read_examples(args.train, task, text_column=args.text_column, label_column=args.label_column,
                             limit=args.limit)
    backbone = load_backbone_for(like, source=args.backbone, device=args.device,
                                 runtime=like.backbone.runtime or "auto")
    if backbone.identity()["fingerprint"] != like.backbone.fingerprint:
        raise BackboneError(f"{backbone.source} has other weights than {args.like} was built with (fingerprint "
                            f"{backbone.identity()['fingerprint']}, store {like.backbone.fingerprint}); replicas "
                            "serving it would refuse the new version")
    embedder = Embedder(like.embedder.source, device=args.device) if like.embedder is not None else None
    print(f"building like {like.task.name} {like.version}: key {like.key}, index {like.index.type}, "
          f"{like.backbone.kind} {backbone.source} on {backbone.runtime} {backbone.precision}")
    return _build_and_report(args, task, examples, backbone, like.key, embedder, like.index, like.policy,
                             calibration_settings(like))


def _build_and_report(args: argparse.Namespace, task: TaskDefinition, examples: list[Example], backbone: Backbone,
                      key: KeySpec | tuple[KeySpec, ...], embedder: Embedder | None, index_spec: IndexSpec,
                      policy: RaeeConfig, settings: CalibrationSettings) -> int:
    version, calibration = build_store(
        args.out, task, backbone, examples, key=key, embedder=embedder, index_spec=index_spec,
        policy=policy, settings=settings, batch_size=args.batch_size, shard=args.shard,
        source_file=str(args.train), progress=not args.no_progress, promote=not args.no_promote)
    print(f"\nexit store {version}  (task {task.name}, {backbone.kind} {backbone.source} on {backbone.runtime} "
          f"{backbone.precision}, key {read_manifest(version).key}, index {index_spec.type})")
    if args.no_promote:
        print(f"CURRENT still names {current_version(args.out)}: roll {version.name} out with raee-admin rollout")
    print(layer_table(calibration.records))
    store = load_store(version)
    build = store.manifest.build
    print(f"\nindexed {calibration.records.num_items} items in {calibration.seconds:.1f} s "
          f"({calibration.items_per_second:.0f} items/s); with the index and calibration "
          f"{build['seconds_total']:.1f} s ({build['items_per_second_total']:.0f} items/s)")
    if store.calibration_evidence is not None:
        print(calibration_summary(store, store.calibration_evidence))
    else:
        print("a shard: the merged store is calibrated when the shards are merged (raee-index merge)")
    if args.plot:
        plot_layers(calibration.records, args.plot, f"{task.name}: {backbone.source}")
        print(f"plot written to {args.plot}")
    return 0


def export(args: argparse.Namespace) -> int:
    from raee.backbones.onnx import OnnxRuntimeFamily
    backbone = _backbone(args)
    if not isinstance(backbone.family, OnnxRuntimeFamily):
        print(f"raee-index export: {backbone.source} runs on {backbone.runtime}; nothing to export")
        return 0
    for depth in args.prefix_layers:
        if not 0 <= depth <= backbone.max_prefix_layer:
            raise InputError(f"--prefix-layers: {depth} is not a layer of this backbone's prefix keys "
                             f"(0..{backbone.max_prefix_layer})")
    print(f"exported {backbone.source} ({backbone.family.name}, {backbone.precision}) to {backbone.family.directory}")
    for depth in args.prefix_layers:
        if not backbone.prepare_prefix(depth):  # an image built without it would serve slower, unnoticed
            raise BackboneError(f"no usable prefix graph to layer {depth} (the warning above says why); a server "
                                "would compute those keys layer by layer")
        print(f"exported its prefix graph to layer {depth}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    store = load_store(args.store)
    print(f"store {store.path}  (checksums verified)")
    print(json.dumps(store.manifest.to_dict(), indent=2))
    print()
    print(layer_table(store.records))
    evidence = store.calibration_evidence
    if evidence is not None:
        print(calibration_summary(store, evidence))
    if args.plot:
        plot_layers(store.records, args.plot, f"{store.task.name}: {store.manifest.backbone.source}")
        print(f"plot written to {args.plot}")
    if args.calibration_plot:
        if evidence is None:
            print("this store holds no calibration evidence (a shard, or built before calibration)")
        else:
            plot_calibration(store, evidence, args.calibration_plot)
            print(f"calibration plot written to {args.calibration_plot}")
    return 0


def merge(args: argparse.Namespace) -> int:
    version = merge_stores(args.out, args.parts, promote=not args.no_promote)
    store = load_store(version)
    print(f"merged {len(args.parts)} shards into {version}: {store.records.num_items} items")
    if args.no_promote:
        print(f"CURRENT still names {current_version(args.out)}: roll {version.name} out with raee-admin rollout")
    return 0


def tune(args: argparse.Namespace) -> int:
    if args.task is None:
        raise InputError("tune needs --task")
    CalibrationSettings(delta=args.delta, depth_budget=args.depth_budget)  # refuses bad values before the model loads
    task, examples, backbone = _load(args)
    key_names = [k.strip() for k in args.keys.split(",") if k.strip()]
    specs = [KeySpec.parse(k) for k in key_names]
    prefix_layers = tuple(s.layer for s in specs if s.layer is not None)  # a prefix key's K
    # One pass gives logits at every layer and the pooled state of every prefix layer asked for.
    calibration = run_calibration_pass(backbone, task, examples, KeySpec("prefix", 0), None, args.batch_size,
                            not args.no_progress, extra_pooled_layers=prefix_layers)
    keys = {str(s): calibration.pooled[s.layer] if s.layer is not None else
            Embedder(args.embedder, device=args.device).encode(calibration.texts) for s in specs}
    encoder = backbone if isinstance(backbone, SentenceEncoderBackbone) else None
    scales: list[float | None] = [float(s) for s in args.scales.split(",")] if encoder else [None]
    results = grid_search(calibration.records, keys, task.metric, holdout=args.holdout, scales=scales,
                          base_scale=encoder.scale if encoder else None,
                          ks=[int(k) for k in args.ks.split(",")], taus=[float(t) for t in args.taus.split(",")],
                          ratios=[float(a) for a in args.ratios.split(",")],
                          seed=args.seed, depth_budget=args.depth_budget, delta=args.delta,
                          index_spec=IndexSpec(args.index))
    print(f"\nheld-out {task.metric} on {int(round(args.holdout * len(calibration.texts)))} of "
          f"{len(calibration.texts)} calibration items ({backbone.num_layers} layers)\n")
    print("| key | scale | k | tau | earliest ratio | score | full depth | avg exit | avg layers run | certified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (-r.score, r.avg_layers_run))[:args.show]:
        print(f"| {r.key} | {r.scale} | {r.k} | {r.tau} | {r.earliest_ratio} | {r.score:.4f} | {r.full_score:.4f} | "
              f"{r.avg_exit_layer:.2f} | {r.avg_layers_run:.2f} | {'yes' if r.within_budget else 'no'} |")
    best = choose(results, backbone.num_layers)
    scale_flag = f" --scale {best.scale:g}" if best.scale is not None else ""
    if not best.within_budget:
        print(f"\nno trial is certified within {args.depth_budget:.0%} of the layers: the cheapest is shown, "
              "without the guarantee")
    print(f"\nchosen (best score within {args.depth_budget:.0%} of the layers): key {best.key}, scale {best.scale}, "
          f"k {best.k}, tau {best.tau}, earliest ratio {best.earliest_ratio}: score {best.score:.4f} vs full depth "
          f"{best.full_score:.4f}, {best.avg_layers_run:.2f} layers run on average")
    if any(s.source == "embedder" for s in specs):
        print("note: 'layers run' counts backbone layers only; embedder keys also cost the embedder's own pass")
    print(f"build with: raee-index build --task {args.task} --train {args.train} --out DIR --key {best.key}"
          f"{scale_flag}{backbone_flags(args)}  (the build then calibrates the served exit rule itself: --objective)")
    if args.json:
        Path(args.json).write_text(json.dumps({"chosen": best.to_dict(), "trials": [r.to_dict() for r in results]},
                                              indent=2))
    return 0

