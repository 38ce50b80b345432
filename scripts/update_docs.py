"""Regenerate the tables the docs take from the code: the config-key table in
docs/configuration.md (`llm_jax.config.key_docs()`) and the family matrix in README.md and
docs/families.md (the model-family and Hugging Face adapter registries).

    .venv/bin/python scripts/update_docs.py           # rewrite the generated tables
    .venv/bin/python scripts/update_docs.py --check   # exit 1 if one is stale

It imports the installed `llm_jax` (`pip install -e .` makes that the checkout). Only the text
between each pair of markers is replaced; the rest of a page is left alone.
tests/test_docs.py fails when a page differs from what this script would write.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from llm_jax.config import key_docs
from llm_jax.interop import adapters
from llm_jax.models.base import families

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
START = "<!-- config-keys:start -->"
END = "<!-- config-keys:end -->"
FAMILY_PAGES = (ROOT / "README.md", ROOT / "docs" / "families.md")
FAMILIES_START = "<!-- families:start -->"
FAMILIES_END = "<!-- families:end -->"
OBJECTIVE_NAMES = {"causal": "causal LM",
                   "masked_causal": "next token at weighted positions (synthetic answers, completions)",
                   "mlm": "masked LM (+ next sentence with `train.nsp`)", "classify": "classification task",
                   "span": "span corruption", "seq2seq": "seq2seq task"}


def _escape_cell(text: str) -> str:
    """One table cell: whitespace collapsed, `|` escaped, and `<` escaped outside code spans
    (a bare `<run.dir>` would otherwise be read as an HTML tag and vanish)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside backticks
        parts[i] = parts[i].replace("<", "&lt;")
    return "`".join(parts)


def render_table(docs: list[tuple[str, str, str]] | None = None) -> str:
    """The Markdown table of every leaf key: key, default (Python repr), description."""
    docs = key_docs() if docs is None else docs
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for key, default, doc in docs:
        rows.append(f"| `{key}` | `{default.replace('|', chr(92) + '|')}` | {_escape_cell(doc)} |")
    return "\n".join(rows) + "\n"


def render_families() -> str:
    """One row per registered model.arch: its family, kind, objectives (the default first),
    whether it generates, and the Hugging Face classes an adapter maps it to."""
    rows = ["| Family | `model.arch` | Kind | Objectives (default first) | Generates | Hugging Face |",
            "| --- | --- | --- | --- | --- | --- |"]
    for family in families():
        for i, (arch, spec) in enumerate(family.archs.items()):
            objectives = ", ".join(OBJECTIVE_NAMES.get(o, o) for o in spec.objectives)
            hf = ", ".join(f"`{a.hf_class}`" for a in adapters() if a.arch == arch) or "none"
            generates = "yes" if family.decoding is not None else "no"
            name = f"**{family.name}**: {_escape_cell(family.describe)}" if i == 0 else f"{family.name} (same)"
            rows.append(f"| {name} | `{arch}` | {spec.kind} | {objectives} | {generates} | {hf} |")
    return "\n".join(rows) + "\n"


def updated(text: str, start_marker: str, end_marker: str, table: str) -> str:
    """`text` with the part between the markers replaced by `table`."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"the page must contain {start_marker} followed by {end_marker}")
    return text[: start + len(start_marker)] + "\n" + table + text[end:]


def updated_page(text: str, table: str | None = None) -> str:
    """docs/configuration.md's text with the key table regenerated."""
    return updated(text, START, END, render_table() if table is None else table)


def generated() -> list[tuple[Path, Callable[[str], str]]]:
    """(page, text -> regenerated text) for every generated table."""
    pages = [(PAGE, updated_page)]
    pages += [(page, lambda text: updated(text, FAMILIES_START, FAMILIES_END, render_families()))
              for page in FAMILY_PAGES]
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the pages are current")
    args = parser.parse_args(argv)
    stale = []
    for page, regenerate in generated():
        text = page.read_text(encoding="utf-8")
        new = regenerate(text)
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new, encoding="utf-8")
    if not stale:
        print("generated tables are up to date")
        return 0
    names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
    if args.check:
        print(f"stale generated tables in {names}; run: .venv/bin/python scripts/update_docs.py")
        return 1
    print(f"rewrote the generated tables in {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
