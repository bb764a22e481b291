"""The one policy parser: every form round-trips, bad ones are refused with the reason, the wire carries what a
server serves, and the module loads without torch or faiss (the client imports it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raee.accuracy_rule import AccuracyRuleConfig
from raee.errors import InputError
from raee.exit_policy import CALIBRATED, ExitPolicy
from raee.raee_rule import RaeeConfig


@pytest.mark.parametrize("text, expected", [
    ("calibrated", ExitPolicy()),
    ("calibrated:best", ExitPolicy("calibrated", objective="best")),
    ("calibrated:match-full,k=32", ExitPolicy("calibrated", objective="match-full", options=(("k", 32),))),
    ("raee", ExitPolicy("raee")),
    ("raee:use_tau=false,k=4", ExitPolicy("raee", options=(("k", 4), ("use_tau", False)))),
    ("raee:earliest_ratio=0.6,weights=unsquared",
     ExitPolicy("raee", options=(("earliest_ratio", 0.6), ("weights", "unsquared")))),
    ("accuracy:cost=0.2,values=confidence", ExitPolicy("accuracy", options=(("cost", 0.2), ("values", "confidence")))),
    ("full", ExitPolicy("full")),
    ("static:0", ExitPolicy("static", layer=0)),
    ("oracle", ExitPolicy("oracle")),
    ("adainfer", ExitPolicy("adainfer")),
    ("confidence:0.9", ExitPolicy("confidence", rate=0.9)),
])
def test_forms_parse_and_round_trip(text, expected):
    policy = ExitPolicy.parse(text)
    assert policy == expected
    assert ExitPolicy.parse(str(policy)) == policy
    assert ExitPolicy.parse(policy) is policy


def test_canonical_text_sorts_settings():
    assert str(ExitPolicy.parse("raee:use_tau=false,k=4")) == "raee:k=4,use_tau=false"
    assert str(ExitPolicy.parse(" static:3 ")) == "static:3"
    assert CALIBRATED == ExitPolicy.parse("calibrated")


@pytest.mark.parametrize("text, message", [
    ("fastest", "is not one of"),
    ("static", "needs a layer"),
    ("static:x", "not a layer number"),
    ("static:-1", ">= 0"),
    ("full:3", "takes no plain value"),
    ("raee:3", "takes no plain value"),
    ("raee:depth=3", "takes no setting 'depth'"),
    ("raee:k=0", "out of range 1..1024"),
    ("raee:k=4.5", "not an integer"),
    ("raee:use_tau=maybe", "not true or false"),
    ("raee:tau=2", "tau must lie in"),
    ("accuracy:temperature=0", "temperature must be positive"),
    ("calibrated:worst", "objective 'worst'"),
    ("calibrated:k=2000", "out of range"),
    ("calibrated:tau=0.5", "takes no setting 'tau'"),
    ("confidence:2", "rate must lie in"),
    ("raee:k=4,", "is not one of"),
    ("static:1,2", "at most one plain value"),
    ("static:\u0663", "outside ASCII"),  # an Arabic-Indic 3, which int() reads as 3
    ("x" * 201, "a policy of 201 characters"),
])
def test_bad_policies_are_refused_with_the_reason(text, message):
    with pytest.raises(InputError, match=message):
        ExitPolicy.parse(text)


def test_policy_lists_split_on_commas_and_keep_settings_with_their_policy():
    from raee.exit_policy import parse_policy_list
    assert [str(p) for p in parse_policy_list("raee:k=4,tau=0.8,full,static:1, calibrated:best,k=8;oracle")] == [
        "raee:k=4,tau=0.8", "full", "static:1", "calibrated:best,k=8", "oracle"]
    assert [str(p) for p in parse_policy_list("raee,k=4")] == ["raee:k=4"]
    with pytest.raises(InputError, match="is not one of"):
        parse_policy_list("raee,fastest")


def test_bad_types_are_refused():
    with pytest.raises(InputError, match="a policy is a string"):
        ExitPolicy.parse(3)
    with pytest.raises(InputError, match="only it takes one"):
        ExitPolicy("full", layer=2)


def test_rule_settings_apply_over_their_base():
    base = RaeeConfig(k=20, tau=0.8)
    assert ExitPolicy.parse("raee:k=4").rule_config(base) == RaeeConfig(k=4, tau=0.8)
    assert ExitPolicy.parse("accuracy:cost=0.3").rule_config(AccuracyRuleConfig()) == AccuracyRuleConfig(cost=0.3)
    assert ExitPolicy.parse("calibrated").with_k(16).k == 16 and ExitPolicy.parse("raee:k=4").with_k(None).k == 4
    with pytest.raises(InputError, match="k applies to the retrieval policies"):
        ExitPolicy.parse("full").with_k(3)
    with pytest.raises(InputError, match="past the last layer"):
        ExitPolicy.parse("static:7").check_layers(6)


def test_wire_carries_served_policies_only():
    from service.api import pb
    from service.policy_wire import from_wire, to_wire
    for text in ("calibrated", "calibrated:k=8", "raee", "raee:k=4", "full", "static:2"):
        policy = ExitPolicy.parse(text)
        fields = to_wire(policy)
        assert from_wire(fields["policy"], fields.get("static_layer"), fields["k"]) == policy
        assert ("static_layer" in fields) == (policy.kind == "static")
    assert to_wire("calibrated")["policy"] == pb.POLICY_KIND_UNSPECIFIED
    for text in ("calibrated:best", "raee:tau=0.5", "oracle", "accuracy"):
        with pytest.raises(InputError, match="cannot be sent to a server"):
            to_wire(text)
    with pytest.raises(InputError, match="unknown policy 7"):
        from_wire(7, None, 0)
    assert from_wire(pb.POLICY_KIND_STATIC, 0, 0) == ExitPolicy("static", layer=0)
    with pytest.raises(InputError, match="STATIC needs static_layer"):
        from_wire(pb.POLICY_KIND_STATIC, None, 0)
    with pytest.raises(InputError, match="static_layer 2 is set but the policy is full"):
        from_wire(pb.POLICY_KIND_FULL, 2, 0)
    with pytest.raises(InputError, match="out of range"):
        from_wire(pb.POLICY_KIND_RAEE, None, 5000)
    assert from_wire(pb.POLICY_KIND_FULL, None, 9) == ExitPolicy("full")  # k means nothing at full depth


def test_the_policy_module_loads_without_torch_or_faiss():
    code = ("import sys, raee.exit_policy; heavy = [m for m in ('torch', 'faiss') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
