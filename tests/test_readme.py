"""README.md's config-key table is the one scripts/update_readme_keys.py generates from the code."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("update_readme_keys", ROOT / "scripts" / "update_readme_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_key_table_is_current():
    script = _script()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert script.START in text and script.END in text, "README.md lost its config-keys markers"
    assert script.updated_readme(text) == text, (
        "README.md's config-key table differs from the config's docstrings; regenerate it with "
        ".venv/bin/python scripts/update_readme_keys.py"
    )


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
    """Each logical axis of parallel/rules.py appears in README's table with its mesh axes."""
    from llm_jax.parallel.rules import LOGICAL_RULES

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name, axes in LOGICAL_RULES.items():
        placed = ", ".join(f"`{a}`" for a in axes) if axes else "replicated"
        assert f"| `{name}` | {placed} |" in text, f"README's logical-axis table lacks `{name}` ({placed})"
