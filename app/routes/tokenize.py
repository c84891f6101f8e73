"""POST /tokenize and /detokenize, in vLLM's shapes: clients that count tokens before sending work
here too. A token is one character of the model's vocabulary; its id is the character's index there.
No model work is queued: the vocabulary alone answers."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.auth import Authorized
from app.deps import model_for, version_headers
from app.errors import ApiError, request_error_detail
from app.schemas import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from charlm.request import RequestError
from charlm.vocab import UnknownCharactersError

router = APIRouter(tags=["tokenize"], dependencies=[Authorized], responses=ERROR_RESPONSES)


@router.post("/tokenize", response_model=TokenizeResponse, summary="A text's tokens: one per character")
async def tokenize(body: TokenizeRequest, request: Request, response: Response) -> TokenizeResponse:
    """The ids of the prompt's characters; a character outside the vocabulary is a 422 naming it.
    `max_model_len` is the longest seed this server takes (an LSTM's context itself has no end)."""
    async with model_for(request, body.model) as served:
        vocab = served.checkpoint.vocab
    try:
        ids = vocab.encode(body.prompt).tolist()
    except UnknownCharactersError as exc:
        error = RequestError("prompt", str(exc), exc.chars)
        raise ApiError(422, f"invalid request: prompt: {exc}", [request_error_detail(error)], param="prompt") from None
    strs = [vocab.chars[i] for i in ids] if body.return_token_strs else None
    response.headers.update(version_headers(served))
    return TokenizeResponse(count=len(ids), max_model_len=request.app.state.settings.max_seed_chars, tokens=ids,
                            token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of a list of tokens")
async def detokenize(body: DetokenizeRequest, request: Request, response: Response) -> DetokenizeResponse:
    """The characters the ids name; an id outside the vocabulary is a 422 naming its position."""
    async with model_for(request, body.model) as served:
        vocab = served.checkpoint.vocab
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < len(vocab)), None)
    if bad is not None:
        message = f"token {body.tokens[bad]} is not a vocabulary id: ids run from 0 to {len(vocab) - 1}"
        raise ApiError(422, f"invalid request: tokens[{bad}]: {message}",
                       [{"field": f"tokens.{bad}", "type": "value_error", "message": message}], param="tokens")
    response.headers.update(version_headers(served))
    return DetokenizeResponse(prompt=vocab.decode(body.tokens))
