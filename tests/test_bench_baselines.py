"""bench/baselines.py's whole-model baseline: the one ONNX graph a user would export runs on the pool the raee rows
run on, even after raee has set torch to one thread (its layers moved onto onnxruntime)."""

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
