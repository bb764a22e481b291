"""ExitPolicy <-> the raee.v1 request fields (policy kind, static_layer, k): the one converter, for the client and
the servicer alike. The wire carries the policies a server serves; the others are refused with the reason."""

from __future__ import annotations

from typing import TypedDict

from raee.errors import InputError
from raee.exit_policy import ExitPolicy, PolicyKind
from service.api import pb

TO_WIRE: dict[PolicyKind, pb.PolicyKind] = {"calibrated": pb.POLICY_KIND_UNSPECIFIED, "raee": pb.POLICY_KIND_RAEE,
                                            "full": pb.POLICY_KIND_FULL, "static": pb.POLICY_KIND_STATIC}
FROM_WIRE: dict[int, PolicyKind] = {kind: name for name, kind in TO_WIRE.items()}
WIRE_FORMS = "calibrated[:k=K] (the default), raee[:k=K], full, static:L"


class _PolicyFields(TypedDict):
    policy: pb.PolicyKind
    k: int  # 0 = the store's


class PolicyFields(_PolicyFields, total=False):
    """The ClassifyRequest fields that carry a policy."""

    static_layer: int  # STATIC only


def to_wire(policy: ExitPolicy | str) -> PolicyFields:
    """Request fields for a policy: {"policy": kind, "static_layer": L, "k": K (0 = the store's)}."""
    policy = ExitPolicy.parse(policy)
    extra = [name for name, _ in policy.options if name != "k"]
    if policy.kind not in TO_WIRE or policy.objective is not None or extra:
        raise InputError(f"policy {policy} cannot be sent to a server; it serves {WIRE_FORMS}")
    fields = PolicyFields(policy=TO_WIRE[policy.kind], k=policy.k or 0)
    if policy.layer is not None:  # static:L (ExitPolicy gives a layer to static alone)
        fields["static_layer"] = policy.layer
    return fields


def from_wire(kind: int, static_layer: int | None, k: int) -> ExitPolicy:
    """The policy a request asks for; InputError for an unknown kind, a bad layer or k, a STATIC without its
    layer, or a layer with another policy. static_layer: None when the request leaves it unset."""
    if kind not in FROM_WIRE:
        raise InputError(f"unknown policy {kind}; use UNSPECIFIED (the store's calibrated policy), RAEE, FULL or "
                         "STATIC")
    name = FROM_WIRE[kind]
    if name == "static" and static_layer is None:
        raise InputError("policy STATIC needs static_layer (the exit layer, 0 = embeddings); it was not set")
    if name != "static" and static_layer is not None:
        raise InputError(f"static_layer {static_layer} is set but the policy is {name}, not STATIC; leave it unset "
                         "or ask for STATIC")
    policy = ExitPolicy("static", layer=static_layer) if name == "static" else ExitPolicy(name)
    return policy.with_k(k or None) if k and policy.uses_neighbours else policy
