"""An RL run's prompts and the scorer of their completions.

rl.reward=NAME (a verifier, `rewards.VERIFIERS`): its task's training prompts
(`rewards.VERIFIER_TRAIN_PROMPTS`, rl.num_prompts of them) and validation prompts.
rl.reward=rm:RUN_DIR (a reward model): the prompts of data.source's prompt_completion JSONL
records, split as SFT splits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llm_jax.alignment.rewards import VERIFIER_PROMPTS, VERIFIER_TRAIN_PROMPTS, VERIFIERS, Scorer, scorer_of
from llm_jax.config import Config
from llm_jax.data.formats import BadRecord, parse_record, string_field
from llm_jax.data.jsonl_files import jsonl_held_out_lines, jsonl_lines
from llm_jax.errors import UserError


@dataclass
class PromptSet:
    """Training and held-out prompts (text) and the scorer of their completions."""

    train: list[str]
    held_out: list[str]
    reward_fn: Scorer


def jsonl_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts of data.source's prompt_completion records (the SFT split rule)."""
    if not cfg.data.source.startswith("jsonl:"):
        raise UserError(f"rl.reward={cfg.rl.reward} needs prompts: set data.source=jsonl:PATH of prompt_completion "
                        f"records (not {cfg.data.source!r})")
    path = Path(cfg.data.source.removeprefix("jsonl:")).expanduser()
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


def prompt_set(cfg: Config) -> PromptSet:
    """The run's prompts and scorer from rl.reward (and data.source for a reward model)."""
    spec = cfg.rl.reward
    if spec.startswith("rm:"):
        train, held_out = jsonl_prompts(cfg)
        return PromptSet(train, held_out, scorer_of(spec))
    if spec in VERIFIERS and spec not in VERIFIER_TRAIN_PROMPTS:
        raise UserError(f"rl.reward={spec}: that verifier has no training prompts to ask")
    reward_fn = scorer_of(spec)  # an unknown name fails here, listing the known ones
    train = VERIFIER_TRAIN_PROMPTS[spec](cfg.rl.num_prompts, cfg.seed)
    held_out = VERIFIER_PROMPTS[spec](cfg.rl.eval_prompts) if cfg.rl.eval_prompts else []
    return PromptSet(train, held_out, reward_fn)
