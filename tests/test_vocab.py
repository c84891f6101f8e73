import json

import pytest

from charlm.vocab import UnknownCharactersError, Vocab


def test_round_trip() -> None:
    vocab = Vocab.from_text("hello, world\n")
    assert vocab.decode(vocab.encode("world, hello\n")) == "world, hello\n"
    assert list(vocab.chars) == sorted(set("hello, world\n"))


def test_unknown_characters_are_named() -> None:
    vocab = Vocab.from_text("abc")
    with pytest.raises(UnknownCharactersError) as info:
        vocab.encode("abxyx€")
    assert info.value.chars == ["x", "y", "€"]
    assert "'€'" in str(info.value)


def test_json_round_trip_keeps_order_and_unicode() -> None:
    vocab = Vocab.from_text("zé\n a")
    assert Vocab.from_json(vocab.to_json()) == vocab
    assert "é" in vocab.to_json()


@pytest.mark.parametrize("surrogate", ["\ud800", "\udfff"])
def test_lone_surrogates_are_refused_by_code_point(surrogate: str) -> None:
    code = f"U+{ord(surrogate):04X}"
    with pytest.raises(ValueError, match=code.replace("+", r"\+")):
        Vocab(("a", surrogate))
    with pytest.raises(ValueError, match=code.replace("+", r"\+")):
        Vocab.from_json(json.dumps(["a", surrogate]))  # ensure_ascii: the escape a crafted file would hold
    with pytest.raises(ValueError, match=code.replace("+", r"\+")):
        Vocab.from_text("ab" + surrogate)


def test_from_json_refuses_deep_nesting_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        Vocab.from_json("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize(("chars", "named"), [(("a", "b", "a"), "'a' appears twice"), (("a", "bc"), "'bc'")])
def test_bad_vocabularies_name_the_culprit(chars: tuple[str, ...], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Vocab(chars)
