"""Best-of-N sampling: draw N completions of each prompt, score them with a reward model or a
verifier, keep the best (Nakano et al. 2021; Gao et al. 2023 measure it against RL).

    result = best_of_n(policy, prompts, n=16, scorer=scorer_of("rm:runs/rm_arith"))
    result.best[i]             # the best of prompt i's 16 completions
    result.mean_best(4)        # mean score of the best of the first 4 samples per prompt

One sampling pass serves every N up to the largest: best-of-k reads the first k samples of each
prompt, so the curve over k is of nested samples (lower variance than separate draws).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from llm_jax.alignment.rewards import Scorer
from llm_jax.data.jsonl_files import json_value
from llm_jax.errors import UserError
from llm_jax.inference.api import Model

# Rows per sampling call: prompts x samples are generated in chunks of about this many rows.
ROWS_PER_CALL = 256


@dataclass
class BestOfN:
    prompts: list[str]
    samples: list[list[str]]  # [P][N] completions
    scores: np.ndarray  # [P, N] float32

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    def best_index(self, k: int | None = None) -> np.ndarray:
        """[P]: which of the first k samples scores highest (the first of ties)."""
        k = self.n if k is None else k
        return self.scores[:, :k].argmax(axis=1)

    @property
    def best(self) -> list[str]:
        return [row[i] for row, i in zip(self.samples, self.best_index())]

    def mean_best(self, k: int) -> float:
        """Mean over prompts of the best score among the first k samples."""
        if not 1 <= k <= self.n:
            raise UserError(f"best-of-{k} needs 1 <= k <= {self.n} samples")
        return float(self.scores[:, :k].max(axis=1).mean())

    def share_at_least(self, k: int, threshold: float) -> float:
        """Share of prompts whose best of the first k samples scores >= threshold (a verifier's 1.0: solved)."""
        return float((self.scores[:, :k].max(axis=1) >= threshold).mean())


def sample_n(policy: Model, prompts: Sequence[str], n: int, *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
    """`n` completions (text, cut at EOS) of every prompt, [P][N], sampled in calls of about
    ROWS_PER_CALL rows; a seed per call, so calls draw independently and the same arguments
    repeat the same draws."""
    per_call = max(1, ROWS_PER_CALL // n)
    samples: list[list[str]] = []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        out = policy.generate([p for p in chunk for _ in range(n)], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed + start)
        samples += [out[i * n:(i + 1) * n] for i in range(len(chunk))]
    return samples


def best_of_n(policy: Model, prompts: Sequence[str], n: int, scorer: Scorer, *, max_new_tokens: int = 32,
              temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> BestOfN:
    """Sample `n` completions of every prompt from `policy` and score each with `scorer`."""
    if n < 1:
        raise UserError(f"best-of-n needs n >= 1, got {n}")
    if temperature <= 0 and n > 1:
        raise UserError("best-of-n with temperature 0 draws the same greedy completion n times; use temperature > 0")
    prompts = list(prompts)
    if not prompts:
        raise UserError("best-of-n got no prompts")
    samples = sample_n(policy, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed)
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_samples = [s for row in samples for s in row]
    scores = np.asarray(scorer(flat_prompts, flat_samples), np.float32).reshape(len(prompts), n)
    return BestOfN(prompts, samples, scores)


def read_prompts(path: str | Path, count: int) -> list[str]:
    """The first `count` prompts of a file: JSONL records with a `prompt` field (a .jsonl file), else
    one prompt per non-empty line (`\\n` inside a line stands for a newline)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompts file not found: {file}")
    prompts: list[str] = []
    with file.open("rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for number, raw in enumerate(f, 1):
            if len(prompts) == count:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{file}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            if file.suffix == ".jsonl":
                try:
                    record = json_value(line)
                except ValueError as exc:
                    raise UserError(f"{file}:{number}: {exc}") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise UserError(f"{file}:{number}: a record needs a text field 'prompt'")
                prompts.append(record["prompt"])
            else:
                prompts.append(line.rstrip("\r\n").replace("\\n", "\n"))
    if not prompts:
        raise UserError(f"{file} holds no prompts")
    return prompts


def format_curve(result: BestOfN, ks: Sequence[int], reward: str) -> str:
    """A table: N, mean best reward, share of prompts whose best scores 1 (solved, for a verifier)."""
    lines = [f"best-of-N on {len(result.prompts)} prompts, reward {reward}",
             f"{'N':>5}  {'mean reward':>11}  {'share >= 1':>10}"]
    lines += [f"{k:>5}  {result.mean_best(k):>11.4f}  {result.share_at_least(k, 1.0):>10.3f}" for k in ks]
    return "\n".join(lines)


def write_best(result: BestOfN, out: str | Path) -> None:
    """Every prompt's best completion as JSONL (prompt, completion, score); never overwrites."""
    path = Path(out).expanduser()
    if path.exists():
        raise UserError(f"{path} exists; choose a new --out file (it is never overwritten)")
    best = result.best_index()
    with path.open("x", encoding="utf-8") as f:
        for i, (prompt, j) in enumerate(zip(result.prompts, best)):
            record = {"prompt": prompt, "completion": result.samples[i][j], "score": float(result.scores[i, j])}
            f.write(json.dumps(record) + "\n")
