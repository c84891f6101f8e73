"""GET /: the playground page (static HTML, CSS and JavaScript from app/static, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


@router.get("/")
async def playground() -> FileResponse:
    # No API key needed for the page itself: it asks for one when /info answers 401.
    return FileResponse(PAGE, media_type="text/html; charset=utf-8")
