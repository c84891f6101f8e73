"""`python -m app`: serve models (what `charlm serve` hands over to, and the image runs).

The default model is loaded once before the server starts, so a bad file or setting fails in one
line instead of a server traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from app.settings import Settings

log = logging.getLogger("charlm")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="charlm serve", description="Serve a checkpoint over HTTP; every setting "
                                "also comes from CHARLM_* environment variables (see the README).")
    p.add_argument("--models", help="directories of *.safetensors and/or id=path pairs, comma-separated "
                   "(default: $CHARLM_MODELS or the shipped models/)")
    p.add_argument("--checkpoint", help="serve this one model file (default: $CHARLM_CHECKPOINT)")
    p.add_argument("--default-model", help="the model requests without `model` get")
    p.add_argument("--host", help="default: $CHARLM_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: $CHARLM_PORT or 8000")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: $CHARLM_DEVICE or auto)")
    p.add_argument("--weights", help="decode weight format of every model: fp32, bf16 or int8 (default: "
                   "$CHARLM_WEIGHTS, else each checkpoint's own)")
    p.add_argument("--kernels", help="the decode kernels' code path: auto, portable, avx2 or avx512 (default: "
                   "$CHARLM_KERNELS or auto)")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"CHARLM_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"charlm serve: error: invalid setting: {problems}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    from app.registry import ModelRegistry, ModelUnavailable, UnknownModel
    from app.server import serve

    try:
        ModelRegistry(settings.registry_config()).check_default()
    except (ModelUnavailable, UnknownModel) as exc:
        print(f"charlm serve: error: {exc}", file=sys.stderr)
        return 1
    if settings.api_key is None:
        log.warning("no API key: every route is open (set CHARLM_API_KEY to require Authorization: Bearer <key>)")
    else:
        log.info("API key required: clients send Authorization: Bearer <key>")
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
