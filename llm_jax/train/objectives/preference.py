"""Learning from preference pairs (data.format=preference, `pref.method`): `reward`, a reward model
trained by the Bradley-Terry loss, and `dpo`, the policy trained by Direct Preference Optimisation
and its variants against a frozen reference model. The losses are `llm_jax.losses`.

A row holds a pair, int32 of width 4W with W = train.seq_len + 1:

    [chosen tokens W | chosen mask W | rejected tokens W | rejected mask W]

tokens: prompt, completion, EOS, right-padded with EOS; mask 1 on the completion's tokens and its
EOS (token t is predicted by the logits at t - 1, so mask[0] is 0). Both completions of every pair
go through the model as one batch of 2B rows, interleaved (chosen 0, rejected 0, chosen 1, ...) so
a pair stays together in any split of the batch (devices, gradient-accumulation microbatches):
inputs are each row's first W - 1 tokens, targets the next ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from llm_jax import losses
from llm_jax.config import Config
from llm_jax.data.preference import split_rows
from llm_jax.models.base import ModelOutput
from llm_jax.parallel.rules import constrain
from llm_jax.train.objectives.base import Data, Objective, Vocab, register_objective


def pair_data(rows_BR: jax.Array, width: int) -> Data:
    """Both completions as one batch [2B] (interleaved: chosen, rejected, chosen, ...): inputs {tokens_BT [2B, W - 1]},
    targets [2B, W - 1] (the next tokens), weights [2B, W - 1] float32 (1 on the scored
    completion tokens, their final EOS included)."""
    chosen_BW, chosen_mask_BW, rejected_BW, rejected_mask_BW = split_rows(rows_BR)
    B, W = chosen_BW.shape
    # (Constrained: the partitioner would otherwise pick an odd layout for the merged batch.)
    tokens_NW = constrain(jnp.stack([chosen_BW, rejected_BW], axis=1).reshape(2 * B, W), ("batch", None))
    mask_NW = constrain(jnp.stack([chosen_mask_BW, rejected_mask_BW], axis=1).reshape(2 * B, W), ("batch", None))
    return {"tokens_BT": tokens_NW[:, :-1]}, tokens_NW[:, 1:], mask_NW[:, 1:].astype(jnp.float32)


def halves(x_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chosen [B], rejected [B]) of a batch of 2B values laid out by `pair_data`."""
    return x_N[0::2], x_N[1::2]


def pairs(targets: Any) -> jax.Array:
    """The number of pairs of a batch (float32)."""
    tokens = targets["tokens"] if isinstance(targets, dict) else targets
    return jnp.asarray(tokens.shape[0] // 2, jnp.float32)


def last_scored_input(weights_NT: jax.Array) -> jax.Array:
    """[N] int32: the input position holding each row's last scored token (its completion's final
    EOS). Target j is token j + 1, so the last scored target j reads that token at input j + 1;
    a completion whose EOS is the window's very last token (an input to nothing) is read at the
    token before it, the last one the model sees."""
    T = weights_NT.shape[1]
    last_target_N = T - 1 - jnp.argmax(weights_NT[:, ::-1] > 0, axis=1)
    return jnp.minimum(last_target_N + 1, T - 1).astype(jnp.int32)


@register_objective
@dataclass(frozen=True)
class Reward(Objective):
    """A reward model: the score head's value at each completion's final EOS is its reward; the
    loss is Bradley-Terry's -log sigmoid(r_chosen - r_rejected - margin), plus reward centring
    (center_coef * (r_chosen + r_rejected)^2, TRL's center_rewards_coefficient); accuracy is
    the share of pairs ranked right (r_chosen > r_rejected)."""

    name = "reward"
    sequences_per_row: ClassVar[int] = 2
    width: int = 0  # W = train.seq_len + 1 tokens per completion
    margin: float = 0.0
    center_coef: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> Reward:
        return cls(width=cfg.train.seq_len + 1, margin=cfg.pref.margin, center_coef=cfg.pref.center_coef)

    @staticmethod
    def row_width(cfg: Config) -> int:
        return 4 * (cfg.train.seq_len + 1)

    def data(self, rows: jax.Array, step) -> Data:
        return pair_data(rows, self.width)

    def rewards(self, out: ModelOutput, weights_NT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(r_chosen [B], r_rejected [B]) float32."""
        at_N = last_scored_input(weights_NT)
        score_N = jnp.take_along_axis(out.aux["score"], at_N[:, None], axis=1)[:, 0].astype(jnp.float32)
        return halves(score_N)

    def loss(self, out: ModelOutput, targets, weights, train: bool) -> tuple[jax.Array, jax.Array]:
        chosen_B, rejected_B = self.rewards(out, weights)
        per_pair_B = losses.reward_pairwise(chosen_B, rejected_B, self.margin)
        if self.center_coef > 0:
            per_pair_B = per_pair_B + self.center_coef * (chosen_B + rejected_B) ** 2
        return per_pair_B.sum(), pairs(targets)

    def hits(self, out: ModelOutput, targets, weights) -> jax.Array:
        chosen_B, rejected_B = self.rewards(out, weights)
        return (chosen_B > rejected_B).astype(jnp.float32).sum()

    def count(self, targets, weights) -> jax.Array:
        return pairs(targets)

    def metrics(self, out: ModelOutput, targets, weights) -> dict[str, jax.Array]:
        chosen_B, rejected_B = self.rewards(out, weights)
        return {"rewards/chosen": chosen_B.sum(), "rewards/rejected": rejected_B.sum(),
                "rewards/margin": (chosen_B - rejected_B).sum(),
                "rewards/accuracy": (chosen_B > rejected_B).astype(jnp.float32).sum()}


@register_objective
@dataclass(frozen=True)
class DPO(Objective):
    """Direct Preference Optimisation (Rafailov et al. 2023) and its variants (`pref.kind`): the
    policy's and the frozen reference's log-probabilities of each completion (summed over its
    scored tokens; IPO: their mean, as Azar et al. specify) give the per-pair loss
    `losses.dpo`. The implicit rewards beta * (log pi - log pi_ref) of the chosen and rejected
    completions are the metrics; accuracy is the share of pairs whose chosen reward is higher."""

    name = "dpo"
    needs_reference: ClassVar[bool] = True
    sequences_per_row: ClassVar[int] = 2
    width: int = 0  # W = train.seq_len + 1 tokens per completion
    beta: float = 0.1
    kind: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0  # weight of the chosen completion's NLL per token

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> DPO:
        p = cfg.pref
        return cls(width=cfg.train.seq_len + 1, beta=p.beta, kind=p.kind, label_smoothing=p.label_smoothing,
                   rpo_alpha=p.rpo_alpha)

    @staticmethod
    def row_width(cfg: Config) -> int:
        return 4 * (cfg.train.seq_len + 1)

    def data(self, rows: jax.Array, step) -> Data:
        inputs, targets_NT, weights_NT = pair_data(rows, self.width)
        return inputs, {"tokens": targets_NT}, weights_NT

    def completion_logps(self, out: ModelOutput, targets_NT: jax.Array, weights_NT: jax.Array) -> jax.Array:
        """[2B] float32: each completion's log-probability (IPO: per scored token)."""
        logps_N = losses.masked_sum(losses.token_logps(out.logits, targets_NT), weights_NT, axis=1)
        if self.kind == "ipo":
            logps_N = logps_N / jnp.maximum(weights_NT.sum(axis=1), 1.0)
        return logps_N

    def add_reference(self, ref_out: ModelOutput, targets, weights) -> dict:
        return {**targets, "ref_logps": self.completion_logps(ref_out, targets["tokens"], weights)}

    def chosen_nll(self, out: ModelOutput, targets_NT: jax.Array, weights_NT: jax.Array) -> jax.Array:
        """[B] float32: the negative log-likelihood per scored token of each chosen completion."""
        mean_N = losses.masked_sum(losses.token_logps(out.logits, targets_NT), weights_NT, axis=1) / jnp.maximum(
            weights_NT.sum(axis=1), 1.0)
        return -halves(mean_N)[0]

    def rewards(self, out: ModelOutput, targets, weights) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(per-pair loss [B] (with RPO's NLL term), implicit chosen reward [B], implicit rejected reward [B])."""
        policy_N = self.completion_logps(out, targets["tokens"], weights)
        policy_chosen_B, policy_rejected_B = halves(policy_N)
        ref_chosen_B, ref_rejected_B = halves(targets["ref_logps"])
        loss_B = losses.dpo(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta=self.beta,
                            label_smoothing=self.label_smoothing, kind=self.kind)
        if self.rpo_alpha > 0:
            loss_B = loss_B + self.rpo_alpha * self.chosen_nll(out, targets["tokens"], weights)
        return (loss_B, losses.dpo_implicit_rewards(policy_chosen_B, ref_chosen_B, self.beta),
                losses.dpo_implicit_rewards(policy_rejected_B, ref_rejected_B, self.beta))

    def loss(self, out: ModelOutput, targets, weights, train: bool) -> tuple[jax.Array, jax.Array]:
        # Label smoothing here is part of the loss (an assumed rate of flipped labels), so the
        # held-out loss keeps it too.
        loss_B, _, _ = self.rewards(out, targets, weights)
        return loss_B.sum(), pairs(targets)

    def hits(self, out: ModelOutput, targets, weights) -> jax.Array:
        _, chosen_B, rejected_B = self.rewards(out, targets, weights)
        return (chosen_B > rejected_B).astype(jnp.float32).sum()

    def count(self, targets, weights) -> jax.Array:
        return pairs(targets)

    def metrics(self, out: ModelOutput, targets, weights) -> dict[str, jax.Array]:
        _, chosen_B, rejected_B = self.rewards(out, targets, weights)
        policy_chosen_B, policy_rejected_B = halves(self.completion_logps(out, targets["tokens"], weights))
        return {"rewards/chosen": chosen_B.sum(), "rewards/rejected": rejected_B.sum(),
                "rewards/margin": (chosen_B - rejected_B).sum(),
                "rewards/accuracy": (chosen_B > rejected_B).astype(jnp.float32).sum(),
                "logps/chosen": policy_chosen_B.sum(), "logps/rejected": policy_rejected_B.sum()}
