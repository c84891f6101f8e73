"""OpenAI's legacy completions API over the same engine: POST /v1/completions, GET /v1/models and
GET /v1/models/{model_id}, so that the `openai` SDK, LangChain and curl snippets written for OpenAI work
unchanged (with `base_url` pointing here). A character is a token: `max_tokens` and `usage` count
characters, and `logprobs` describes characters. The wire models are in app/openai_api/protocol.py,
the translation in plan.py, the serving in serving.py; this module is only the routes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from app.auth import Authorized
from app.budget import Lease
from app.deps import cancel_on_disconnect, compiled, logprob_lease, model_for, version_headers
from app.errors import ApiError
from app.openai_api.plan import Plan, PlanLimits, plan_of
from app.openai_api.protocol import OPENAI_ERROR_RESPONSES, Completion, CompletionRequest, Model, ModelList
from app.openai_api.serving import (
    CompletionStream,
    Header,
    Work,
    best,
    completion_body,
    engine_error,
    outcome,
    submit,
)
from app.registry import ModelInfo, Served, UnknownModel
from app.sse import ServerSentEvent, sse_content, sse_response
from charlm.constraint import ConstraintError
from charlm.request import EngineClosedError, GenerationFailed, ScoringStopped

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Authorized],
                   responses={401: OPENAI_ERROR_RESPONSES[401]})

OWNED_BY = "charlm"

STREAM_EXAMPLE = (
    'data: {"id": "cmpl-3f1c...", "object": "text_completion", "created": 1764531200, "model": "mysterious_island", '
    '"choices": [{"text": " was", "index": 0, "logprobs": null, "finish_reason": null}]}\n\n'
    'data: {"id": "cmpl-3f1c...", "object": "text_completion", "created": 1764531200, "model": "mysterious_island", '
    '"choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "length"}]}\n\n'
    "data: [DONE]\n\n"
)
STREAM_RESPONSE: dict[str, Any] = {
    "description": "the completion; with `stream: true`, Server-Sent Events of completion chunks, then `data: [DONE]`",
    "content": sse_content(STREAM_EXAMPLE),
}


def _card(info: ModelInfo) -> Model:
    return Model(id=info.id, created=info.created, owned_by=OWNED_BY, status=info.status, default=info.default,
                 version=info.version, parameters=info.header.parameters if info.header else None,
                 bits_per_char=info.bpc, error=info.error)


@router.get("/models", response_model=ModelList, summary="OpenAI: list the models, loaded or not")
async def list_models(request: Request) -> ModelList:
    """Every model this server can serve (a model copied into its directory appears here at once):
    its id is what `model` says in a completions request; `status`, `parameters` and `bits_per_char`
    help to choose."""
    return ModelList(data=[_card(info) for info in await request.app.state.models.listing()])


@router.get("/models/{model_id}", response_model=Model, summary="OpenAI: one model, by id",
            responses={404: OPENAI_ERROR_RESPONSES[404]})
async def get_model(model_id: str, request: Request) -> Model:
    try:
        return _card(await request.app.state.models.info(model_id))
    except UnknownModel as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None


@router.post(
    "/completions",
    response_model=Completion,
    summary="OpenAI: legacy completions (a character is a token)",
    responses={**OPENAI_ERROR_RESPONSES, 200: STREAM_RESPONSE},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    """OpenAI's `POST /v1/completions`, field for field, over the same engine as `POST /generate`.
    `temperature` 0 is greedy; `echo` with `max_tokens` 0 and `logprobs` scores the prompt (first
    character null, the rest as POST /score). A timed-out request ends with finish_reason "length"
    and the partial text."""
    state = request.app.state
    settings = state.settings
    async with model_for(request, body.model) as served:
        try:
            constraint = await compiled(body.structured_outputs, served.engine.vocab)
        except ConstraintError as exc:
            param = exc.param("structured_outputs")
            raise ApiError(400, f"Invalid value for '{param}': {exc.message}", param=param) from None
        plan = plan_of(body, served.id, served.engine.vocab,
                       PlanLimits(settings.max_choices, settings.max_logprob_values), constraint)
        lease = logprob_lease(request, plan.logprob_values())
        try:
            work = submit(plan, served.engine, settings.request_timeout, state.metrics)
        except BaseException:
            lease.release()
            raise
    try:
        return await _respond(plan, work, body.stream, request, served, lease)
    except BaseException:  # failed or cancelled before a response took the lease over
        lease.release()
        raise


async def _respond(plan: Plan, work: Work, stream: bool | None, request: Request, served: Served,
                   lease: Lease) -> Response:
    """Answer for submitted work; the response releases `lease` once it is sent, or its client gone
    (the body's own clean-up, and a background task for a response that fails to send)."""
    state, settings = request.app.state, request.app.state.settings
    header = Header(f"cmpl-{uuid.uuid4().hex}", int(time.time()), plan.model, served.fingerprint)
    headers = version_headers(served)
    if stream:
        events = CompletionStream(plan, work, header, settings.stream_interval_ms / 1000, state.metrics).events()
        return sse_response(_watched(request, work, events, lease.release), BackgroundTask(lease.release),
                            headers=headers)
    watcher = cancel_on_disconnect(request, work.handles)
    try:
        scored = await asyncio.gather(*(outcome(s) for s in work.scorings))
        results = await asyncio.gather(*(outcome(g) for g in work.gens))
    except (GenerationFailed, EngineClosedError, ScoringStopped) as exc:
        raise engine_error(exc) from None
    finally:
        watcher.cancel()
        work.cancel()  # no-op when finished; frees the rows if this handler itself was cancelled
    for result in results:
        state.metrics.record(served.id, result)
    results = best(plan, results)
    return StreamingResponse(_released(completion_body(plan, header, scored, results), lease.release),
                             media_type="application/json", background=BackgroundTask(lease.release),
                             headers=headers)


async def _watched(request: Request, work: Work, events: AsyncGenerator[ServerSentEvent, None],
                   release: Callable[[], None]) -> AsyncGenerator[ServerSentEvent, None]:
    """A stream's events, its work cancelled the moment the client goes, its lease released at the end."""
    watcher = cancel_on_disconnect(request, work.handles)
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    finally:
        watcher.cancel()
        release()


async def _released(pieces: AsyncIterator[bytes], release: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        async for piece in pieces:
            yield piece
    finally:
        release()
