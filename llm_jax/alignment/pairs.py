"""Preference pairs from a trained run's own samples on the arithmetic task (`llm-jax pairs`).

For each of `count` training problems of `data.arith` the model samples `samples` completions
at `temperature`; `arith.reward` scores each. The pair of a problem is

- chosen: the best sample if it is right, else the true answer;
- rejected: the worst sample (the first of the lowest reward), unless it scores as much as the
  chosen one (all samples right: the problem gives no pair and is skipped).

A sample is a candidate only when it is not empty and prompt + sample + EOS fits the run's
train.seq_len + 1 tokens (so that the pairs train the same network); a problem with no
candidate is skipped. Records are `data.format=preference` lines with the rewards (rounded to
4 decimals) beside them:
{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm_jax.alignment.best_of_n import sample_n
from llm_jax.data import arith
from llm_jax.data.cache import write_bytes_atomic
from llm_jax.errors import UserError
from llm_jax.inference.api import Model, load


@dataclass(frozen=True)
class PairStats:
    problems: int
    pairs: int
    samples: int
    correct: int
    """Samples exactly right."""
    mean_reward: float
    """Mean `arith.reward` over all samples."""
    all_right: int
    """Problems skipped because every sample was right."""

    def describe(self) -> str:
        return (f"{self.pairs} pairs from {self.problems} problems ({self.all_right} skipped with every sample right): "
                f"{self.correct}/{self.samples} samples exact ({self.correct / max(self.samples, 1):.3f}), "
                f"mean reward {self.mean_reward:.3f}")


def sample_completions(model: Model, prompts: Sequence[str], samples: int, temperature: float,
                       seed: int) -> list[list[str]]:
    """`samples` completions (text, cut at EOS) of each prompt, as long as train.seq_len allows."""
    tok = model.tokenizer
    if tok is None or not model.continues_prompt:
        raise UserError("pairs samples continuations of text prompts: the run must be a decoder with a tokenizer")
    longest = max((len(tok.encode(p)) for p in prompts), default=0)
    max_new = model.config.train.seq_len - longest
    if max_new < 1:
        raise UserError(f"the run's train.seq_len={model.config.train.seq_len} leaves no room for an answer after "
                        f"a prompt of {longest} tokens")
    return sample_n(model, list(prompts), samples, max_new_tokens=max_new, temperature=temperature, seed=seed)


def pair_of(problem: arith.Problem, texts: Sequence[str], fits) -> dict | None:
    """The preference record of one problem's samples (module docstring), or None."""
    scored = [(arith.reward(problem, t), t) for t in texts if t and fits(problem.prompt, t)]
    if not scored:
        return None
    best = max(scored, key=lambda s: s[0])
    chosen = best if best[0] == 1.0 else (1.0, problem.answer)
    worst = min(scored, key=lambda s: s[0])
    if worst[0] >= chosen[0] or worst[1] == chosen[1]:
        return None
    return {"prompt": problem.prompt, "chosen": chosen[1], "rejected": worst[1],
            "chosen_reward": round(chosen[0], 4), "rejected_reward": round(worst[0], 4)}


def build_pairs(model: Model, count: int, samples: int, temperature: float = 1.0,
                seed: int = 0) -> tuple[list[dict], PairStats]:
    """Preference records of `count` training problems (`arith.problems("train", count, seed)`)."""
    if count < 1 or samples < 1:
        raise UserError(f"pairs needs at least one problem and one sample each, got --count {count} "
                        f"--samples {samples}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    tok, width = model.tokenizer, model.config.train.seq_len + 1
    problems = arith.problems("train", count, seed)
    completions = sample_completions(model, [p.prompt for p in problems], samples, temperature, seed)

    def fits(prompt: str, text: str) -> bool:
        return len(tok.encode(prompt)) + len(tok.encode(text)) + 1 <= width

    records, rewards, all_right = [], [], 0
    for problem, texts in zip(problems, completions, strict=True):
        rewards += [arith.reward(problem, t) for t in texts]
        if all(arith.correct(problem, t) for t in texts):
            all_right += 1
        record = pair_of(problem, texts, fits)
        if record is not None:
            records.append(record)
    stats = PairStats(len(problems), len(records), len(rewards), sum(r == 1.0 for r in rewards),
                      sum(rewards) / len(rewards), all_right)
    return records, stats


def write_pairs(run_dir: str | Path, out: str | Path, count: int = 256, samples: int = 4,
                temperature: float = 1.0, seed: int = 0) -> PairStats:
    """Sample from `run_dir`'s newest checkpoint and write the pairs to a new JSONL file `out`
    (an existing file is never overwritten)."""
    out = Path(out).expanduser()
    if out.exists():
        raise UserError(f"{out} exists; pairs writes a new file (remove it or choose another --out)")
    records, stats = build_pairs(load(run_dir), count, samples, temperature, seed)
    write_bytes_atomic(out, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return stats
