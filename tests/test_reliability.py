"""The quick versions of the scripted reliability checks (bench/reliability.py --quick) on the embedded model.

The checks whose verdict is a latency under load (the queue limit, idle streams, floods, a reload storm) run in
`make reliability` only: on a shared test machine their figures say more about the neighbours than about the
server. Their mechanisms are tested on tiny models in tests/test_attacks.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raee.backbones import load_backbone
from raee.build import build_store
from raee.data import read_examples
from raee.keys import KeySpec
from raee.tasks import BUILTIN_TASKS

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]
QUICK_CHECKS = ("reload", "bad-stores", "sigterm", "fuzz", "soak", "attack-hostile-stores", "attack-malformed",
                "attack-second-server", "attack-sigterm")


def test_quick_reliability_checks_all_pass(tmp_path):
    task = BUILTIN_TASKS["sst2"]
    examples = read_examples(ROOT / "data" / "sst2" / "train.jsonl", task, limit=400)
    build_store(tmp_path / "sst2", task, load_backbone(), examples, key=KeySpec("prefix", 2), progress=False)
    out = tmp_path / "reliability.json"
    run = subprocess.run([sys.executable, "bench/reliability.py", "--store", str(tmp_path / "sst2"), "--quick",
                          "--checks", ",".join(QUICK_CHECKS), "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    results = json.loads(out.read_text())["results"]
    failed = [r for r in results if not r["passed"]]
    assert run.returncode == 0 and not failed, failed or run.stdout[-3000:] + run.stderr[-3000:]
    assert len(results) == len(QUICK_CHECKS)
