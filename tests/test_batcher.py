"""The micro-batcher on a recording engine: requests group by key, batches stop at the size cap, and when a batch
fails on one request's input the others still get answers (each request then runs alone)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

import service.batcher as batcher_module
from raee.errors import InputError
from raee.exit_policy import ExitPolicy
from service.batcher import BatchKey, MicroBatcher

TIMEOUT = 10.0


class RecordingEngine:
    """Stands in for raee.Engine: records each batch (policy, texts) and answers each text with a tag. A text in
    `refuse` makes the whole batch raise InputError; the batch holding `blocker` waits until `release` is set."""

    def __init__(self, refuse: tuple[str, ...] = (), row_seconds: float = 0.0, batch_seconds: float = 0.0,
                 token_seconds: float = 0.0) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.row_seconds = row_seconds  # each batch takes this long per text,
        self.batch_seconds, self.token_seconds = batch_seconds, token_seconds  # this long, and this per word
        self.store = SimpleNamespace(version="v1")
        self.refuse = set(refuse)
        self.entered, self.release = threading.Event(), threading.Event()

    def classify(self, texts: list[str], *, policy: ExitPolicy, with_neighbours: bool = False) -> list[str]:
        self.batches.append((str(policy), list(texts)))
        time.sleep(self.batch_seconds + self.row_seconds * len(texts) + self.token_seconds * sum(map(tokens, texts)))
        if "blocker" in texts:
            self.entered.set()
            assert self.release.wait(TIMEOUT)
        refused = [t for t in texts if t in self.refuse]
        if refused:
            raise InputError(f"text {refused[0]!r} refused")
        return [f"{policy}|{t}" for t in texts]


def key(policy: str) -> BatchKey:
    return BatchKey("sst2", ExitPolicy.parse(policy), False)


def tokens(text: str) -> int:
    return len(text.split())  # the stand-in engine's tokens: words


def submit(batcher: MicroBatcher, engine: RecordingEngine, policy: str, texts: list[str], client: str):
    return batcher.submit(batcher.reserve(len(texts), client), key(policy), engine, texts, None,
                          [tokens(t) for t in texts])


@pytest.fixture
def batcher():
    made = []

    def make(**settings) -> MicroBatcher:
        made.append(MicroBatcher(**{"max_batch": 16, "max_wait_ms": 50, "max_queue": 64, **settings}))
        return made[-1]
    yield make
    for b in made:
        b.close(TIMEOUT)


def hold_worker(batcher: MicroBatcher, engine: RecordingEngine):
    """Occupy the worker with a batch of its own key until engine.release is set, so that what is submitted
    meanwhile queues up together."""
    blocked = submit(batcher, engine, "static:1", ["blocker"], "holder")
    assert engine.entered.wait(TIMEOUT)
    return blocked


def test_requests_share_a_batch_only_with_requests_of_their_key(batcher):
    engine, b = RecordingEngine(), batcher()
    blocked = hold_worker(b, engine)
    requests = {name: submit(b, engine, policy, [f"{name}1", f"{name}2"], name)
                for name, policy in (("a", "raee"), ("b", "full"), ("c", "raee"), ("d", "full"))}
    engine.release.set()
    assert blocked.future.result(TIMEOUT).results == ["static:1|blocker"]
    for name, p in requests.items():
        policy = str(p.key.policy)
        assert p.future.result(TIMEOUT).results == [f"{policy}|{name}1", f"{policy}|{name}2"]
    batches = sorted((policy, sorted(texts)) for policy, texts in engine.batches[1:])
    assert batches == [("full", ["b1", "b2", "d1", "d2"]), ("raee", ["a1", "a2", "c1", "c2"])]


def test_batches_stop_at_max_batch_and_answer_in_order(batcher):
    engine, b = RecordingEngine(), batcher(max_batch=3)
    texts = [f"t{i}" for i in range(7)]
    outcome = submit(b, engine, "raee", texts, "a").future.result(TIMEOUT)
    assert [len(batch) for _, batch in engine.batches] == [3, 3, 1]
    assert [t for _, batch in engine.batches for t in batch] == texts
    assert outcome.results == [f"raee|{t}" for t in texts]


def test_a_failed_batch_runs_its_requests_one_at_a_time(batcher):
    engine, b = RecordingEngine(refuse=("bad",)), batcher()
    blocked = hold_worker(b, engine)
    good = submit(b, engine, "raee", ["fine", "also fine"], "a")
    bad = submit(b, engine, "raee", ["bad", "ok"], "b")
    engine.release.set()
    blocked.future.result(TIMEOUT)
    assert good.future.result(TIMEOUT).results == ["raee|fine", "raee|also fine"]
    with pytest.raises(InputError, match="'bad' refused"):
        bad.future.result(TIMEOUT)
    together, *alone = engine.batches[1:]
    assert sorted(together[1]) == ["also fine", "bad", "fine", "ok"]
    # each request's rows reran apart from the other request's (a fair batch may hold a request in several slices)
    owners = {"fine": "a", "also fine": "a", "bad": "b", "ok": "b"}
    assert all(len({owners[t] for t in texts}) == 1 for _, texts in alone)
    assert sorted(t for _, texts in alone for t in texts) == sorted(owners)
    assert b.backlog == 0


def test_batches_shrink_to_max_batch_ms_only_while_light_clients_are_about(batcher, monkeypatch):
    # a long memory while the light client must count: at 0.5 s a loaded machine could run the 64 rows after it
    # (16 batches of sleeps, each overshooting) past it, and late batches went back to 16 rows
    monkeypatch.setattr(batcher_module, "LIGHT_MEMORY_S", 30.0)
    engine, b = RecordingEngine(row_seconds=0.002), batcher(max_batch=16, max_batch_ms=20, max_queue=256)
    bulk = [f"b{i}" for i in range(64)]
    submit(b, engine, "raee", bulk, "bulk").future.result(TIMEOUT)
    assert [len(batch) for _, batch in engine.batches] == [16] * 4  # large requests alone: full batches
    engine.batches.clear()
    assert submit(b, engine, "raee", ["one text"], "light").future.result(TIMEOUT).results == ["raee|one text"]
    submit(b, engine, "raee", bulk, "bulk").future.result(TIMEOUT)
    sizes = [len(batch) for _, batch in engine.batches[1:]]
    assert sum(sizes) == 64 and 4 <= max(sizes) <= 10  # about 20 ms at 2 ms a row, never under 16 / 4
    engine.batches.clear()
    monkeypatch.setattr(batcher_module, "LIGHT_MEMORY_S", 0.5)  # read at each batch: from now on a short memory
    time.sleep(0.6)  # no light client for longer than LIGHT_MEMORY_S
    submit(b, engine, "raee", bulk, "bulk").future.result(TIMEOUT)
    assert [len(batch) for _, batch in engine.batches] == [16] * 4


def test_a_lone_clients_request_runs_without_waiting_for_company(batcher):
    """Nobody else has sent lately, so max_wait could only catch a stranger: the batch runs at once. With
    wait_for_new_clients it waits all of max_wait, as before."""
    engine = RecordingEngine()
    for wait_for_new_clients, least, most in ((False, 0.0, 0.5), (True, 0.5, TIMEOUT)):
        b = batcher(max_wait_ms=800, wait_for_new_clients=wait_for_new_clients)
        started = time.monotonic()
        submit(b, engine, "raee", ["alone"], "a").future.result(TIMEOUT)
        assert least <= time.monotonic() - started < most, wait_for_new_clients


def test_a_batch_waits_for_clients_heard_from_lately_and_runs_once_all_are_in(batcher, monkeypatch):
    engine, b = RecordingEngine(), batcher(max_wait_ms=3000)
    submit(b, engine, "raee", ["a0"], "a").future.result(TIMEOUT)  # alone: runs at once
    waiting = submit(b, engine, "raee", ["b0"], "b")  # a sent lately: the batch waits for it ...
    submit(b, engine, "raee", ["a0'"], "a").future.result(TIMEOUT)  # ... and runs when a's text comes
    assert waiting.future.result(TIMEOUT).results == ["raee|b0"] and sorted(engine.batches[-1][1]) == ["a0'", "b0"]
    started = time.monotonic()
    first = submit(b, engine, "raee", ["a1"], "a")
    time.sleep(0.3)
    assert not first.future.done()  # b may send again soon: the batch waits for it
    second = submit(b, engine, "raee", ["b1"], "b")
    assert first.future.result(TIMEOUT).results == ["raee|a1"] and second.future.result(TIMEOUT).results == ["raee|b1"]
    assert sorted(engine.batches[-1][1]) == ["a1", "b1"]  # one batch
    assert time.monotonic() - started < 2.0  # it ran when b's text came, not after max_wait
    monkeypatch.setattr(batcher_module, "RECENT_CLIENT_S", 0.0)  # b not heard from lately: a runs alone at once
    started = time.monotonic()
    assert submit(b, engine, "raee", ["a2"], "a").future.result(TIMEOUT).results == ["raee|a2"]
    assert time.monotonic() - started < 1.0


def test_clients_not_heard_from_lately_are_forgotten(batcher, monkeypatch):
    monkeypatch.setattr(batcher_module, "RECENT_CLIENT_S", 0.2)
    engine, b = RecordingEngine(), batcher(max_wait_ms=50)
    for i in range(40):  # forty connections come and go
        submit(b, engine, "raee", [f"t{i}"], f"client{i}").future.result(TIMEOUT)
    time.sleep(0.3)
    submit(b, engine, "raee", ["last"], "last").future.result(TIMEOUT)
    assert set(b._last_sent) <= {"last"}
    waiting = batcher(max_wait_ms=1, wait_for_new_clients=True)  # it never reads them: it keeps none
    submit(waiting, engine, "raee", ["x"], "x").future.result(TIMEOUT)
    assert not waiting._last_sent


def test_slow_texts_of_one_client_do_not_inflate_the_wait_others_are_told(batcher):
    """The deadline check's estimate stays low: after one client's long texts ran one per batch, 64 short texts
    are estimated at no more than they take (the cost per row of those batches is 100 times theirs)."""
    engine, b = RecordingEngine(batch_seconds=0.02, token_seconds=0.0005), batcher(max_batch=16)
    short = ["short text"] * 64
    started = time.perf_counter()
    submit(b, engine, "raee", short, "light").future.result(TIMEOUT)
    took = time.perf_counter() - started
    for _ in range(5):
        submit(b, engine, "raee", ["long " * 400], "heavy").future.result(TIMEOUT)
    needed = b.estimated_seconds([tokens(t) for t in short])
    assert needed is not None and 0 < needed <= took, (needed, took)


def test_a_request_refused_for_its_deadline_pushes_no_one_out_of_a_full_queue():
    """Step 6 of admission (the deadline at the texts' own tokens) runs after the queue's room is taken; a request
    whose room cost another client its queued request is not refused there, and the first check, before the room
    is taken, refuses what even its prompts' tokens cannot make in time."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from service.admission import Admission
    from service.convert import ClassifyCall
    from service.errors import DeadlineExpired

    class Engine(RecordingEngine):
        least_tokens = 2
        backbone = SimpleNamespace(check_texts=lambda texts, truncate=False: None)

        def resolve(self, policy):
            return None

        def check_prefix(self, i, text):
            pass

        def check_texts(self, texts):
            return [tokens(t) + 2 for t in texts]

    async def scenario() -> tuple[str, str]:
        engine = Engine(token_seconds=0.05)
        b = MicroBatcher(max_batch=4, max_wait_ms=1, max_queue=8)
        admission = Admission(SimpleNamespace(max_texts=8, max_queue=8, max_text_bytes=8192), ThreadPoolExecutor(2))
        admission.ready(SimpleNamespace(get=lambda task: engine), b)
        call = lambda texts: ClassifyCall("sst2", texts, ExitPolicy.parse("full"), False, "r")  # noqa: E731
        await admission.classify(call(["a b", "c d"]), "teacher", None)  # 200 ms: 100 a row, 25 a token
        blocked = asyncio.ensure_future(admission.classify(call(["blocker"]), "holder", None))
        await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, TIMEOUT)
        heavy = asyncio.ensure_future(admission.classify(call(["x"] * 7), "heavy", None))
        await asyncio.sleep(0.2)  # the queue now holds 8 texts: full
        light = ""
        by_prompts, by_tokens = b.estimated_seconds([2, 2]), b.estimated_seconds([10, 10])
        assert by_prompts is not None and by_tokens is not None and by_tokens > 1.3 * by_prompts
        try:  # a deadline between the two estimates: step 3 lets the request through, step 6 alone would refuse it
            deadline = time.monotonic() + (by_prompts + by_tokens) / 2
            await asyncio.wait_for(admission.classify(call(["y " * 8] * 2), "light", deadline), 1)
        except DeadlineExpired as exc:
            light = f"refused: {exc}"
        except asyncio.TimeoutError:
            light = "admitted"
        await asyncio.sleep(0.05)
        heavy_outcome = repr(heavy.exception()) if heavy.done() else "queued"
        engine.release.set()
        await blocked
        b.close(TIMEOUT)
        return light, heavy_outcome

    light, heavy = asyncio.run(scenario())
    assert "QueueFull" in heavy and "pushed out" in heavy  # made room for the light client ...
    assert not light.startswith("refused"), light  # ... which was then not refused for its deadline after all
