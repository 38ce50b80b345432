"""Objectives of the supervised stdlib tasks (`data.tasks`): `seq2seq` (an encoder-decoder reads a
padded source and predicts a padded target) and `classify` (a BERT classifier predicts a label
from its [CLS] position, scored from the model's `aux["class_logits"]`)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llm_jax.config import Config
from llm_jax.data.tasks import PAD
from llm_jax.models.base import ModelOutput
from llm_jax.train.objectives.base import (
    Data,
    Objective,
    TokenObjective,
    Vocab,
    argmax_hits,
    extra_id,
    register_objective,
    scored,
    token_losses,
    weighted_sum,
)
from llm_jax.train.objectives.masked_lm import CLS_TOKEN


def seq2seq_targets(rows_BR: jax.Array, src_len: int) -> tuple[dict, jax.Array, jax.Array]:
    """Task rows [B, src_len + T + 1] (`data.tasks`): source, then [start] + target + [eos],
    padded with PAD. Padding reads as id 0 (hidden from attention), and scores nothing."""
    src_BS = rows_BR[:, :src_len]
    dec_BT1 = rows_BR[:, src_len:]
    src_mask_BS = src_BS != PAD
    inputs = {"src_BS": jnp.where(src_mask_BS, src_BS, 0),
              "tgt_BT": jnp.maximum(dec_BT1[:, :-1], 0),  # padding only follows the eos: causal masking hides it
              "src_mask_BS": src_mask_BS}
    targets_BT = dec_BT1[:, 1:]
    weights_BT = (targets_BT != PAD).astype(jnp.float32)
    return inputs, jnp.maximum(targets_BT, 0), weights_BT


@register_objective
@dataclass(frozen=True)
class Seq2Seq(TokenObjective):
    """transformer, t5 on a seq2seq data.task: rows hold a padded source and a padded target;
    padding (PAD) is hidden from attention and from the loss."""

    name = "seq2seq"
    src_len: int = 0

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> Seq2Seq:
        return cls(smoothing=cfg.train.label_smoothing, smoothing_ids=vocab.size, src_len=cfg.train.src_len)

    @staticmethod
    def row_width(cfg: Config) -> int:
        return cfg.train.src_len + cfg.train.seq_len + 1

    def data(self, rows: jax.Array, step) -> Data:
        return seq2seq_targets(rows, self.src_len)


def classify_targets(rows_BR: jax.Array, cls_id: int) -> tuple[dict, jax.Array, None]:
    """Task rows [B, T + 1] (text padded with PAD, then the label): the model reads [CLS] and the
    first T - 1 text tokens, padding hidden; the target is the label, one per row ([B])."""
    text_BT = rows_BR[:, :-2]
    B = rows_BR.shape[0]
    tokens_BT = jnp.concatenate([jnp.full((B, 1), cls_id, jnp.int32), jnp.maximum(text_BT, 0)], axis=1)
    mask_BT = jnp.concatenate([jnp.ones((B, 1), bool), text_BT != PAD], axis=1)
    return {"tokens_BT": tokens_BT, "attention_mask_BT": mask_BT}, rows_BR[:, -1], None


@register_objective
@dataclass(frozen=True)
class Classify(Objective):
    """A label per row from the classifier head; no label smoothing (its outputs are classes)."""

    name = "classify"
    cls_id: int = 0

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> Classify:
        return cls(cls_id=extra_id(CLS_TOKEN, 1, vocab))

    def data(self, rows: jax.Array, step) -> Data:
        return classify_targets(rows, self.cls_id)

    def loss(self, out: ModelOutput, targets, weights, train: bool) -> tuple[jax.Array, jax.Array]:
        return weighted_sum(token_losses(out.aux["class_logits"], targets), weights)

    def hits(self, out: ModelOutput, targets, weights) -> jax.Array:
        return argmax_hits(out.aux["class_logits"], targets, weights)

    def count(self, targets, weights) -> jax.Array:
        return scored(targets, weights)
