"""An embedded, verifiable task: integer addition and subtraction, `data.source=instruct:arith`.

A problem is a prompt such as `37+48=` and its answer `85`; subtraction may go below zero
(`12-85=` -> `-73`). Each operand has 1 to `MAX_DIGITS` digits (the digit count drawn first,
then the number, so short and long operands are alike common). A model writes the answer after
the prompt and stops with EOS; `reward` reads that completion as decoded text, so any sampler,
tokenizer or training method can be scored the same way, without a human or a network.

Split: a problem is a validation problem when a hash of its prompt falls in the lowest
`VALIDATION_SHARE` of the hash range, else a training one. The split is a property of the
problem itself, so `problems("train", ...)` and `problems("validation", ...)` never share a
prompt, whatever their counts and seeds. `problems(split, count, seed)` draws distinct problems
of the split from a generator seeded by (seed, split): the same arguments give the same list.

Reward (`reward(problem, completion)`, in [0, 1]; the completion with surrounding whitespace
removed):

- 1.0: exactly the answer (`correct`).
- `FORMAT_CREDIT + DIGIT_CREDIT * share` = 0.1 + 0.4 * share for another well-formed integer
  (`-?[0-9]+`): share is the fraction of character positions, aligned from the right (units
  with units, the sign as one more place), where the completion and the answer agree, over the
  longer of the two. So `512` for `522` gets 0.1 + 0.4 * 2/3 = 0.367, `-522` for `522` 0.1 +
  0.4 * 3/4 = 0.4; a wrong answer never reaches 0.5, half of a right one.
- 0.0: anything else (empty, words, a number followed by more text).

The shaping gives a policy a slope towards the right answer (a right last digit first, as
carries are learnt) while keeping exactness worth twice any near miss.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from llm_jax.errors import UserError

MAX_DIGITS = 2
OPERATIONS = ("+", "-")
VALIDATION_SHARE = 0.1
FORMAT_CREDIT = 0.1
DIGIT_CREDIT = 0.4
SPLITS = ("train", "validation")
# Bump when the problems of a (split, count, seed) or their split change (cached records rebuild).
ARITH_VERSION = 1

_INTEGER = re.compile(r"-?[0-9]+")
_PROMPT = re.compile(r"([0-9]+)([+-])([0-9]+)=")
# Distinct (a, op, b) prompts: (10^MAX_DIGITS)^2 * 2 operations.
_SPACE = (10 ** MAX_DIGITS) ** 2 * len(OPERATIONS)


@dataclass(frozen=True)
class Problem:
    prompt: str
    """`a+b=` or `a-b=`: what the model continues."""
    answer: str
    """The result as a plain integer, `-` before a negative one, no leading zeros."""

    @property
    def kind(self) -> str:
        """`add` or `sub` (exact match is reported per kind)."""
        return "sub" if "-" in self.prompt else "add"  # (operands are never negative)


def make_problem(a: int, op: str, b: int) -> Problem:
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; use one of {OPERATIONS}")
    return Problem(f"{a}{op}{b}=", str(a + b if op == "+" else a - b))


def problem_of(prompt: str) -> Problem:
    """The problem a prompt states (`a+b=`, `a-b=`): its answer follows from the text."""
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise UserError(f"the arithmetic task's prompts have the form a+b= or a-b=, not {prompt!r}")
    return make_problem(int(match[1]), match[2], int(match[3]))


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: its SHA-256 against VALIDATION_SHARE."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "validation" if digest < VALIDATION_SHARE * 2**64 else "train"


# Candidate problems drawn at a time (numpy draws in bulk; the order within a draw is kept).
_DRAW = 1024


def _operands(rng: np.random.Generator) -> np.ndarray:
    """_DRAW operands: a digit count in [1, MAX_DIGITS], then a number of exactly that many."""
    digits = rng.integers(1, MAX_DIGITS + 1, _DRAW)
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    return low + (rng.random(_DRAW) * (10 ** digits - low)).astype(np.int64)


def problems(split: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of `split` ("train" or "validation"), deterministic in
    (split, count, seed); a longer list with the same seed starts with the shorter one."""
    if split not in SPLITS:
        raise UserError(f"unknown arith split {split!r}; use train or validation")
    if count < 0:
        raise UserError(f"the count of arith problems must be at least 0, got {count}")
    share = VALIDATION_SHARE if split == "validation" else 1 - VALIDATION_SHARE
    if count > share * _SPACE / 2:  # (drawing distinct ones would crawl near the space's size)
        raise UserError(f"{count} {split} arith problems asked for; the task holds about {int(share * _SPACE)}, "
                        f"use at most half of them")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    found: dict[str, Problem] = {}
    while len(found) < count:
        ops = rng.integers(len(OPERATIONS), size=_DRAW)
        for a, op, b in zip(_operands(rng).tolist(), ops.tolist(), _operands(rng).tolist()):
            problem = make_problem(a, OPERATIONS[op], b)
            if problem.prompt not in found and split_of(problem.prompt) == split:
                found[problem.prompt] = problem
                if len(found) == count:
                    break
    return list(found.values())


def correct(problem: Problem, completion: str) -> bool:
    """Whether the completion, surrounding whitespace removed, is exactly the answer."""
    return completion.strip() == problem.answer


def digit_share(answer: str, guess: str) -> float:
    """Share of character positions, aligned from the right, where two integers' texts agree,
    over the longer text's length (the module docstring)."""
    width = max(len(answer), len(guess))
    same = sum(x == y for x, y in zip(reversed(answer), reversed(guess)))
    return same / width


def reward(problem: Problem, completion: str) -> float:
    """1.0 right; 0.1 + 0.4 * digit_share for another integer; 0.0 otherwise (module docstring)."""
    text = completion.strip()
    if text == problem.answer:
        return 1.0
    if not _INTEGER.fullmatch(text):
        return 0.0
    return FORMAT_CREDIT + DIGIT_CREDIT * digit_share(problem.answer, text)


def record(problem: Problem) -> dict:
    """The problem as a prompt_completion JSONL record (`data.source=instruct:arith`)."""
    return {"prompt": problem.prompt, "completion": problem.answer, "kind": problem.kind}
