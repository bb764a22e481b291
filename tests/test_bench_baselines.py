"""bench/baselines.py: the whole-model baseline (the one ONNX graph a user would export) runs on the pool the raee rows
run on, even after raee has set torch to one thread (its layers moved onto onnxruntime); the timing loop takes rows
in short turns, times every text once a repeat, and leaves out what a row pays for the row before it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raee import runtime
from tests.bench_scripts import load_bench
from tests.tiny import tiny_backbone


@pytest.mark.slow
def test_the_whole_model_graph_runs_on_the_rows_pool_not_torchs_threads(tmp_path):
    bench = load_bench("baselines")
    model = tiny_backbone("bert-encoder").model.eval()
    threads = runtime.onnxruntime_pool or 2  # the pool raee's rows run on (made now if this test runs first)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what raee does once its layers run on onnxruntime
    try:
        session = bench.whole_graph(model, tmp_path, False, threads)
        with pytest.raises(SystemExit, match="pool was made with"):  # a baseline on other threads is refused
            bench.whole_graph(model, tmp_path, False, threads + 1)
    finally:
        torch.set_num_threads(before)
    assert not session.get_session_options().use_per_session_threads  # onnxruntime's process-wide pool
    assert runtime.onnxruntime_pool == threads
    ids = torch.tensor([[2, 7, 9, 11, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    np.testing.assert_allclose(out[:, :5], expected[:, :5], atol=1e-4)


def test_rows_take_short_turns_and_a_turns_cold_start_is_not_timed(monkeypatch):
    """A fake clock: each row costs its own time per text, and a call right after another row's costs 100 more (the
    caches that row filled). Latencies must show only the rows' own costs; every text is timed once per repeat."""
    bench = load_bench("baselines")
    clock, calls = [0.0], []

    def row(name, cost):
        def classify(texts):
            cold = 100.0 if calls and calls[-1][0] != name else 0.0
            calls.append((name, tuple(texts)))
            clock[0] += cold + cost * len(texts)
            return np.zeros(len(texts), dtype=int)
        return classify

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    texts = [f"text {i}" for i in range(58)]  # no batch of one among the batches of 8
    out = bench.measure({"fast": row("fast", 0.001), "slow": row("slow", 0.003)}, texts, 3, 8)
    assert out["fast"]["p50_ms"] == pytest.approx(1.0) and out["fast"]["p99_ms"] == pytest.approx(1.0)
    assert out["slow"]["p50_ms"] == pytest.approx(3.0) and out["slow"]["p99_ms"] == pytest.approx(3.0)
    batches = -(-len(texts) // 8)
    for name, cost in (("fast", 0.001), ("slow", 0.003)):  # a batch's cold start counts: at most one per batch
        assert len(texts) / (len(texts) * cost + 100.0 * batches) <= out[name]["texts_per_s"] <= 1 / cost
    singles = [name for name, t in calls if len(t) == 1]
    turns = sum(a != b for a, b in zip(singles, singles[1:])) + 1
    assert turns >= 2 * 3 * (-(-len(texts) // (bench.BLOCK - bench.WARM))) - 3 * 2  # a turn per row and block
    per_text = {t: 0 for t in texts}
    for name, t in calls:
        if name == "fast" and len(t) == 1:
            per_text[t[0]] += 1
    extra = bench.WARM * -(-len(texts) // (bench.BLOCK - bench.WARM))  # untimed texts per repeat
    assert sum(per_text.values()) == 3 * (len(texts) + extra)
    assert min(per_text.values()) >= 3  # every text at least once a repeat
