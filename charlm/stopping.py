"""Stop strings: when a request's text must end, and what may not be streamed yet.

The engine hands out characters as they are sampled, but a stop string is cut from the text, so the
characters that might be the start of one are held back until the next characters settle it: a reader
never sees a character that the final text does not have. (TGI's StoppingCriteria and vLLM's
check_stop do the same for tokens.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["StopCheck", "StopStrings"]


class StopCheck(NamedTuple):
    """What the text generated so far means for its stop strings."""

    cut: int  # > 0: a stop string has just appeared at the end; cut this many characters and stop
    held: int  # trailing characters that might begin a stop string: not to be streamed yet (0 when cut)


class StopStrings:
    """One request's stop strings, checked after each new character.

    Only the last characters can matter (a stop string is found as soon as it is complete), so each
    check looks at as many trailing characters as the longest stop string has, however long the text.
    """

    __slots__ = ("stops", "_window")

    def __init__(self, stops: Sequence[str]):
        if not all(stops):
            raise ValueError("a stop string must have at least one character")
        self.stops = tuple(stops)
        self._window = max(map(len, self.stops), default=0)

    def check(self, generated: Sequence[str]) -> StopCheck:
        """`generated`: the characters generated so far (a list of them, or a string), the newest last.
        The first stop string (in the request's order) that the text ends with wins."""
        if not self._window:
            return StopCheck(0, 0)
        text = "".join(generated[-self._window :])
        for s in self.stops:
            if text.endswith(s):
                return StopCheck(len(s), 0)
        return StopCheck(0, self._held_back(text))

    def _held_back(self, text: str) -> int:
        """How many trailing characters might begin a stop string, and so must not be streamed yet."""
        held = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return held
