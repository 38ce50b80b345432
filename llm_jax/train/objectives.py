"""Training objectives over [B, T+1] token windows: causal LM (next token) and masked LM (BERT).

Both reduce a batch to (inputs_BT, targets_BT, weights_BT): the model reads `inputs`, and the
loss is the cross entropy against `targets` summed with `weights` (1 = counts, 0 = ignored),
divided by the summed weights. Causal LM weighs every position; masked LM only the chosen ones.

Masked LM (Devlin et al. 2019): each of the first T positions of a window is chosen with
probability `rate` (15%), independently (a Bernoulli draw per position, as Hugging Face's
DataCollatorForLanguageModeling does, rather than exactly 15% per sequence). Of the chosen
positions 80% become the mask id, 10% a random token and 10% stay as they are; the model must
predict the original token at every chosen position. The draws come from a key that depends only
on (seed, step), so a resumed run and any mesh see the same masks.

The [MASK] id: a tokenizer that has a `[MASK]` token (a BERT tokenizer.json) gives it; otherwise
the first padding row of the model's vocabulary, i.e. the tokenizer's vocabulary size. For the
byte tokenizer (257 ids: bytes and end-of-text) padded to 384 rows that is id 257, a row no text
ever produces, so it can only mean "masked". Random replacements are drawn from the tokenizer's
real ids [0, vocab), never from padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError

MASK_TOKEN = "[MASK]"
# Folded into the seed's key so MLM draws never coincide with the dropout stream of a step.
MLM_STREAM = 0x4D4C4D  # "MLM"
# The held-out loss uses the masks of this (never trained) step number for every evaluation: the
# same positions are scored each time, so evaluations along a run compare like with like.
EVAL_STEP = 2**31 - 1


@dataclass(frozen=True)
class MLMSpec:
    mask_id: int
    vocab_limit: int  # random replacements are drawn from [0, vocab_limit)
    rate: float = 0.15
    mask_frac: float = 0.8  # of the chosen: replaced by mask_id
    random_frac: float = 0.1  # of the chosen: replaced by a random token (the rest stay)


def mlm_spec(tokenizer_vocab: int, model_vocab: int, mask_token_id: int | None = None) -> MLMSpec:
    """The masking spec: `mask_token_id` (the tokenizer's [MASK], if it has one) or else the first
    padding row, `tokenizer_vocab`; random replacements from [0, tokenizer_vocab)."""
    mask_id = mask_token_id
    if mask_id is None:
        mask_id = tokenizer_vocab
        if mask_id >= model_vocab:
            raise UserError(
                f"model.arch=bert needs a [MASK] id: the tokenizer has no {MASK_TOKEN} token and "
                f"model.vocab_size={model_vocab} leaves no padding row after its {tokenizer_vocab} ids; "
                "raise model.vocab_size (or model.vocab_multiple)")
    return MLMSpec(mask_id=int(mask_id), vocab_limit=int(tokenizer_vocab))


def tokenizer_mlm_spec(tokenizer: Any, model_vocab: int) -> MLMSpec:
    """`mlm_spec` for a tokenizer object: its [MASK] token when it has one (`token_id`)."""
    lookup = getattr(tokenizer, "token_id", None)
    return mlm_spec(tokenizer.vocab_size, model_vocab, lookup(MASK_TOKEN) if lookup is not None else None)


def mlm_key(seed: int, step: jax.Array | int) -> jax.Array:
    """The key of one step's masks: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), MLM_STREAM), step)


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


def causal_targets(tokens_BT1: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    """Inputs are the first T tokens, targets the next ones; every position counts (weights None)."""
    return tokens_BT1[:, :-1], tokens_BT1[:, 1:], None


def mlm_targets(tokens_BT1: jax.Array, key: jax.Array, spec: MLMSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masked LM on the first T tokens of each window: (corrupted inputs, originals, chosen as float32)."""
    tokens_BT = tokens_BT1[:, :-1]
    inputs_BT, chosen_BT = mlm_mask(key, tokens_BT, spec)
    return inputs_BT, tokens_BT, chosen_BT.astype(jnp.float32)
