"""The config sections of learning from preferences and rewards (docs/alignment.md): `pref`
(preference pairs: DPO and its variants, reward models, trained by the ordinary step) and `rl`
(PPO, GRPO, RLOO: the RL runner of `llm_jax.alignment`). Split from `config.schema`, which
holds the run's other sections and imports these.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import model_validator

from llm_jax.config.model import Section


class PrefConfig(Section):
    method: Literal["dpo", "reward"] = "dpo"
    """data.format=preference: train the policy by DPO (or a variant, pref.kind), or a reward model."""
    beta: float = pydantic.Field(0.1, gt=0)
    """DPO: how strongly the policy is held to the reference (the implicit reward's scale; IPO: margin 1/(2 beta))."""
    kind: Literal["sigmoid", "robust", "ipo", "hinge"] = "sigmoid"
    """DPO loss: sigmoid (DPO), robust (rDPO), ipo (IPO, length-normalised log-probs), hinge (SLiC)."""
    label_smoothing: float = pydantic.Field(0.0, ge=0.0, lt=0.5)
    """DPO sigmoid, robust: assumed rate of flipped preference labels (conservative DPO, robust DPO)."""
    rpo_alpha: float = pydantic.Field(0.0, ge=0.0)
    """DPO: adds rpo_alpha times the chosen completion's NLL per token (RPO, Pang et al. 2024; TRL's rpo_alpha)."""
    margin: float = pydantic.Field(0.0)
    """Reward model: the margin the chosen reward must beat the rejected by: -log sigmoid(r_c - r_r - margin)."""
    center_coef: float = pydantic.Field(0.0, ge=0.0)
    """Reward model: adds center_coef * mean((r_c + r_r)^2), keeping rewards centred on 0 (TRL: 0.01)."""


class RLConfig(Section):
    """`llm-jax train` with rl.method != none: reinforcement learning from a reward (docs/alignment.md)."""

    method: Literal["none", "ppo", "grpo", "rloo"] = "none"
    """none: ordinary training; ppo (value head, GAE, KL penalty in the reward), grpo or rloo (groups, no critic)."""
    reward: str = "arith"
    """What scores a completion: arith (the arithmetic task's verifier) or rm:RUN_DIR (a reward model run)."""
    num_prompts: int = pydantic.Field(4096, ge=1)
    """Training problems drawn from a verifier task (rl.reward=arith); each step picks from them."""
    prompts_per_step: int = pydantic.Field(16, ge=1)
    """Prompts drawn per RL step (a pure function of seed and step)."""
    group_size: int = pydantic.Field(1, ge=1)
    """Completions sampled per prompt; grpo and rloo compare within a group and need at least 2."""
    max_new_tokens: int = pydantic.Field(16, ge=1)
    """Longest completion sampled; one without EOS by then is scored as it stands."""
    temperature: float = pydantic.Field(1.0, gt=0)
    """Sampling temperature; log-probabilities are taken of the logits divided by it (as TRL does)."""
    kl_coef: float = pydantic.Field(0.05, ge=0)
    """Weight of the KL to the reference: per-token reward penalty (ppo), sequence penalty (rloo), loss term (grpo)."""
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    """KL estimator of the ppo / rloo reward penalty (Schulman's k1, k2, k3); grpo's loss term is always k3."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019); the coefficient is kept in the train state."""
    kl_target: float = pydantic.Field(6.0, gt=0)
    """adaptive_kl: the KL (summed over a completion) the controller aims at."""
    kl_horizon: int = pydantic.Field(10000, ge=1)
    """adaptive_kl: the controller's horizon in completions (larger: slower changes)."""
    gamma: float = pydantic.Field(1.0, ge=0, le=1)
    """ppo: discount of GAE."""
    lam: float = pydantic.Field(0.95, ge=0, le=1)
    """ppo: lambda of GAE."""
    clip: float = pydantic.Field(0.2, gt=0)
    """Clip range of the policy ratio."""
    value_clip: float = pydantic.Field(0.2, gt=0)
    """ppo: clip range of the value prediction around its rollout value."""
    vf_coef: float = pydantic.Field(0.1, ge=0)
    """ppo: weight of the value loss (the value head shares the policy's network)."""
    epochs: int = pydantic.Field(4, ge=1)
    """Passes over each step's rollouts."""
    minibatches: int = pydantic.Field(1, ge=1)
    """Minibatches per pass; one optimiser update each."""
    whiten: bool = True
    """Normalise advantages: ppo, rloo over the batch (mean 0, std 1); grpo by each group's std."""
    eval_prompts: int = pydantic.Field(0, ge=0)
    """At each evaluation, the mean reward of greedy completions of this many held-out prompts (0: off)."""

    @model_validator(mode="after")
    def _check_groups(self) -> RLConfig:
        if self.method in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(f"rl.method={self.method} compares completions of one prompt: set rl.group_size >= 2")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError(f"rl.prompts_per_step * rl.group_size = {self.prompts_per_step * self.group_size} "
                             f"completions do not split into rl.minibatches={self.minibatches}")
        return self
