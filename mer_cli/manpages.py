"""Generate ``man/mer.1`` and ``man/mer-<command>.1`` from the click help texts.

Run ``python -m mer_cli.manpages man/`` after changing a command's options;
``tests/test_manpages.py`` fails when the committed pages are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mer_cli import __version__


def _roff_escape(line: str) -> str:
    line = line.replace("\\", "\\e")
    if line.startswith((".", "'")):
        line = "\\&" + line
    return line


def render(name: str, command: click.Command, parent: click.Context | None) -> str:
    """One man page (roff) for ``command`` whose full name is ``name``."""
    ctx = click.Context(
        command,
        info_name=name.split(" ")[-1],
        parent=parent,
        terminal_width=80,
        max_content_width=80,
        # as the real CLI does (-h/--help); otherwise the page depends on whether
        # click cached the command's help option in an earlier invocation
        **(command.context_settings if parent is None else {}),
    )
    help_text = command.get_help(ctx)
    summary = (command.get_short_help_str(limit=200) or name).rstrip(".")
    title = name.replace(" ", "-").upper()
    body = "\n".join(_roff_escape(x) for x in help_text.splitlines())
    return (
        f'.TH {title} 1 "" "mer {__version__}" "mer manual"\n'
        f".SH NAME\n{name.replace(' ', '-')} \\- {summary}\n"
        f".SH DESCRIPTION\n.nf\n{body}\n.fi\n"
        f".SH SEE ALSO\nmer(1), mer-store(5)\n"
    )


def generate() -> dict[str, str]:
    """File name -> content for every page generated from the CLI."""
    from mer_cli.cli import cli

    root = click.Context(
        cli,
        info_name="mer",
        terminal_width=80,
        max_content_width=80,
        **cli.context_settings,
    )
    pages = {"mer.1": render("mer", cli, None)}
    for sub in cli.list_commands(root):
        cmd = cli.get_command(root, sub)
        pages[f"mer-{sub}.1"] = render(f"mer {sub}", cmd, root)
    return pages


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "man")
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in generate().items():
        (out / fname).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
