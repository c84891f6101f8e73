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
