import pytest

from charlm.typography import QUOTE_STYLES, curl_quotes, normalize, strip_italics


@pytest.mark.parametrize(
    "straight, curled",
    [
        ('"Hello," said he.', "“Hello,” said he."),
        ('He paused--"No!" he cried.', "He paused--“No!” he cried."),
        ('He paused—"No!" he cried.', "He paused—“No!” he cried."),
        ('("Where?")', "(“Where?”)"),
        ("['Where?']", "[‘Where?’]"),
        ("\"'Yes,' he said, 'at once.'\"", "“‘Yes,’ he said, ‘at once.’”"),
        ("He said, \"the 'Nautilus' is mine.\"", "He said, “the ‘Nautilus’ is mine.”"),
    ],
)
def test_opening_and_closing_quotes_by_context(straight: str, curled: str) -> None:
    assert curl_quotes(straight) == curled


@pytest.mark.parametrize(
    "straight, curled",
    [
        ("at four o'clock", "at four o’clock"),
        ("I don't know", "I don’t know"),
        ("'Tis true, 'twas so.", "’Tis true, ’twas so."),
        ('"\'Tis a nightmare," I cried', "“’Tis a nightmare,” I cried"),
        ("give 'em a cheer", "give ’em a cheer"),
        ("the sailors' boat", "the sailors’ boat"),
        ('the sailors\' "Bonadventure"', "the sailors’ “Bonadventure”"),
        ("the summer of '98, when", "the summer of ’98, when"),
        ("a good 'un!", "a good ’un!"),
        ("reached 'Frisco at seven", "reached ’Frisco at seven"),
        ("Sir Francis M----'s address", "Sir Francis M----’s address"),
        ("on 'Change; then", "on ’Change; then"),
        ("37 deg 11' south", "37 deg 11’ south"),
    ],
)
def test_apostrophes_are_right_single_quotes(straight: str, curled: str) -> None:
    assert curl_quotes(straight) == curled


def test_a_quoted_date_is_not_taken_for_a_year() -> None:
    assert curl_quotes("read '17 June' there") == "read ‘17 June’ there"


def test_pon_opens_as_in_1268() -> None:
    # #1268 writes “‘Pon my word,” (an opening quote), so the shelf's 'Pon is spelt the same way.
    assert curl_quotes('"\'Pon my word," said he.') == "“‘Pon my word,” said he."


def test_dash_before_a_closing_quote_does_not_open_it() -> None:
    assert curl_quotes('"But the balloon--"\n\n"Enough!"') == "“But the balloon--”\n\n“Enough!”"
    assert curl_quotes('"Stop--listen--" said he.') == "“Stop--listen--” said he."


def test_quotation_at_the_start_of_the_text_and_after_a_newline() -> None:
    assert curl_quotes('"Here!" cried Neb.\n"There!" cried Pencroft.\n\'Tis done.') == (
        "“Here!” cried Neb.\n“There!” cried Pencroft.\n’Tis done."
    )


def test_a_quotation_spanning_paragraphs_reopens_each_paragraph() -> None:
    straight = '"It was the first day.\n\n"It was the second day.\n\n"It was the last," he said.'
    curled = "“It was the first day.\n\n“It was the second day.\n\n“It was the last,” he said."
    assert curl_quotes(straight) == curled


def test_quotes_inside_italic_markers() -> None:
    assert curl_quotes('the name "_Dobryna_" and the _Dobryna_\'s chart') == (
        "the name “_Dobryna_” and the _Dobryna_’s chart"
    )


def test_a_quotation_inside_an_italic_verse_opens() -> None:
    assert curl_quotes('sang:\n\n   _"Tu sandunga!"_') == "sang:\n\n   _“Tu sandunga!”_"


def test_a_quote_after_a_closing_italic_marker_closes() -> None:
    text = 'as those _terrestrials_"--and he curled his lip'
    assert curl_quotes(text) == "as those _terrestrials_”--and he curled his lip"
    assert strip_italics(curl_quotes(text)) == curl_quotes(strip_italics(text))


def test_length_is_unchanged_and_only_quotes_change() -> None:
    text = "\"'Yes,' he said--\"no, 'tis\n\"the sailors' o'clock.\" (\"x\") '98 _'a'_"
    curled = curl_quotes(text)
    assert len(curled) == len(text)
    assert '"' not in curled and "'" not in curled
    assert [a for a, b in zip(text, curled) if a != b] == [c for c in text if c in "\"'"]


def test_curling_is_idempotent_and_leaves_curly_text_alone() -> None:
    text = '"\'Pon my word," said he--"\'tis the sailors\' boat at ten o\'clock."\n\n"Yes!"'
    once = curl_quotes(text)
    assert curl_quotes(once) == once
    assert curl_quotes("“‘Pon my word,” said he.") == "“‘Pon my word,” said he."


@pytest.mark.parametrize(
    "marked, plain",
    [
        ("the _Nautilus_ sank", "the Nautilus sank"),
        ("_mon ami_, he said", "mon ami, he said"),
        ("the _Nautilus's_ hull", "the Nautilus's hull"),
        ("the _Dobryna_'s chart", "the Dobryna's chart"),
        ("(_Hector_)", "(Hector)"),
        ("a motto, '_Nil\ndesperandum!_' but", "a motto, 'Nil\ndesperandum!' but"),
        ("_de trop;_ which", "de trop; which"),
    ],
)
def test_italic_markers_are_removed(marked: str, plain: str) -> None:
    assert strip_italics(marked) == plain


@pytest.mark.parametrize(
    "text",
    [
        "call snake_case_name here",
        "the total_sum_ and a _private_attr",
        "def __init__(self)",
        "sign here: ____ and ____",
        "a lone _ underscore",
        "_first line\n\nthird line_",  # more than one line break: not one italic phrase
        "_two\nlines\nthree_",
        "_ spaced _",
    ],
)
def test_underscores_that_are_not_markup_are_kept(text: str) -> None:
    assert strip_italics(text) == text


def test_normalize_styles() -> None:
    text = '"Don\'t," said he.'
    assert QUOTE_STYLES == ("keep", "curly")
    assert normalize(text) == text
    assert normalize(text, quotes="keep") == text
    assert normalize(text, quotes="curly") == "“Don’t,” said he."


@pytest.mark.parametrize("style", ["smart", "", "Curly"])
def test_normalize_refuses_an_unknown_style(style: str) -> None:
    with pytest.raises(ValueError, match="keep, curly"):
        normalize("text", quotes=style)
