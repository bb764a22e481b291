"""bench/holdout.py's replay of a split, from a whole-file store's arrays, against the slow obvious way: a store built
from A alone, its calibration evidence, and raee-eval scoring B's texts with it."""

from __future__ import annotations

import pytest

from raee.build import build_store
from raee.calibration import CalibrationSettings
from raee.data import read_examples
from raee.engine import Engine
from raee.evaluation import Evaluator
from raee.index import keys_of
from raee.keys import KeySpec
from raee.store import load_store
from raee.tasks import BUILTIN_TASKS
from tests.bench_scripts import load_bench
from tests.tiny import tiny_backbone

TASK = BUILTIN_TASKS["sst2"]


def test_a_replayed_split_equals_a_store_built_from_a_scored_on_b(sst2_like, tmp_path):
    bench = load_bench("holdout")
    backbone = tiny_backbone("bert-encoder")
    examples = read_examples(sst2_like, TASK)
    # A tiny store: match-full could only serve full depth. The tiny model's layers mostly agree, so this checks which
    # items, store, rule and gate each side uses, not the size of any difference.
    settings = CalibrationSettings(objective="best")
    key = KeySpec("prefix", 1)
    build_store(tmp_path / "whole", TASK, backbone, examples, key=key, settings=settings, progress=False)
    whole = load_store(tmp_path / "whole")
    replay = bench.one_split(whole, keys_of(whole.index), 0.7, seed=3)

    a, b = bench.split(len(examples), 0.7, seed=3)
    build_store(tmp_path / "a", TASK, backbone, [examples[i] for i in a], key=key, settings=settings,
                progress=False)
    engine = Engine(load_store(tmp_path / "a"), backbone)
    evidence = engine.store.calibration_evidence
    chosen = evidence.curve[evidence.chosen]
    result = Evaluator(engine, [examples[i] for i in b], ["full", "calibrated"],
                       progress=False).evaluate("calibrated", timing_sample=0)
    assert replay["policy"] == engine.calibrated().name != "full"
    assert replay["estimate"] == pytest.approx(chosen.accuracy - evidence.full_accuracy)
    assert (replay["helps"], replay["harms"]) == (result.helps, result.harms)
    assert replay["realized"] == pytest.approx(result.accuracy - result.accuracy_full)
    assert replay["off_domain"] == pytest.approx(result.off_domain)
    assert len(replay["path"]) == 151 and replay["path"][0] == (0.0, 0.0)  # margin 1: full depth on both sides
