"""Server settings: `admin: false` in a config file, booleans from RAEE_* environment variables and flags, and
the bounds of durations."""

from __future__ import annotations

import pytest

from raee.errors import InputError
from service.config import load_config


@pytest.mark.parametrize("written, expected", [("false", False), ("true", True), ("no", False), ("yes", True)])
def test_admin_from_a_config_file(tmp_path, written, expected):
    path = tmp_path / "serve.yaml"
    path.write_text(f"stores: [stores/sst2]\nadmin: {written}\nadmin_port: 0\n")
    assert load_config(["--config", str(path)], environ={}).admin is expected


def test_admin_false_in_the_environment_overrides_the_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("stores: [stores/sst2]\nadmin: true\nadmin_port: 0\n")
    assert load_config(["--config", str(path)], environ={"RAEE_ADMIN": "false"}).admin is False
    assert load_config(["--config", str(path), "--admin", "false"], environ={"RAEE_ADMIN": "true"}).admin is False


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("True", True), ("YES", True), ("on", True),
                                             ("0", False), ("false", False), ("FALSE", False), ("no", False),
                                             ("off", False), (" true ", True)])
def test_booleans_from_environment_variables(value, expected):
    config = load_config(["--store", "a"], environ={"RAEE_ADMIN": value, "RAEE_ADMIN_PORT": "0"})
    assert config.admin is expected


@pytest.mark.parametrize("value", ["flase", "", "2", "enabled"])
def test_a_boolean_that_is_neither_says_so(value):
    with pytest.raises(InputError, match=r"admin must be true or false, got"):
        load_config(["--store", "a"], environ={"RAEE_ADMIN": value, "RAEE_ADMIN_PORT": "0"})


@pytest.mark.parametrize("flag, value", [("--max-wait-ms", "inf"), ("--max-wait-ms", "nan"), ("--max-batch-ms", "-1"),
                                         ("--stream-idle-s", "0"), ("--max-connection-age-s", "3000000"),
                                         ("--max-connection-age-grace-s", "1e10"), ("--grace-s", "inf")])
def test_durations_must_be_finite_and_fit_grpc(flag, value):
    """An infinite wait once killed the batcher's thread, and an age past 2^31 ms crashed the listener's start."""
    name = flag[2:].replace("-", "_")
    with pytest.raises(InputError, match=rf"^{name} must be a number of (milli)?seconds"):
        load_config(["--store", "a", flag, value], environ={})


def test_the_longest_durations_are_accepted():
    config = load_config(["--store", "a", "--max-connection-age-s", "2000000", "--max-wait-ms", "0"], environ={})
    assert config.max_connection_age_s == 2_000_000 and config.max_wait_ms == 0
