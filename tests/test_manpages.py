"""The committed man pages must match what the CLI's help texts generate."""

from pathlib import Path

from mer_cli.manpages import generate

MAN = Path(__file__).resolve().parent.parent / "man"


def test_man_pages_are_current():
    pages = generate()
    stale = [
        name
        for name, text in pages.items()
        if not (MAN / name).is_file() or (MAN / name).read_text() != text
    ]
    assert not stale, (
        f"stale man pages {stale}: run `python -m mer_cli.manpages man/` and commit"
    )


def test_every_command_has_a_page():
    pages = generate()
    assert "mer.1" in pages
    assert "mer-quantize.1" in pages and "mer-generate.1" in pages
    assert (MAN / "mer-store.5").is_file()
