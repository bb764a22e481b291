"""service.throttle.Pushback: when a client refused for a full queue may come back, and the wait of one that comes
back sooner."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.client import pushback_s
from service.errors import QueueFull
from service.throttle import Pushback


def test_the_wait_doubles_with_each_refusal_in_a_row_up_to_the_cap_and_an_answer_resets_it():
    pushback = Pushback(first_s=0.001, max_s=0.004)
    told = []
    for _ in range(5):
        told.append(round(pushback.refused("a"), 3))
        time.sleep(0.005)  # came back when told
    assert told == [0.001, 0.002, 0.004, 0.004, 0.004]
    assert pushback.refused("b") == 0.001  # each client on its own
    time.sleep(0.005)
    pushback.admitted("a")
    assert pushback.refused("a") == 0.001
    never = Pushback(first_s=1e-9, max_s=1e-9)  # its time has come by each next refusal
    assert [never.refused("c") for _ in range(2000)][-1] == 1e-9  # refused for ever: no overflow of 2.0 ** n


def test_refusals_before_the_time_told_get_the_time_left_and_do_not_double_it():
    pushback = Pushback(first_s=10.0, max_s=20.0)  # 0.2 with min > 0.15 failed on a 50 ms stall
    first = pushback.refused("a")
    together = [pushback.refused("a") for _ in range(40)]  # calls in flight together, refused together
    assert first == 10.0 and max(together) <= 10.0 and min(together) > 9.0


def test_an_answer_keeps_a_time_still_ahead():
    pushback = Pushback(first_s=10.0, max_s=20.0)  # long enough that no stall of the test reaches the time told
    pushback.refused("a")
    pushback.admitted("a")  # a call that was in flight before the refusal is answered
    assert 9.0 < pushback.wait_s("a") <= 10.0
    assert pushback.refused("a") <= 10.0  # still the same time, not doubled


def test_a_client_that_comes_back_sooner_waits_until_its_time_and_one_that_waited_goes_at_once():
    holds = []

    async def run() -> tuple[bool, float, bool, bool]:
        pushback = Pushback(first_s=0.1, on_hold=lambda: holds.append(1))
        started = time.monotonic()  # before the refusal: a stall between the two cannot shorten `waited` below 0.1
        pushback.refused("eager")
        held = await pushback.wait_turn("eager")
        waited = time.monotonic() - started
        return held, waited, await pushback.wait_turn("eager"), await pushback.wait_turn("never refused")

    held, waited, held_again, stranger = asyncio.run(run())
    assert held and 0.08 <= waited < 0.5 and holds == [1]
    assert not held_again and not stranger


def test_a_call_that_cannot_wait_is_refused_at_once():
    async def run() -> list[str]:
        pushback = Pushback(first_s=0.3, max_held=3, max_held_per_client=2)
        for client in "abc":
            pushback.refused(client)
        soon = time.monotonic() + 0.1
        outcomes = await asyncio.gather(pushback.wait_turn("a", deadline=soon),  # its deadline comes first
                                        pushback.wait_turn("b"), pushback.wait_turn("b"),
                                        pushback.wait_turn("b"),  # a third of b's: over its own share
                                        pushback.wait_turn("c"),
                                        pushback.wait_turn("c"),  # the fourth to wait: over the whole
                                        return_exceptions=True)
        return ["refused" if isinstance(o, QueueFull) else "held" if o else "went" for o in outcomes]

    started = time.monotonic()
    assert asyncio.run(run()) == ["refused", "held", "held", "refused", "held", "refused"]
    assert time.monotonic() - started < 0.6


def test_a_held_call_that_is_cancelled_gives_back_its_place():
    async def run() -> tuple[int, int]:
        pushback = Pushback(first_s=5.0, max_held_per_client=1)
        pushback.refused("a")
        task = asyncio.ensure_future(pushback.wait_turn("a"))
        await asyncio.sleep(0.05)
        during = pushback.held
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return during, pushback.held

    assert asyncio.run(run()) == (1, 0)


class Refusal:
    """Stands in for a grpc.RpcError carrying trailers."""

    def __init__(self, *trailers: tuple[str, str]) -> None:
        self.trailers = trailers

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.trailers


def test_the_client_reads_the_trailer_as_grpc_retries_do():
    assert pushback_s(Refusal(("x-request-id", "r1"), ("grpc-retry-pushback-ms", "250"))) == 0.25
    assert pushback_s(Refusal(("x-request-id", "r1"))) is None  # no trailer: not a full queue's refusal
    assert pushback_s(Refusal(("grpc-retry-pushback-ms", "-1"))) == -1.0  # negative: do not retry
    assert pushback_s(Refusal(("grpc-retry-pushback-ms", "soon"))) == -1.0  # malformed: do not retry either
