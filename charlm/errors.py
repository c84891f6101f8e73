"""Which library errors are the user's to fix (exit 2) and which are failures (exit 1)."""

from charlm.engine import RequestError
from charlm.vocab import UnknownCharactersError

USAGE_ERRORS: tuple[type[Exception], ...] = (UnknownCharactersError, RequestError)
