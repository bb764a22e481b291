"""bench/load.py's server profile: the Prometheus page read back sample by sample (service.launch.metric_values), and
the per-batch figures made from two samples of a server's metrics and CPU times."""

from __future__ import annotations

import pytest

from service.launch import metric_values
from tests.bench_scripts import load_bench

PAGE = """# HELP raee_batch_size Rows per backbone batch
# TYPE raee_batch_size histogram
raee_batch_size_bucket{le="8.0"} 3.0
raee_batch_size_sum 21.0
raee_batch_size_count 3.0
raee_batch_seconds_sum 0.06
raee_stage_seconds_sum{stage="queue"} 0.021
raee_stage_seconds_count{stage="queue"} 21.0
raee_stage_seconds_sum{stage="key"} 0.42
raee_stage_seconds_sum{stage="search"} 0.063
raee_stage_seconds_sum{stage="backbone"} 0.105
"""


def test_metric_values_reads_every_sample_with_its_labels():
    values = metric_values(PAGE)
    assert values["raee_batch_size_count"] == 3.0
    assert values['raee_stage_seconds_sum{stage="key"}'] == 0.42
    assert values['raee_batch_size_bucket{le="8.0"}'] == 3.0
    assert not any(name.startswith("#") for name in values)


def test_server_profile_per_batch_figures():
    bench = load_bench("load")
    zero = {name: 0.0 for name in metric_values(PAGE)}
    before = bench.ServerSample(zero, server_cpu_s=10.0, client_cpu_s=1.0)
    after = bench.ServerSample(metric_values(PAGE), server_cpu_s=10.3, client_cpu_s=1.021)
    before.at, after.at = 100.0, 100.5  # half a second apart
    profile = bench.server_profile(before, after, texts=21)
    assert profile["batches_per_s"] == pytest.approx(6.0)
    assert profile["texts_per_batch"] == pytest.approx(7.0)
    assert profile["engine_busy"] == pytest.approx(0.12)  # 60 ms of engine time in 500 ms
    assert profile["engine_ms_per_batch"] == pytest.approx(20.0)
    assert profile["outside_engine_ms_per_batch"] == pytest.approx(440 / 3)  # the rest of the 500 ms, per batch
    assert profile["key_ms"] == pytest.approx(20.0)  # 21 requests observed 420 ms of key time
    assert profile["queue_ms"] == pytest.approx(1.0)
    assert profile["server_cpu_cores"] == pytest.approx(0.6)
    assert profile["server_cpu_ms_per_text"] == pytest.approx(300 / 21)
    assert profile["client_cpu_ms_per_text"] == pytest.approx(1.0)
