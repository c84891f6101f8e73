"""app/sse.py: the one Server-Sent Events mechanism, encoding events as they are wanted, pinging a
quiet stream, and closing the event generator however the response ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from app.sse import PING, ServerSentEvent, _encoded


def test_a_quiet_stream_is_pinged_and_then_goes_on() -> None:
    async def run() -> list[bytes]:
        go = asyncio.Event()

        async def events() -> AsyncGenerator[ServerSentEvent, None]:
            yield ServerSentEvent(data={"a": 1}, event="text")
            await go.wait()  # quiet until the reader has seen a ping
            yield ServerSentEvent(raw_data="[DONE]")

        seen = []
        async for item in _encoded(events(), ping_seconds=0.01):
            seen.append(item)
            if item == PING:
                go.set()
        return seen

    seen = asyncio.run(run())
    assert seen[0] == b'event: text\ndata: {"a":1}\n\n' and seen[1] == PING
    assert [item for item in seen[2:] if item != PING] == [b"data: [DONE]\n\n"]


def test_the_event_generator_is_closed_when_the_response_ends_early() -> None:
    async def run() -> bool:
        closed = asyncio.Event()

        async def events() -> AsyncGenerator[ServerSentEvent, None]:
            try:
                while True:
                    yield ServerSentEvent(data={"text": "x"}, event="text")
            finally:
                closed.set()  # where a stream cancels its work and gives its share back

        stream = _encoded(events(), ping_seconds=60)
        assert (await stream.__anext__()).startswith(b"event: text")
        await stream.aclose()  # the client went away
        await asyncio.wait_for(closed.wait(), timeout=60)
        return closed.is_set()

    assert asyncio.run(run())


def test_an_error_in_the_events_reaches_the_response() -> None:
    async def run() -> list[bytes]:
        async def events() -> AsyncGenerator[ServerSentEvent, None]:
            yield ServerSentEvent(data={"n": 1})
            raise RuntimeError("broken")

        seen = []
        try:
            async for item in _encoded(events(), ping_seconds=60):
                seen.append(item)
        except RuntimeError as exc:
            seen.append(str(exc).encode())
        return seen

    assert asyncio.run(run()) == [b'data: {"n":1}\n\n', b"broken"]
