"""Generation for the encoder-decoders (transformer, t5): encode once, decode with a KV cache.

Sources of different lengths are right-padded to a common (bucketed) length and the padding is
hidden from the encoder and the cross-attention by the source mask, so a padded row computes
what it would alone. The encoder runs once; its output is the cached memory every decoder step
cross-attends to. The decoder starts from the start id at position 0 and feeds each new token
back through its self-attention KV cache, all in one compiled `lax.while_loop` that stops once
every row has produced EOS.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.errors import UserError
from llm_jax.inference.generate import BOUNDED_POSITIONS, sample_logits

# Source lengths are rounded up to a multiple of this, so similar lengths share a program.
SOURCE_BUCKET = 16


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "vocab_limit", "cache_shape", "cache_dtype"))
def _generate_jit(graphdef: Any, params: Any, src_BS: jax.Array, src_mask_BS: jax.Array, key: jax.Array,
                  temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, eos_id: jax.Array,
                  start_id: jax.Array, *, max_new_tokens: int, vocab_limit: int | None,
                  cache_shape: tuple, cache_dtype: str) -> jax.Array:
    """New tokens [B, N]; slots after a row's EOS hold EOS (or 0 without an EOS)."""
    model = nnx.merge(graphdef, params)
    B, N = src_BS.shape[0], max_new_tokens
    memory_BSD = model.encode(src_BS, src_mask_BS)
    cache = {name: jnp.zeros(cache_shape, cache_dtype) for name in ("k", "v")}
    sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    stop = eos_id >= 0
    fill = jnp.where(stop, eos_id, 0).astype(jnp.int32)

    def cond(carry):
        i, _, _, _, done_B = carry
        return (i < N) & ~jnp.all(done_B)

    def body(carry):
        # Token i is read at decoder position i (the start id at 0) and predicts output i.
        i, cache, tok_B1, out_BN, done_B = carry
        logits_B1V, cache = model.decode(tok_B1, memory_BSD, src_mask_BS, cache=cache, cache_index=i)
        next_B = jnp.where(done_B, fill, sample(logits_B1V[:, 0], jax.random.fold_in(key, i)))
        out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], i, axis=1)
        return i + 1, cache, next_B[:, None], out_BN, done_B | (stop & (next_B == eos_id))

    start_B1 = jnp.full((B, 1), start_id, jnp.int32)
    out_BN = jnp.full((B, N), fill, jnp.int32)
    carry = (jnp.int32(0), cache, start_B1, out_BN, jnp.zeros(B, bool))
    return jax.lax.while_loop(cond, body, carry)[3]


def generate_seq2seq(graphdef: Any, params: Any, cfg, sources: list[list[int]], *, max_new_tokens: int,
                     temperature: float, top_k: int, top_p: float, seed: int, eos_id: int | None,
                     start_id: int | None, vocab_limit: int | None, dtype: str) -> np.ndarray:
    """Decoded ids [B, max_new_tokens] for sources already checked against the vocabulary.
    `start_id` None: end-of-text (or 0 without one)."""
    longest = max(len(s) for s in sources)
    if cfg.model.position in BOUNDED_POSITIONS and max(longest, max_new_tokens) > cfg.max_seq_len:
        raise UserError(f"source of {longest} tokens or max_new_tokens={max_new_tokens} exceeds the model's "
                        f"max_seq_len={cfg.max_seq_len} ({cfg.model.position} positions)")
    if start_id is None:
        start_id = 0 if eos_id is None else eos_id
    S = -(-longest // SOURCE_BUCKET) * SOURCE_BUCKET
    src_BS = np.zeros((len(sources), S), np.int32)  # pad id 0: masked out
    src_mask_BS = np.zeros((len(sources), S), bool)
    for b, ids in enumerate(sources):
        src_BS[b, :len(ids)] = ids
        src_mask_BS[b, :len(ids)] = True
    m = cfg.model
    cache_shape = (m.decoder_layers, len(sources), max_new_tokens, m.kv_heads, m.head_dim)
    return np.asarray(_generate_jit(
        graphdef, params, src_BS, src_mask_BS, jax.random.key(seed), np.float32(temperature), np.int32(top_k),
        np.float32(top_p),
        np.int32(-1 if eos_id is None else eos_id), np.int32(start_id),
        max_new_tokens=max_new_tokens, vocab_limit=vocab_limit, cache_shape=cache_shape, cache_dtype=str(dtype)))
