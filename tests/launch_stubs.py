"""Stub cluster commands for the launcher tests (test_launch.py, test_sweep_launch.py), and the
parsers that pull the `llm-jax train` command out of what they recorded.

Each stub (`gcloud`, `srun`, `sbatch`, `kubectl`, ...) appends one JSON line per call to
$STUB_LOG: its name, argv, working directory and the JAX and llm-jax environment it saw. It
exits with $STUB_EXIT (0 unless set; a failing stub also says so on stderr, as real tools do),
and prints what $STUB_STDOUT (JSON) gives for the call: {"TOOL [WORD ...]": text}, the first
entry whose tool matches and whose words all appear in argv, e.g. {"gcloud describe": "ACTIVE"}.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
BASH = shutil.which("bash") or "/bin/bash"

# It also keeps a copy of any tarball it is handed (setup's scp), because the script deletes its
# own copy afterwards.
_STUB = """#!{python}
import json, os, shutil, sys
log = os.environ["STUB_LOG"]
tool = os.path.basename(sys.argv[0])
record = {{"tool": tool, "argv": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: v for k, v in os.environ.items() if k.startswith(("JAX_", "LLM_JAX_"))}}}}
for arg in sys.argv[1:]:
    if arg.endswith(".tar.gz") and os.path.isfile(arg):
        record["tarball"] = shutil.copy(arg, log + ".tar.gz")
with open(log, "a") as f:
    f.write(json.dumps(record) + "\\n")
for key, text in json.loads(os.environ.get("STUB_STDOUT", "{{}}")).items():
    name, *words = key.split()
    if name == tool and all(w in sys.argv[1:] for w in words):
        print(text)
        break
code = int(os.environ.get("STUB_EXIT", "0"))
if code:
    print(f"{{tool}}: error: the stub fails as asked", file=sys.stderr)
sys.exit(code)
"""
# Every cloud or cluster command a launcher might call; none of the real ones may run.
STUBBED = ("gcloud", "srun", "sbatch", "scontrol", "kubectl", "nvidia-smi", "xpk")


def make_stub_bin(bin_dir: Path, names: tuple[str, ...] = STUBBED) -> Path:
    """Write the stubs into bin_dir (to go first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(_STUB.format(python=sys.executable))
        path.chmod(0o755)
    return bin_dir


def read_calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_launcher(stub_bin: Path, tmp_path: Path, rel: str, args: Sequence[str] = (), env: dict | None = None,
                 stub_exit: int = 0) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run launch/REL with the stubs first on PATH; return (process, recorded calls)."""
    log = tmp_path / f"calls-{len(list(tmp_path.glob('calls-*')))}.jsonl"
    full_env = {
        "PATH": f"{stub_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),  # nothing from the user's own gcloud or shell setup
        "STUB_LOG": str(log),
        "STUB_EXIT": str(stub_exit),
        **(env or {}),
    }
    proc = subprocess.run([BASH, str(LAUNCH / rel), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)
    return proc, read_calls(log)


# Shell tokens that end a command's arguments: redirections, pipes, `&`, `;`.
OPERATOR_CHARS = set(";&|<>()")


def shell_words(command: str) -> list[str]:
    """Split a shell command line like bash does: quotes and escapes honoured, operators apart."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def train_args(argv: list[str]) -> list[str] | None:
    """CONFIG and overrides after `llm-jax train` in an argv, or in a shell command inside it
    (gcloud's --command=..., a container's `bash -c ...`); None if there is no such command."""
    for i, token in enumerate(argv):
        if Path(token).name == "llm-jax" and argv[i + 1 : i + 2] == ["train"]:
            args = []
            for word in argv[i + 2 :]:
                if word and set(word) <= OPERATOR_CHARS:
                    break
                args.append(word)
            return args
        if "llm-jax train" in token and token != "llm-jax train":
            found = train_args(shell_words(token.split("=", 1)[1] if token.startswith("--") else token))
            if found is not None:
                return found
    return None


def flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    for token in argv:
        if token.startswith(f"--{name}="):
            return token.split("=", 1)[1]
    return default
