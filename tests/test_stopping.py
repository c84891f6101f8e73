"""StopStrings alone: when a stop string ends the text, and what must be held back from streaming."""

from __future__ import annotations

import pytest

from charlm.stopping import StopCheck, StopStrings


def feed(stops: StopStrings, text: str) -> list[StopCheck]:
    """The checks after each character of `text`, as the engine makes them, up to the first stop."""
    checks, generated = [], []
    for ch in text:
        generated.append(ch)
        checks.append(stops.check(generated))
        if checks[-1].cut:
            break
    return checks


def test_no_stop_strings_never_stop_and_hold_nothing() -> None:
    assert feed(StopStrings(()), "The island") == [StopCheck(0, 0)] * 10


def test_a_stop_string_is_found_as_soon_as_it_is_complete() -> None:
    checks = feed(StopStrings(["and"]), "sea and sand")
    assert len(checks) == len("sea and")
    assert checks[-1] == StopCheck(cut=3, held=0)


def test_a_possible_start_of_a_stop_string_is_held_back_until_settled() -> None:
    checks = feed(StopStrings(["and"]), "sea an isle")
    held = [c.held for c in checks]
    # s e a ␣ a n ␣ i s l e: "a" and "an" might begin "and"; the space after "an" settles it.
    assert held == [0, 0, 1, 0, 1, 2, 0, 0, 0, 0, 0] and not any(c.cut for c in checks)


def test_the_longest_possible_start_is_held_across_several_strings() -> None:
    stops = StopStrings(["xyz", "yzw", "\n\n"])
    assert stops.check("abxy") == StopCheck(0, 2)  # "xy" begins "xyz"; "y" alone begins "yzw"
    assert stops.check("a\n") == StopCheck(0, 1)
    assert stops.check("ayz") == StopCheck(0, 2)  # "yz" begins "yzw" (and ends "xyz", which is not complete)


def test_the_first_stop_string_in_order_wins_when_several_end_the_text() -> None:
    assert StopStrings(["b", "ab"]).check("cab") == StopCheck(1, 0)
    assert StopStrings(["ab", "b"]).check("cab") == StopCheck(2, 0)


def test_only_the_tail_is_looked_at_however_long_the_text() -> None:
    generated = list("x" * 100_000 + "the end")
    assert StopStrings(["end", "the end."]).check(generated) == StopCheck(3, 0)
    assert StopStrings(["the end."]).check(generated) == StopCheck(0, 7)


def test_a_string_works_as_well_as_a_list_of_characters() -> None:
    assert StopStrings(["ab"]).check("xab") == StopStrings(["ab"]).check(["x", "a", "b"]) == StopCheck(2, 0)


def test_an_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one character"):
        StopStrings(["ok", ""])
