"""service.throttle.Pushback: when a client refused for a full queue may come back, and the wait of one that comes
back sooner."""

from __future__ import annotations

import asyncio
import time

from service.throttle import Pushback


def test_the_wait_doubles_with_each_refusal_in_a_row_up_to_the_cap_and_admission_resets_it():
    pushback = Pushback(first_s=0.01, max_s=0.05)
    assert [pushback.refused("a") for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    assert pushback.refused("b") == 0.01  # each client on its own
    pushback.admitted("a")
    assert pushback.refused("a") == 0.01
    assert [pushback.refused("c") for _ in range(2000)][-1] == 0.05  # refused for ever, told the cap, no overflow


def test_a_client_that_comes_back_sooner_waits_until_its_time_and_one_that_waited_goes_at_once():
    async def run() -> tuple[bool, float, bool, bool]:
        pushback = Pushback(first_s=0.1)
        pushback.refused("eager")
        started = time.monotonic()
        held = await pushback.wait_turn("eager")
        waited = time.monotonic() - started
        return held, waited, await pushback.wait_turn("eager"), await pushback.wait_turn("never refused")

    held, waited, held_again, stranger = asyncio.run(run())
    assert held and 0.08 <= waited < 0.5
    assert not held_again and not stranger


def test_past_max_held_waiting_calls_a_call_goes_on_at_once():
    async def run() -> list[bool]:
        pushback = Pushback(first_s=0.2, max_held=2)
        for client in "abc":
            pushback.refused(client)
        return list(await asyncio.gather(*(pushback.wait_turn(c) for c in "abc")))

    started = time.monotonic()
    assert asyncio.run(run()) == [True, True, False]
    assert time.monotonic() - started < 0.5
