from pathlib import Path

import pytest

from charlm.text import CorpusError, load_corpus, read_text, split_text, strip_gutenberg

MODERN = (
    "The Project Gutenberg eBook of X\n\nlicence text\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n\nCHAPTER I\nBody text.\n\n"
    "            *** END OF THE PROJECT GUTENBERG EBOOK X ***\nMore licence.\n"
)
OLD = (
    "Project Gutenberg's Etext\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
    "CHAPTER I\nBody text.\nEnd of the Project Gutenberg EBook of X, by Y\n*** END OF THIS PROJECT ...\n"
)


def test_bom_and_crlf_are_normalised(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffline one\r\nline two\rline three\n".encode())
    assert read_text(path) == "line one\nline two\nline three\n"


@pytest.mark.parametrize("raw", [MODERN, OLD])
def test_gutenberg_header_and_footer_are_cut(raw: str) -> None:
    body = strip_gutenberg(raw)
    assert body == "CHAPTER I\nBody text.\n"
    assert "licence" not in body.lower() and "gutenberg" not in body.lower()


def test_text_without_markers_is_kept_whole() -> None:
    assert strip_gutenberg("Just a story.\n") == "Just a story.\n"


def test_split_is_by_position() -> None:
    text = "abcdefghij" * 10
    train, val = split_text(text, 0.1)
    assert train == text[:90] and val == text[90:]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"aaaaaaa", "one distinct character"), (b"caf\xe9 latin-1", "not UTF-8")],
)
def test_unusable_corpora_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(path)


def test_missing_corpus_is_named(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nope.txt")


def test_strip_can_be_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "g.txt"
    path.write_text(MODERN)
    assert "licence" in load_corpus(path, strip=False)
    assert "licence" not in load_corpus(path, strip=True)
