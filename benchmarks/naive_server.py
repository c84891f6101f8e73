"""The naive server the load benchmark compares against: the notebook's sample() per request.

A plain FastAPI route, loaded once at import; every request runs its own Python loop over
characters. Start: CHARLM_CHECKPOINT=... uvicorn benchmarks.naive_server:app
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.common import MODEL
from benchmarks.seed_recipe import NotebookRNN, sample
from charlm.checkpoint import load_checkpoint

_ckpt = load_checkpoint(os.environ.get("CHARLM_CHECKPOINT", str(MODEL)))
_model = NotebookRNN.from_charlm(_ckpt.model)
_char2int = {c: i for i, c in enumerate(_ckpt.vocab.chars)}
_char_array = np.array(_ckpt.vocab.chars)

app = FastAPI()


class Request(BaseModel):
    seed: str
    length: int = 500
    scale_factor: float = 1.0


@app.get("/ready")
def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/generate")
def generate(req: Request) -> dict[str, str]:
    text = sample(_model, _char2int, _char_array, req.seed, req.length, req.scale_factor)
    return {"text": text, "generated": text[len(req.seed) :]}
