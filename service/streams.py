"""ClassifyStream's mechanics: requests read ahead and answered concurrently, answers in request order, one per
request, a bound on streams open at once and on how long a stream may stay silent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from service.errors import StreamIdle, TooManyStreams

log = logging.getLogger(__name__)
Request = TypeVar("Request")
Answer = TypeVar("Answer")


class StreamSlots:
    """At most `limit` streams open at once; one more is refused at once (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.open = limit, 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.open >= self.limit:  # one event loop: no lock needed between the test and the increment
            raise TooManyStreams(f"{self.open} streams are open, the limit is {self.limit}; close idle streams or "
                                 "retry with backoff")
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


async def answer_in_order(requests: AsyncIterator[Request], answer: Callable[[Request], Awaitable[Answer]], *,
                          window: int, idle_s: float) -> AsyncIterator[Answer]:
    """Yield answer(request) for every request, in request order, while later requests are already being answered
    (at most `window` unanswered). answer() must not raise: a failed request is answered too. StreamIdle when no
    request arrives for idle_s seconds while none is waiting for its answer."""
    answers: asyncio.Queue[asyncio.Future[Answer] | None] = asyncio.Queue(maxsize=window)  # None: the end

    async def read() -> None:
        try:
            async for request in requests:
                await answers.put(asyncio.ensure_future(answer(request)))
        except Exception as exc:  # noqa: BLE001 - the client went away mid-message: the stream ends
            log.debug("stream read ended: %s", exc)
        finally:
            await answers.put(None)

    reader = asyncio.create_task(read())
    try:
        while True:
            try:
                item = await asyncio.wait_for(answers.get(), idle_s)
            except asyncio.TimeoutError:
                raise StreamIdle(f"no request for {idle_s:g} s; the server closed this idle stream "
                                 "(stream_idle_s); open a new one when there is work") from None
            if item is None:
                break
            yield await item
    finally:
        reader.cancel()
        while not answers.empty():
            item = answers.get_nowait()
            if item is not None:
                item.cancel()
