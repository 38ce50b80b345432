"""Prompts to train on and what scores their completions: host-side `reward_fn(prompts,
completions) -> float32 [B]`, from a verifiable task or from a reward model run.

`rl.reward=NAME` names a task in `TASKS`: an object with `problems(split, count, seed)` (each
problem has a `.prompt`) and `reward(problem, completion) -> float` (the arithmetic task of
`llm_jax.data.arith` has exactly that shape; tests register small stand-ins).
`rl.reward=rm:RUN_DIR` scores with a decoder trained with `model.score_head`: the score at the
completion's final EOS, batched and jitted on the mesh. Its prompts then come from data.source
(prompt_completion JSONL records).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import Config
from llm_jax.data.formats import BadRecord, parse_record, string_field
from llm_jax.data.jsonl_files import jsonl_held_out_lines, jsonl_lines
from llm_jax.errors import UserError
from llm_jax.models.decoding import PROMPT_BUCKET
from llm_jax.models.definition import param_shardings
from llm_jax.parallel.rules import activation_mesh
from llm_jax.runtime.restore import restore_params

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class VerifiableTask(Protocol):
    def problems(self, split: str, count: int, seed: int = 0) -> list[Any]: ...

    def reward(self, problem: Any, completion: str) -> float: ...


# rl.reward names -> tasks. `llm_jax.data.arith` registers "arith" below when present.
TASKS: dict[str, VerifiableTask] = {}


@dataclass
class PromptSet:
    """Training and held-out prompts (text) and the scorer of their completions."""

    train: list[str]
    held_out: list[str]
    reward_fn: RewardFn


def task_reward_fn(task: VerifiableTask, problems: Sequence[Any]) -> RewardFn:
    by_prompt = {p.prompt: p for p in problems}

    def reward_fn(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.asarray([task.reward(by_prompt[p], c) for p, c in zip(prompts, completions, strict=True)],
                          np.float32)

    return reward_fn


def jsonl_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts of data.source's prompt_completion records (the SFT split rule)."""
    if not cfg.data.source.startswith("jsonl:"):
        raise UserError(f"rl.reward={cfg.rl.reward} needs prompts: set data.source=jsonl:PATH of prompt_completion "
                        f"records (not {cfg.data.source!r})")
    path = Path(cfg.data.source[len("jsonl:"):]).expanduser()
    if not path.is_file():
        raise UserError(f"data.source: {path} is not a file")
    held_out = jsonl_held_out_lines(path, cfg.data.val_fraction)
    train, val = [], []
    for i, line in jsonl_lines(path):
        try:
            prompt = string_field(parse_record(line), "prompt")
        except BadRecord as exc:
            raise UserError(f"{path}:{i + 1}: {exc}") from None
        (val if i in held_out else train).append(prompt)
    if not train:
        raise UserError(f"{path} has no training prompts")
    return train, val


def reward_model_fn(run_dir: str, mesh: Mesh) -> RewardFn:
    """Scores of a reward model run at each completion's final EOS (prompt + completion + EOS)."""
    rm_cfg, tokenizer, mdef, params, _ = restore_params(run_dir)
    if not getattr(rm_cfg.model, "score_head", False):
        raise UserError(f"rl.reward=rm:{run_dir}: that run has no model.score_head (train a reward model first)")
    params = jax.device_put(params, param_shardings(mdef, mesh))
    replicated = NamedSharding(mesh, P())

    @partial(jax.jit, out_shardings=replicated)
    def scores(params: dict, tokens_BL: jax.Array, last_B: jax.Array) -> jax.Array:
        with activation_mesh(mesh):
            out = nnx.merge(mdef.graphdef, params)(tokens_BL)
            return jnp.take_along_axis(out.aux["score"], last_B[:, None], axis=1)[:, 0].astype(jnp.float32)

    def reward_fn(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        rows = [tokenizer.encode(p) + tokenizer.encode(c) + [tokenizer.eos_id] for p, c in zip(prompts, completions)]
        width = -(-max(len(r) for r in rows) // PROMPT_BUCKET) * PROMPT_BUCKET  # few distinct shapes
        tokens = np.full((len(rows), width), tokenizer.eos_id, np.int32)  # right padding: causal, never read
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = r
        last = np.asarray([len(r) - 1 for r in rows], np.int32)
        return np.asarray(scores(params, jax.device_put(tokens, replicated), jax.device_put(last, replicated)))

    return reward_fn


def prompt_set(cfg: Config, mesh: Mesh) -> PromptSet:
    """The run's prompts and reward function from rl.reward (and data.source for a reward model)."""
    name = cfg.rl.reward
    if name.startswith("rm:"):
        train, held_out = jsonl_prompts(cfg)
        return PromptSet(train, held_out, reward_model_fn(name[3:], mesh))
    if name not in TASKS:
        known = ", ".join([*sorted(TASKS), "rm:RUN_DIR"])
        raise UserError(f"rl.reward={name!r} is not a known reward; use one of: {known}")
    task = TASKS[name]
    train_problems = task.problems("train", cfg.rl.num_prompts, cfg.seed)
    held_problems = task.problems("validation", max(cfg.rl.eval_prompts, 1), cfg.seed)
    return PromptSet([p.prompt for p in train_problems], [p.prompt for p in held_problems],
                     task_reward_fn(task, [*train_problems, *held_problems]))
