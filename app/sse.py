"""Server-Sent Events: the one mechanism behind /generate/stream and /v1/completions with `stream`.

Each event is encoded (in FastAPI's own wire format) only when the response is ready to send it, and
the response sends one event at a time: a client that stops reading holds the producer at its next
event instead of letting encoded events pile up in the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi.sse import EventSourceResponse, ServerSentEvent, format_sse_event
from starlette.background import BackgroundTask

__all__ = ["ServerSentEvent", "sse_response", "sse_content", "DONE"]

DONE = ServerSentEvent(raw_data="[DONE]")  # OpenAI's end-of-stream marker

# A comment line after this long without an event, so that proxies do not close a quiet stream (one
# waiting in the queue, or behind a long prefill); clients ignore comments.
PING_SECONDS = 15.0
PING = b": ping\n\n"


# One event, as OpenAPI 3.2 describes an event stream's items (and FastAPI documents its own streams).
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer", "minimum": 0}},
}


def sse_content(example: str) -> dict[str, Any]:
    """The API page's `content` entry of a route that streams events."""
    return {"text/event-stream": {"itemSchema": EVENT_SCHEMA, "example": example}}


def encode(event: ServerSentEvent) -> bytes:
    data = event.raw_data if event.raw_data is not None else _json(event.data)
    return format_sse_event(data_str=data, event=event.event, id=event.id, retry=event.retry, comment=event.comment)


def _json(data: Any) -> str | None:
    return None if data is None else json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


async def _encoded(events: AsyncGenerator[ServerSentEvent, None], ping_seconds: float) -> AsyncGenerator[bytes, None]:
    """The events, encoded, with a ping whenever none came for `ping_seconds`.

    A task pulls the events one ahead of the response (a queue of one), so waiting for the next one
    can time out without cancelling the generator itself; cancelling the task at the end runs the
    generator's own clean-up (its work cancelled, its share released)."""
    ready: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)

    async def produce() -> None:
        async with aclosing(events):  # closed here, in this task, however it ends
            async for event in events:
                await ready.put(encode(event))

    producer = asyncio.ensure_future(produce())
    try:
        while True:
            getter = asyncio.ensure_future(ready.get())
            done, _ = await asyncio.wait({getter, producer}, timeout=ping_seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            if producer in done:
                while not ready.empty():
                    yield ready.get_nowait()
                producer.result()  # the producer's exception, if it had one
                return
            yield PING
    finally:
        producer.cancel()


def sse_response(events: AsyncGenerator[ServerSentEvent, None], background: BackgroundTask | None = None,
                 ping_seconds: float = PING_SECONDS, headers: dict[str, str] | None = None) -> EventSourceResponse:
    """A text/event-stream response of `events`, unbuffered by proxies that honour X-Accel-Buffering;
    `background` runs once it is sent."""
    return EventSourceResponse(_encoded(events, ping_seconds), background=background,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
