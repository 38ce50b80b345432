"""Check checkpoint steps against their manifests, or seal a step you trust (docs/reliability.md).

    python scripts/checkpoint_manifest.py check runs/x/checkpoints/40 runs/x/checkpoints_damaged/50
    python scripts/checkpoint_manifest.py seal runs/x/checkpoints/30   # one written before manifests

`check` prints each step's first problem (exit 1 if any); `seal` hashes a step's files into its
manifest, after which training resumes from it, `generate` and `init_from` read it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llm_jax.runtime.checkpoint_integrity import problem, write_manifest


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("check", "seal"):
        print(__doc__, file=sys.stderr)
        return 2
    bad = 0
    for name in argv[1:]:
        step_dir = Path(name)
        if not step_dir.is_dir():
            print(f"{step_dir}: not a directory", file=sys.stderr)
            bad += 1
        elif argv[0] == "seal":
            write_manifest(step_dir)
            print(f"{step_dir}: manifest written")
        else:
            found = problem(step_dir)
            bad += found is not None
            print(f"{step_dir}: {found or 'complete'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
