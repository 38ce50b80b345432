"""Where rewards come from: a reward model's score head, or a verifier that checks an answer.

A scorer maps (prompts, completions) as text to rewards [N] float32 on the host. `scorer_of`
builds one from its name in a config or on the command line:

    rm:RUN_DIR   a reward model run (data.format=preference, pref.method=reward): its score at the
                 EOS ending prompt + completion (`Model.score`)
    arith        the embedded arithmetic task's checker (`data.arith.reward`, docs/alignment.md)
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from llm_jax.data import arith
from llm_jax.errors import UserError
from llm_jax.inference.api import load

Scorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# Verifiers by name: (prompts, completions) -> rewards; and the prompts each brings (its
# task's validation prompts, the first `count`).
VERIFIERS: dict[str, Scorer] = {}
VERIFIER_PROMPTS: dict[str, Callable[[int], list[str]]] = {}
# ... and its training prompts for RL (`rl.reward=NAME`): (count, seed) -> the task's train split.
VERIFIER_TRAIN_PROMPTS: dict[str, Callable[[int, int], list[str]]] = {}


def scorer_of(spec: str) -> Scorer:
    """The scorer named `spec`: `rm:RUN_DIR` or a verifier's name."""
    if spec.startswith("rm:"):
        return load(spec.removeprefix("rm:")).score
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    raise UserError(f"unknown reward {spec!r}: use rm:RUN_DIR (a reward model run) or a verifier "
                    f"({', '.join(VERIFIERS) or 'none registered'})")


def arith_scorer(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    return np.asarray([arith.reward(arith.problem_of(p), c) for p, c in zip(prompts, completions, strict=True)],
                      np.float32)


VERIFIERS["arith"] = arith_scorer
VERIFIER_PROMPTS["arith"] = lambda count: [p.prompt for p in arith.problems("validation", count)]
VERIFIER_TRAIN_PROMPTS["arith"] = lambda count, seed: [p.prompt for p in arith.problems("train", count, seed)]
