"""The documentation agrees with the code: docs/configuration.md's key table is the one
scripts/update_docs.py generates, docs/architecture.md lists every logical-axis rule, README.md
stays a short front door, and every relative link in README.md and docs/ leads to a file."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300
# A Markdown link's target: [text](target) or [text](target "title"); images too.
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _script():
    spec = importlib.util.spec_from_file_location("update_docs", ROOT / "scripts" / "update_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _local_links(page: Path) -> list[str]:
    """Relative link targets of a page, without their #anchors (web and mail links left out)."""
    targets = [m.group(1) for m in LINK.finditer(page.read_text(encoding="utf-8"))]
    return [t.split("#")[0] for t in targets
            if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_generated_tables_are_current():
    """The key table (from the config's docstrings) and the family matrix (from the registries)."""
    script = _script()
    for page, regenerate in script.generated():
        text = page.read_text(encoding="utf-8")
        assert regenerate(text) == text, (
            f"{page.name}'s generated table differs from the code; regenerate it with "
            ".venv/bin/python scripts/update_docs.py"
        )


def test_family_matrix_lists_every_registered_arch():
    from llm_jax.config.families import ARCHS

    matrix = _script().render_families()
    assert [line.split(" | ")[1] for line in matrix.splitlines()[2:]] == [f"`{arch}`" for arch in ARCHS]


def test_table_lists_every_key_and_escapes_cells():
    from llm_jax.config import all_keys

    script = _script()
    table = script.render_table()
    for key in all_keys():
        assert f"| `{key}` |" in table
    assert len(table.splitlines()) == len(all_keys()) + 2  # header, rule, one row per key
    row = script.render_table([("a.b", "'x|y'", "a | b, <run.dir>/tb, `<kept>`")]).splitlines()[2]
    assert row == "| `a.b` | `'x\\|y'` | a \\| b, &lt;run.dir>/tb, `<kept>` |"


def test_logical_axis_table_lists_every_rule():
    """Each logical axis of parallel/rules.py appears in docs/architecture.md's table with its mesh axes."""
    from llm_jax.parallel.rules import LOGICAL_RULES

    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    for name, axes in LOGICAL_RULES.items():
        placed = ", ".join(f"`{a}`" for a in axes) if axes else "replicated"
        assert f"| `{name}` | {placed} |" in text, f"docs/architecture.md lacks the rule `{name}` ({placed})"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move depth into docs/"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 400]
    assert not long, f"README.md lines {long} are over 400 characters"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t).resolve() for t in _local_links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs pages {missing}"


def test_relative_links_resolve():
    """Every relative link in README.md and docs/*.md names a file or folder of the checkout."""
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in _local_links(page):
            if target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"
