"""Next-token prediction: `causal` (every position) and `masked_causal` (only the positions a row's
weights select: a synthetic task's answers, `data.synthetic`, or a supervised example's
completion, `data.formats`).

With `train.packing` a window holds several documents, each ending in the tokenizer's EOS: the
inputs then also carry segment ids and per-document positions (derived here, on device, from the
window alone, so data order and every mesh see the same ones), and the target after an EOS input
(the next document's first token) is not scored. Packed supervised rows (`masked_causal`, a chat
has EOS inside it) carry their segment ids instead, written by the packer.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llm_jax.config import Config
from llm_jax.config.schema import SYNTHETIC_TASKS
from llm_jax.data.formats import packed_row_width
from llm_jax.data.synthetic import synthetic_ids
from llm_jax.errors import UserError
from llm_jax.train.objectives.base import Data, TokenObjective, Vocab, register_objective


def causal_targets(tokens_BT1: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    """Inputs are the first T tokens, targets the next ones; every position counts (weights None)."""
    return tokens_BT1[:, :-1], tokens_BT1[:, 1:], None


def eos_segment_ids(rows_BT1: jax.Array, eos_id: int) -> jax.Array:
    """Segment ids [B, T + 1] of text windows whose documents end in EOS: a new segment starts
    right after each EOS token (the row's first token starts segment 0)."""
    starts_BT1 = jnp.pad(rows_BT1[:, :-1] == eos_id, ((0, 0), (1, 0)))
    return jnp.cumsum(starts_BT1, axis=1, dtype=jnp.int32)


def packed_inputs(tokens_BT: jax.Array, segment_ids_BT1: jax.Array) -> tuple[dict, jax.Array]:
    """Model inputs of packed windows whose T + 1 tokens have segment ids [B, T + 1] (from EOS,
    `eos_segment_ids`, or written by the packer, `data.sft_rows.pack_examples`), and [B, T]
    float32 weights that drop the targets of another segment than their input's.

    Positions count from 0 at each segment's start (where the id changes); target t (token t + 1)
    is kept only where token t + 1 is in token t's segment, so no document predicts the next one's
    first token, whatever the row's weights say (train.loss_on=all scores every token).
    """
    B, T = tokens_BT.shape
    segment_ids_BT = segment_ids_BT1[:, :T]
    starts_BT = jnp.pad(segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1], ((0, 0), (1, 0)))
    t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    first_BT = jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)  # the start of t's segment
    inputs = {"tokens_BT": tokens_BT, "positions_BT": t_BT - first_BT, "segment_ids_BT": segment_ids_BT}
    return inputs, (segment_ids_BT1[:, 1:] == segment_ids_BT).astype(jnp.float32)


@register_objective
@dataclass(frozen=True)
class Causal(TokenObjective):
    """GPT, the recurrent cells, Mamba: rows are [B, T+1] windows; inputs the first T tokens,
    targets the next."""

    name = "causal"
    packing: bool = False  # train.packing: documents (EOS-terminated) kept apart within a row
    eos_id: int = -1

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> Causal:
        return cls(smoothing=cfg.train.label_smoothing, smoothing_ids=vocab.size, packing=cfg.train.packing,
                   eos_id=vocab.eos_id)

    def data(self, rows: jax.Array, step) -> Data:
        inputs_BT, targets_BT, weights = causal_targets(rows)
        if not self.packing:
            return {"tokens_BT": inputs_BT}, targets_BT, weights
        inputs, weights_BT = packed_inputs(inputs_BT, eos_segment_ids(rows, self.eos_id))
        return inputs, targets_BT, weights_BT


def masked_causal_targets(rows_BR: jax.Array, seq_len: int) -> tuple[dict, jax.Array, jax.Array]:
    """Rows [B, 2T + 1] (`data.synthetic`, `data.formats`): a window of T + 1 tokens, then T weights
    (packed supervised rows [B, 3T + 2] then also T + 1 segment ids, read by `MaskedCausal`).
    Inputs are the window's first T tokens, targets the next; only targets of weight 1 are scored."""
    T = seq_len
    return {"tokens_BT": rows_BR[:, :T]}, rows_BR[:, 1:T + 1], rows_BR[:, T + 1:2 * T + 1].astype(jnp.float32)


@register_objective
@dataclass(frozen=True)
class MaskedCausal(TokenObjective):
    """Next-token prediction scored only where the row's weights are 1: a synthetic task's answers
    (eval accuracy is then the task's accuracy) or a prompt/completion or chat example's scored
    tokens (eval loss is then per completion token)."""

    name = "masked_causal"
    seq_len: int = 0  # T of the rows [B, 2T + 1] ([B, 3T + 2] packed)
    packing: bool = False  # train.packing: several examples per row, kept apart by the row's segment ids

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> MaskedCausal:
        if cfg.data.task not in SYNTHETIC_TASKS:  # text examples: smoothing over the tokenizer's ids
            return cls(smoothing=cfg.train.label_smoothing, smoothing_ids=vocab.size, seq_len=cfg.train.seq_len,
                       packing=cfg.train.packing)
        ids = synthetic_ids(cfg.data.synthetic_vocab)
        if ids > vocab.rows:
            raise UserError(f"data.task={cfg.data.task} uses {ids} token ids (data.synthetic_vocab="
                            f"{cfg.data.synthetic_vocab} and 3 special ones) but the model has {vocab.rows} rows; "
                            f"lower data.synthetic_vocab or raise model.vocab_size")
        # Label smoothing spreads over the task's own ids, not the tokenizer's.
        return cls(smoothing=cfg.train.label_smoothing, smoothing_ids=ids, seq_len=cfg.train.seq_len)

    @staticmethod
    def row_width(cfg: Config) -> int:
        # (packing is refused for the synthetic tasks: packed masked rows are supervised examples)
        return packed_row_width(cfg.train.seq_len) if cfg.train.packing else 2 * cfg.train.seq_len + 1

    def data(self, rows: jax.Array, step) -> Data:
        inputs, targets_BT, weights_BT = masked_causal_targets(rows, self.seq_len)
        if not self.packing:
            return inputs, targets_BT, weights_BT
        # Packed rows are supervised examples (the synthetic tasks refuse packing) with the
        # packer's segment ids: a chat's EOS inside it does not end it.
        inputs, boundary_BT = packed_inputs(inputs["tokens_BT"], rows[:, 2 * self.seq_len + 1:])
        return inputs, targets_BT, weights_BT * boundary_BT
