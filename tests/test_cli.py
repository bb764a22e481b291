"""raee-index and raee-eval end to end on a tiny checkpoint saved as a user would bring one."""

from __future__ import annotations

import json

import pytest

from indexer.cli import main as raee_index
from indexer.evaluate import main as raee_eval
from tests.tiny import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_checkpoint("bert-mlm", tmp_path_factory.mktemp("ckpt") / "bert"))


@pytest.mark.slow
def test_build_inspect_eval(checkpoint, sst2_like, tmp_path, capsys):
    store = tmp_path / "store"
    args = ["build", "--task", "sst2", "--train", str(sst2_like), "--out", str(store), "--backbone", checkpoint,
            "--key", "prefix:1", "--no-progress", "--plot", str(tmp_path / "layers.png"), "--objective", "best",
            "--depth-budget", "0.5"]
    assert raee_index(args) == 0
    out = capsys.readouterr().out
    assert "earliest-correct items" in out and "items/s" in out and "240 items" in out
    assert ("calibrated policy (objective best: the best calibration score among settings certified to run at most "
            "50% of the layers with probability 0.9") in out
    assert (tmp_path / "layers.png").stat().st_size > 1000
    assert raee_index(["inspect", str(store), "--calibration-plot", str(tmp_path / "calibration.png")]) == 0
    out = capsys.readouterr().out
    assert '"fingerprint"' in out and "checksums verified" in out and '"calibrated_policy"' in out
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    assert raee_eval(["--store", str(store), "--test", str(sst2_like), "--policies", "raee,full,static:1",
                      "--limit", "40", "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["n"] == 40 and set(figures["policies"]) == {"raee", "full", "static:1"}
    assert figures["policies"]["static:1"]["avg_exit_layer"] == 1.0


@pytest.mark.slow
def test_shards_and_merge(checkpoint, sst2_like, tmp_path, capsys):
    from raee.store import load_store
    parts = []
    for i in range(2):
        parts.append(str(tmp_path / f"p{i}"))
        assert raee_index(["build", "--task", "sst2", "--train", str(sst2_like), "--out", parts[-1], "--backbone",
                           checkpoint, "--shard", f"{i}/2", "--key", "prefix:1", "--no-progress"]) == 0
    assert raee_index(["merge", str(tmp_path / "merged"), *parts]) == 0
    assert "240 items" in capsys.readouterr().out
    assert str(load_store(tmp_path / "merged").key) == "prefix:1"


@pytest.mark.slow
def test_tune_reports_a_choice(checkpoint, sst2_like, tmp_path, capsys):
    assert raee_index(["tune", "--task", "sst2", "--train", str(sst2_like), "--backbone", checkpoint,
                       "--keys", "prefix:0,prefix:1", "--ks", "4,12", "--taus", "0.9", "--no-progress",
                       "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and "raee-index build" in out
    assert f"--backbone {checkpoint}" in out.split("build with: ")[1]  # else the build would use the default model
    assert len(json.loads((tmp_path / "t.json").read_text())["trials"]) == 2 * 2 * 1 * 6


def test_errors_exit_2_with_a_message(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "", "label": "positive"}\n')
    assert raee_index(["build", "--task", "sst2", "--train", str(bad), "--out", str(tmp_path / "s"),
                       "--backbone", checkpoint]) == 2
    assert "bad.jsonl:1: empty text" in capsys.readouterr().err
    assert raee_index(["inspect", str(tmp_path)]) == 2
    assert "not an exit store" in capsys.readouterr().err
    assert raee_index(["build", "--task", "sst2", "--train", str(bad), "--out", str(tmp_path / "s"),
                       "--backbone", checkpoint, "--epsilon", "2"]) == 2
    assert "epsilon must lie in [0, 1)" in capsys.readouterr().err
    assert raee_index(["build", "--task", "sst2", "--train", str(bad), "--out", str(tmp_path / "s"),
                       "--backbone", checkpoint, "--query-items", "-5"]) == 2
    assert "query items must be 0 or more, got -5" in capsys.readouterr().err


def test_an_unwritable_out_fails_in_one_line_before_any_model_runs(tmp_path, sst2_like, monkeypatch, capsys):
    import indexer.commands
    monkeypatch.setattr(indexer.commands, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    (tmp_path / "file").write_text("not a directory")
    assert raee_index(["build", "--task", "sst2", "--train", str(sst2_like), "--out", str(tmp_path / "file" / "s"),
                       "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the store: Not a directory" in err


@pytest.mark.slow
def test_an_os_error_while_writing_is_one_line_and_exit_2(checkpoint, sst2_like, tmp_path, monkeypatch, capsys):
    import raee.store

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(raee.store, "write_synced", disk_full)
    assert raee_index(["build", "--task", "sst2", "--train", str(sst2_like), "--out", str(tmp_path / "s"),
                       "--backbone", checkpoint, "--limit", "20", "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("raee-index")]  # beside transformers' own bars
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err


@pytest.mark.slow
def test_export_writes_the_prefix_graphs_asked_for(checkpoint, capsys):
    from raee import cache

    assert raee_index(["export", "--backbone", checkpoint, "--prefix-layers", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "exported its prefix graph to layer 1" in out and "exported its prefix graph to layer 2" in out
    exported = {p.name.split("-", 1)[1] for p in (cache.cache_dir() / "onnx").glob("*-prefix*-fp32")}
    assert {"prefix1-fp32", "prefix2-fp32"} <= exported


@pytest.mark.slow
def test_build_chooses_its_key(checkpoint, sst2_like, tmp_path, capsys):
    from raee.store import load_store
    plain = tmp_path / "plain"  # no --key: auto, between prefix:1 and prefix:2
    assert raee_index(["build", "--task", "sst2", "--train", str(sst2_like), "--out", str(plain), "--backbone",
                       checkpoint, "--no-progress"]) == 0
    assert [t.key for t in load_store(plain).calibration_evidence.keys] == ["prefix:1", "prefix:2"]
    store = tmp_path / "store"
    assert raee_index(["build", "--task", "sst2", "--train", str(sst2_like), "--out", str(store), "--backbone",
                       checkpoint, "--key", "auto:0,1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    built = load_store(store)
    trials = built.calibration_evidence.keys
    assert [t.key for t in trials] == ["prefix:0", "prefix:1"] and all(t.delta == 0.05 for t in trials)
    fewest = min(trials, key=lambda t: (t.layers_run, -t.score))
    assert str(built.key) == fewest.key and f"key {built.key}, index" in out
    assert f"key {built.key}, chosen of 2 (each calibrated at delta 0.05)" in out
    assert built.calibrated_policy.settings.delta == 0.1


def test_a_shard_cannot_choose_its_key_and_is_refused_before_any_model_runs(tmp_path, sst2_like, monkeypatch,
                                                                            capsys):
    import indexer.commands
    monkeypatch.setattr(indexer.commands, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    for key in (["--key", "auto"], []):  # auto, given or by default
        assert raee_index(["build", "--task", "sst2", "--train", str(sst2_like), "--out", str(tmp_path / "s"),
                           *key, "--shard", "0/2", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "shard" in err and "prefix:K" in err
