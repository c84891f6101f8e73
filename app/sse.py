"""Server-Sent Events: the one mechanism behind /generate/stream and /v1/completions with `stream`.

Each event is encoded (in FastAPI's own wire format) only when the response is ready to send it, and
the response sends one event at a time: a client that stops reading holds the producer at its next
event instead of letting encoded events pile up in the server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.sse import EventSourceResponse, ServerSentEvent, format_sse_event

__all__ = ["ServerSentEvent", "sse_response", "sse_content", "DONE"]

DONE = ServerSentEvent(raw_data="[DONE]")  # OpenAI's end-of-stream marker


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


async def _encoded(events: AsyncIterator[ServerSentEvent]) -> AsyncIterator[bytes]:
    async for event in events:
        yield encode(event)


def sse_response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """A text/event-stream response of `events`, unbuffered by proxies that honour X-Accel-Buffering."""
    return EventSourceResponse(_encoded(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
