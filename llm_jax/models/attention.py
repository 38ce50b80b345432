"""Multi-head / grouped-query attention with optional KV cache, and its kernels.

One module serves every causal use here (training, prefill, one-token decode). Kernels:
- `xla` / `cudnn`: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).
- `blockwise`: causal attention that skips key blocks above the diagonal; on CPU the XLA
  kernel computes the whole T x T score matrix, and this halves the work for long sequences.
- `masked` (internal): einsum with an explicit mask, for padded batches and the KV cache.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.models.layers import Dense, apply_rope
from llm_jax.parallel.rules import constrain

NEG_INF = -1e30  # finite, so fully masked rows (padding) give zeros, not NaNs


def _scores_softmax_values(q_BTKGH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                           mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(h) + mask) v with fp32 scores; mask broadcasts to [B, K, G, T, S]."""
    scale = 1.0 / math.sqrt(q_BTKGH.shape[-1])
    s = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v_BSKH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v_BSKH)


def masked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS: jax.Array) -> jax.Array:
    """Reference attention under an explicit boolean mask [B, T, S] (True = may attend)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    out = _scores_softmax_values(q, k_BSKH, v_BSKH, mask_BTS[:, None, None, :, :])
    return out.reshape(B, T, N, H)


def blockwise_causal_attention(q_BTNH, k_BTKH, v_BTKH, block: int) -> jax.Array:
    """Causal attention computed per query block against only the keys at or before it."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if T <= block or T % block:
        causal = jnp.tril(jnp.ones((T, T), bool))
        return masked_attention(q_BTNH, k_BTKH, v_BTKH, jnp.broadcast_to(causal, (B, T, T)))
    q = q_BTNH.reshape(B, T, K, N // K, H)
    diag = jnp.tril(jnp.ones((block, block), bool))
    outs = []
    for i in range(T // block):
        end = (i + 1) * block
        # Keys before this block are all visible; only the diagonal block needs the triangle.
        mask = jnp.concatenate([jnp.ones((block, end - block), bool), diag], axis=1)
        outs.append(_scores_softmax_values(q[:, i * block:end], k_BTKH[:, :end], v_BTKH[:, :end], mask))
    return jnp.concatenate(outs, axis=1).reshape(B, T, N, H)


def causal_attention(q_BTNH, k_BTKH, v_BTKH, kernel: str, block: int) -> jax.Array:
    if kernel == "blockwise":
        return blockwise_causal_attention(q_BTNH, k_BTKH, v_BTKH, block)
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=kernel)


def resolve_kernel(requested: str) -> str:
    """`auto`: cuDNN flash attention on GPU, blockwise on CPU, XLA elsewhere (TPU)."""
    if requested != "auto":
        return requested
    platform = jax.default_backend()
    if platform == "gpu":
        return "cudnn"
    return "blockwise" if platform == "cpu" else "xla"


class Attention(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rngs: nnx.Rngs, std: float, out_std: float, use_bias: bool):
        self.q = Dense((d_model,), (num_heads, head_dim), ("embed", "heads", "head_dim"),
                       rngs=rngs, std=std, use_bias=use_bias)
        self.k = Dense((d_model,), (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                       rngs=rngs, std=std, use_bias=use_bias)
        self.v = Dense((d_model,), (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                       rngs=rngs, std=std, use_bias=use_bias)
        self.o = Dense((num_heads, head_dim), (d_model,), ("heads", "head_dim", "embed"),
                       rngs=rngs, std=out_std, use_bias=use_bias)

    def __call__(self, x_BTD: jax.Array, *, rope, kernel: str | None, block: int,
                 mask_BTS: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """Self-attention over x; with `cache`, the new keys/values are written at `cache_index`
        and the queries attend over the whole cache under `mask_BTS` ([B, T, S_cache])."""
        dtype = x_BTD.dtype
        q_BTNH = constrain(self.q(x_BTD, dtype), ("batch", "length", "heads", "head_dim"))
        k_BTKH = constrain(self.k(x_BTD, dtype), ("batch", "length", "kv_heads", "head_dim"))
        v_BTKH = constrain(self.v(x_BTD, dtype), ("batch", "length", "kv_heads", "head_dim"))
        if rope is not None:
            q_BTNH, k_BTKH = apply_rope(q_BTNH, rope), apply_rope(k_BTKH, rope)
        new_cache = None
        if cache is not None:
            k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BTKH.astype(cache["k"].dtype), cache_index, 1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BTKH.astype(cache["v"].dtype), cache_index, 1)
            new_cache = {"k": k_all, "v": v_all}
            out_BTNH = masked_attention(q_BTNH, k_all.astype(dtype), v_all.astype(dtype), mask_BTS)
        elif mask_BTS is not None:
            out_BTNH = masked_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS)
        else:
            out_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, kernel, block)
        return self.o(out_BTNH, dtype), new_cache
