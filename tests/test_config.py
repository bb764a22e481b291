"""Server settings: `admin: false` in a config file, and booleans from RAEE_* environment variables and flags."""

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
