"""BERT's masked LM (Devlin et al. 2019), optionally with next-sentence prediction.

Each of the first T positions of a window is chosen with probability `rate` (15%), independently
(a Bernoulli draw per position, as Hugging Face's DataCollatorForLanguageModeling does). Of the
chosen positions 80% become the mask id, 10% a random token and 10% stay; the model predicts the
original token at every chosen position.

Next-sentence prediction (`train.nsp`): each [B, T+1] window gives a pair. Sentence A is the
first a = (T-3)//2 tokens of row i, and sentence B is either what follows A in the same row
(label 0, IsNext) or the same span of row i+1 (label 1, NotNext; rows are shuffled windows, so
that is another place in the corpus), each with probability 1/2. The model reads
[CLS] A [SEP] B [SEP] with segment 0 up to the first [SEP] and 1 after it, masked as for MLM
except the three special tokens, which are never chosen. The label is scored from the model's
`aux["nsp_logits"]`; the loss sums the masked tokens and the labels over their count.

Extra ids: the tokenizer's own `[MASK]`, `[CLS]`, `[SEP]` when it has them, else the first
padding rows of the model's vocabulary (ids from the tokenizer's vocabulary size up); random
replacements come from the tokenizer's real ids [0, vocab), never padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llm_jax.config import Config
from llm_jax.models.base import ModelOutput
from llm_jax.train.objectives.base import (
    Data,
    TokenObjective,
    Vocab,
    argmax_hits,
    extra_id,
    register_objective,
    scored,
    step_key,
    token_losses,
    weighted_sum,
)

MASK_TOKEN = "[MASK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
# Folded into the seed's key so objective draws never coincide with the dropout stream of a step.
MLM_STREAM = 0x4D4C4D  # "MLM"
NSP_STREAM = 0x4E5350  # "NSP": folded into the step's key, apart from the MLM masks


@dataclass(frozen=True)
class MLMSpec:
    mask_id: int
    vocab_limit: int  # random replacements are drawn from [0, vocab_limit)
    rate: float = 0.15
    mask_frac: float = 0.8  # of the chosen: replaced by mask_id
    random_frac: float = 0.1  # of the chosen: replaced by a random token (the rest stay)


def mlm_spec(vocab: Vocab) -> MLMSpec:
    """The tokenizer's [MASK] (or the first padding row); random replacements from its ids."""
    return MLMSpec(mask_id=extra_id(MASK_TOKEN, 0, vocab), vocab_limit=int(vocab.size))


def mlm_key(seed: int, step: jax.Array | int) -> jax.Array:
    """The key of one step's masks: a pure function of (seed, step)."""
    return step_key(seed, step, MLM_STREAM)


def mlm_mask(key: jax.Array, tokens_BT: jax.Array, spec: MLMSpec) -> tuple[jax.Array, jax.Array]:
    """(corrupted inputs [B, T] int32, chosen [B, T] bool) for BERT's 80/10/10 masking."""
    k_choose, k_kind, k_token = jax.random.split(key, 3)
    shape = tokens_BT.shape
    chosen_BT = jax.random.bernoulli(k_choose, spec.rate, shape)
    kind_BT = jax.random.uniform(k_kind, shape)
    random_BT = jax.random.randint(k_token, shape, 0, spec.vocab_limit, dtype=jnp.int32)
    tokens_BT = tokens_BT.astype(jnp.int32)
    replaced_BT = jnp.where(kind_BT < spec.mask_frac, jnp.int32(spec.mask_id),
                            jnp.where(kind_BT < spec.mask_frac + spec.random_frac, random_BT, tokens_BT))
    return jnp.where(chosen_BT, replaced_BT, tokens_BT), chosen_BT


def mlm_targets(tokens_BT1: jax.Array, key: jax.Array, spec: MLMSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masked LM on the first T tokens of each window: (corrupted inputs, originals, chosen as float32)."""
    tokens_BT = tokens_BT1[:, :-1]
    inputs_BT, chosen_BT = mlm_mask(key, tokens_BT, spec)
    return inputs_BT, tokens_BT, chosen_BT.astype(jnp.float32)


@dataclass(frozen=True)
class NSPSpec:
    cls_id: int
    sep_id: int


def nsp_targets(tokens_BT1: jax.Array, key: jax.Array, mlm: MLMSpec, nsp: NSPSpec) -> Data:
    """(inputs {tokens_BT, segments_BT}, targets {tokens [B, T], next [B]}, weights {tokens [B, T]})
    of MLM + NSP; `next` is 1 where B is not A's continuation."""
    tokens_BT = tokens_BT1[:, :-1].astype(jnp.int32)
    B, T = tokens_BT.shape
    a = (T - 3) // 2
    b = T - 3 - a
    k_pair, k_mask = jax.random.split(jax.random.fold_in(key, NSP_STREAM))
    not_next_B = jax.random.bernoulli(k_pair, 0.5, (B,))
    first_Ba = tokens_BT[:, :a]
    following_Bb = tokens_BT[:, a:a + b]
    second_Bb = jnp.where(not_next_B[:, None], jnp.roll(following_Bb, -1, axis=0), following_Bb)
    col = lambda i: jnp.full((B, 1), i, jnp.int32)  # noqa: E731
    pair_BT = jnp.concatenate([col(nsp.cls_id), first_Ba, col(nsp.sep_id), second_Bb, col(nsp.sep_id)], axis=1)
    special_T = jnp.zeros(T, bool).at[jnp.array([0, a + 1, T - 1])].set(True)
    corrupted_BT, chosen_BT = mlm_mask(k_mask, pair_BT, mlm)
    chosen_BT = chosen_BT & ~special_T
    inputs_BT = jnp.where(chosen_BT, corrupted_BT, pair_BT)
    segments_BT = jnp.broadcast_to((jnp.arange(T) > a + 1).astype(jnp.int32), (B, T))
    targets = {"tokens": pair_BT, "next": not_next_B.astype(jnp.int32)}
    return {"tokens_BT": inputs_BT, "segments_BT": segments_BT}, targets, {"tokens": chosen_BT.astype(jnp.float32)}


@register_objective
@dataclass(frozen=True)
class MaskedLM(TokenObjective):
    """BERT pretraining: masked LM, with `nsp` also next-sentence prediction."""

    name = "mlm"
    seed: int = 0
    mlm: MLMSpec | None = None
    nsp: NSPSpec | None = None

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> MaskedLM:
        nsp = None
        if cfg.train.nsp:
            nsp = NSPSpec(cls_id=extra_id(CLS_TOKEN, 1, vocab), sep_id=extra_id(SEP_TOKEN, 2, vocab))
        return cls(smoothing=cfg.train.label_smoothing, smoothing_ids=vocab.size, seed=cfg.seed, mlm=mlm_spec(vocab),
                   nsp=nsp)

    def data(self, rows: jax.Array, step) -> Data:
        if self.nsp is not None:
            return nsp_targets(rows, mlm_key(self.seed, step), self.mlm, self.nsp)
        inputs_BT, targets_BT, weights_BT = mlm_targets(rows, mlm_key(self.seed, step), self.mlm)
        return {"tokens_BT": inputs_BT}, targets_BT, weights_BT

    def loss(self, out: ModelOutput, targets, weights, train: bool) -> tuple[jax.Array, jax.Array]:
        if self.nsp is None:
            return super().loss(out, targets, weights, train)
        smoothing = self.smoothing if train else 0.0
        total, count = weighted_sum(token_losses(out.logits, targets["tokens"], smoothing, self.smoothing_ids),
                                    weights["tokens"])
        nsp_total, nsp_count = weighted_sum(token_losses(out.aux["nsp_logits"], targets["next"]), None)
        return total + nsp_total, count + nsp_count

    def count(self, targets, weights) -> jax.Array:
        if self.nsp is None:
            return super().count(targets, weights)
        return scored(targets["tokens"], weights["tokens"]) + scored(targets["next"], None)

    def hits(self, out: ModelOutput, targets, weights) -> jax.Array:
        if self.nsp is None:
            return super().hits(out, targets, weights)
        return (argmax_hits(out.logits, targets["tokens"], weights["tokens"])
                + argmax_hits(out.aux["nsp_logits"], targets["next"], None))
