"""Regenerate the config-key table in docs/configuration.md from `llm_jax.config.key_docs()`.

    .venv/bin/python scripts/update_docs.py           # rewrite the table in docs/configuration.md
    .venv/bin/python scripts/update_docs.py --check   # exit 1 if the table is stale

It imports the installed `llm_jax` (`pip install -e .` makes that the checkout). Only the text
between the two markers below is replaced; the rest of the page is left alone.
tests/test_docs.py fails when the page differs from what this script would write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
START = "<!-- config-keys:start -->"
END = "<!-- config-keys:end -->"


def _escape_cell(text: str) -> str:
    """One table cell: whitespace collapsed, `|` escaped, and `<` escaped outside code spans
    (a bare `<run.dir>` would otherwise be read as an HTML tag and vanish)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside backticks
        parts[i] = parts[i].replace("<", "&lt;")
    return "`".join(parts)


def render_table(docs: list[tuple[str, str, str]] | None = None) -> str:
    """The Markdown table of every leaf key: key, default (Python repr), description."""
    if docs is None:
        from llm_jax.config import key_docs

        docs = key_docs()
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for key, default, doc in docs:
        rows.append(f"| `{key}` | `{default.replace('|', chr(92) + '|')}` | {_escape_cell(doc)} |")
    return "\n".join(rows) + "\n"


def updated_page(text: str, table: str | None = None) -> str:
    """`text` with the part between the markers replaced by the generated table."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page must contain {START} followed by {END}")
    table = render_table() if table is None else table
    return text[: start + len(START)] + "\n" + table + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the page is current")
    parser.add_argument("--page", type=Path, default=PAGE, help="the Markdown page holding the markers")
    args = parser.parse_args(argv)
    text = args.page.read_text(encoding="utf-8")
    new = updated_page(text)
    if new == text:
        print(f"{args.page}: config-key table is up to date")
        return 0
    if args.check:
        print(f"{args.page}: config-key table is stale; run: .venv/bin/python scripts/update_docs.py")
        return 1
    args.page.write_text(new, encoding="utf-8")
    print(f"{args.page}: config-key table rewritten ({len(render_table().splitlines()) - 2} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
