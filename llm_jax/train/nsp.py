"""BERT's next-sentence prediction (Devlin et al. 2019), on top of masked LM.

Each [B, T+1] window gives a pair: sentence A is the first a = (T-3)//2 tokens of row i, and
sentence B is either what follows A in the same row (label 0, IsNext) or the same span of row
i+1 (label 1, NotNext; rows are shuffled windows, so that is another place in the corpus), each
with probability 1/2. The model reads [CLS] A [SEP] B [SEP] with segment 0 up to the first [SEP]
and 1 after it, masked as for MLM except the three special tokens, which are never chosen.

The NSP label is scored as one more target per row: the model returns its two NSP logits as an
extra position after the T token positions (padded to the vocabulary with -1e9, so the softmax
is over the two classes), and the loss sums the masked tokens and the labels over their count.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llm_jax.train.objectives import MLMSpec, mlm_mask

NSP_STREAM = 0x4E5350  # "NSP": folded into the step's key, apart from the MLM masks


@dataclass(frozen=True)
class NSPSpec:
    cls_id: int
    sep_id: int


def nsp_targets(tokens_BT1: jax.Array, key: jax.Array, mlm: MLMSpec, nsp: NSPSpec) -> tuple[dict, jax.Array, jax.Array]:
    """(inputs {tokens_BT, segments_BT}, targets [B, T+1], weights [B, T+1]) of MLM + NSP."""
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
    targets_BT1 = jnp.concatenate([pair_BT, not_next_B.astype(jnp.int32)[:, None]], axis=1)
    weights_BT1 = jnp.concatenate([chosen_BT.astype(jnp.float32), jnp.ones((B, 1), jnp.float32)], axis=1)
    return {"tokens_BT": inputs_BT, "segments_BT": segments_BT}, targets_BT1, weights_BT1
