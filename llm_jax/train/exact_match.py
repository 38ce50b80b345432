"""Exact match of greedy completions: does the model, given a held-out example's prompt, write
exactly its answer and then stop?

`train.eval_exact_match=N` runs it at every evaluation on the first N validation examples of a
prompt_completion or chat source (packed or not); `experiments/instruct_eval.py` runs it on any
run directory.

    examples = completions_of_rows(rows, seq_len, kinds, n)      # prompts and answers of masked rows
    texts = greedy_texts(model, cfg, tokenizer, [e.prompt for e in examples], max_new_tokens)
    exact_match_scores(texts, [decode(e.answer) ...], kinds)     # {"eval_exact_match": ..., per kind}

An example's prompt (each example of a packed row is read apart, `sft_rows.unpacked_examples`)
is its tokens before the first scored target (a chat's turns up to the first assistant header),
its answer the scored tokens after that, up to the EOS that ends them (the first assistant
turn). Predictions and answers are compared as decoded text, so a tokenizer
that could spell an answer two ways is not penalised for the other spelling. Greedy decoding
is `inference.generate` with temperature 0, stopped at EOS: a right answer that runs on is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_jax.config import Config
from llm_jax.data.formats import packed_row_width
from llm_jax.data.sft_rows import unpacked_examples
from llm_jax.errors import UserError
from llm_jax.inference.generate import generate
from llm_jax.models.decoding import bounded_length

METRIC = "eval_exact_match"


@dataclass(frozen=True)
class Completion:
    prompt: list[int]
    answer: list[int]
    """The answer's ids, without the EOS that ends it."""
    kind: str = ""


def check_exact_match(cfg: Config) -> None:
    """A UserError unless train.eval_exact_match can run on cfg's (resolved) data."""
    if not cfg.train.eval_exact_match:
        return
    if cfg.data.format not in ("prompt_completion", "chat"):
        raise UserError(f"train.eval_exact_match completes held-out prompts of data.format=prompt_completion or "
                        f"chat records; data.source={cfg.data.source} is data.format={cfg.data.format}")
    if cfg.train.loss_on != "completion":
        raise UserError("train.eval_exact_match needs train.loss_on=completion (the scored tokens are the answers)")


def completion_of_row(row: np.ndarray, seq_len: int, eos_id: int, kind: str = "") -> Completion | None:
    """The prompt and answer of one masked row (width 2 * seq_len + 1; of a packed row, width
    3 * seq_len + 2, its first example's); None when nothing is scored."""
    if len(row) == packed_row_width(seq_len):
        examples = unpacked_examples(row, seq_len, eos_id)
        if not examples:
            return None
        row = examples[0]
    tokens, weights = row[:seq_len + 1], row[seq_len + 1:2 * seq_len + 1]
    scored = np.flatnonzero(weights)
    if not len(scored):
        return None
    first = int(scored[0])  # weight j scores token j + 1
    end = first
    while end < seq_len and weights[end]:
        end += 1
    answer = [int(t) for t in tokens[first + 1:end + 1]]
    if eos_id in answer:
        answer = answer[:answer.index(eos_id)]
    return Completion([int(t) for t in tokens[:first + 1]], answer, kind)


def completions_of_rows(rows: np.ndarray, seq_len: int, eos_id: int, kinds: Sequence[str] | None,
                        limit: int) -> list[Completion]:
    """The first `limit` examples' prompts and answers (fewer when there are fewer), `kinds` one
    per example: packed rows (train.packing) give each of their examples in order, so a packed
    run scores the same examples as an unpacked one."""
    found = []
    index = 0  # of the example, in the file's order
    for i in range(len(rows)):
        if index >= limit:
            break
        row = np.asarray(rows[i])
        examples = unpacked_examples(row, seq_len, eos_id) if len(row) == packed_row_width(seq_len) else [row]
        for example_row in examples[:limit - index]:
            example = completion_of_row(example_row, seq_len, eos_id, kinds[index] if kinds else "")
            index += 1
            if example is not None:
                found.append(example)
    return found


def greedy_ids(model: Any, cfg: Config, prompts: Sequence[list[int]], *, max_new_tokens: int, eos_id: int,
               vocab_limit: int | None, batch_size: int) -> list[list[int]]:
    """Greedy continuations of each prompt, stopped at EOS (not included), `batch_size` at a time.

    `model` is what `inference.generate` takes (an NNX model or a (ModelDef, params) pair). A
    model with bounded positions generates at most what fits after the longest prompt of a
    batch; prompts are sorted by length first so short ones are not cut by long neighbours.
    """
    limit = bounded_length(cfg)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = [prompts[i] for i in chosen]
        batch += [batch[-1]] * (batch_size - len(batch))  # one batch shape: one compiled program
        new = max_new_tokens if limit is None else min(max_new_tokens, limit - max(map(len, batch)))
        if new < 1:
            continue  # prompts that fill the model's positions: no room for an answer (scored wrong)
        generated = generate(model, cfg, batch, max_new_tokens=new, temperature=0.0, eos_id=eos_id,
                             vocab_limit=vocab_limit)
        for i, ids in zip(chosen, generated, strict=False):
            out[i] = ids
    return out


def exact_match_scores(predictions: Sequence[str], answers: Sequence[str],
                       kinds: Sequence[str] | None = None) -> dict[str, float]:
    """{"eval_exact_match": share right} and, for records with a kind, "eval_exact_match/KIND"."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return {}
    right = [p == a for p, a in zip(predictions, answers, strict=True)]
    scores = {METRIC: sum(right) / len(right)}
    by_kind: dict[str, list[bool]] = {}
    for kind, hit in zip(kinds or [""] * len(right), right, strict=True):
        if kind:
            by_kind.setdefault(kind, []).append(hit)
    for kind in sorted(by_kind):
        scores[f"{METRIC}/{kind}"] = sum(by_kind[kind]) / len(by_kind[kind])
    return scores


def evaluate_exact_match(model: Any, cfg: Config, tokenizer: Any, examples: Sequence[Completion],
                         batch_size: int) -> dict[str, float]:
    """Exact match of the model's greedy completions of `examples` (overall and per kind)."""
    if not examples:
        return {}
    longest = max(len(e.answer) for e in examples) + 1  # room for the EOS after the longest answer
    ids = greedy_ids(model, cfg, [e.prompt for e in examples], max_new_tokens=longest, eos_id=tokenizer.eos_id,
                     vocab_limit=tokenizer.vocab_size, batch_size=batch_size)
    predictions = [tokenizer.decode(p) for p in ids]
    answers = [tokenizer.decode(e.answer) for e in examples]
    return exact_match_scores(predictions, answers, [e.kind for e in examples])


def describe_exact_match(scores: dict[str, float]) -> str:
    """`exact match 0.42 (name_function 0.10, module_of 0.80)`, or "" without scores."""
    if METRIC not in scores:
        return ""
    kinds = [f"{key.split('/', 1)[1]} {value:.3f}" for key, value in scores.items() if key.startswith(METRIC + "/")]
    return f"exact match {scores[METRIC]:.3f}" + (f" ({', '.join(kinds)})" if kinds else "")
