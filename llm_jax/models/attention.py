"""Multi-head / grouped-query attention with optional KV cache, and its kernels.

One module serves every causal use here (training, prefill, one-token decode) and, with
`causal=False`, the bidirectional self-attention of an encoder (BERT). Kernels:
- `xla` / `cudnn`: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).
- `blockwise`: causal attention that skips key blocks above the diagonal; on CPU the XLA
  kernel computes the whole T x T score matrix, and this halves the work for long sequences.
- `splash` (TPU) and `pallas_gpu` (GPU): JAX's Pallas flash-attention kernels
  (`models/pallas_attention.py`; interpret mode on CPU).
- `masked` (internal): einsum with an explicit mask, for padded batches and the KV cache.

Packed rows (`train.packing`) pass `segment_ids_BT`: every kernel then also hides keys of another
segment (document), so attention never crosses a document boundary.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.models.layers import Dense, apply_rope
from llm_jax.models.pallas_attention import KERNEL_PLATFORM, pallas_gpu_attention, splash_attention
from llm_jax.parallel.platform import pallas_interpret, target_platform
from llm_jax.parallel.rules import constrain

NEG_INF = -1e30  # finite, so fully masked rows (padding) give zeros, not NaNs


def _scores_softmax_values(q_BTKGH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                           mask: jax.Array | None, bias: jax.Array | None = None,
                           scale: float | None = None) -> jax.Array:
    """softmax(scale * q k^T + bias, masked) v with fp32 scores; mask and bias broadcast to
    [B, K, G, T, S]; scale defaults to 1/sqrt(h)."""
    scale = 1.0 / math.sqrt(q_BTKGH.shape[-1]) if scale is None else scale
    s = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = jnp.where(mask, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v_BSKH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v_BSKH)


def masked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS: jax.Array | None,
                     bias_BNTS: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Reference attention under an explicit boolean mask [B, T, S] (True = may attend; None:
    everything visible) and an optional additive bias [B or 1, N, T, S] (T5's positions)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    mask = mask_BTS[:, None, None, :, :] if mask_BTS is not None else None
    bias = None
    if bias_BNTS is not None:  # head n = k * G + g, the order of q's reshape
        bias = bias_BNTS.reshape(bias_BNTS.shape[0], K, N // K, *bias_BNTS.shape[2:])
    out = _scores_softmax_values(q, k_BSKH, v_BSKH, mask, bias, scale)
    return out.reshape(B, T, N, H)


def same_segment(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, T, T] True where query t and key s belong to the same packed segment (document)."""
    return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def _causal_bias(rows: int, end: int) -> jax.Array:
    """Additive mask for queries end-rows..end-1 against keys 0..end-1 (0 = visible)."""
    visible = jnp.arange(end)[None, :] <= (end - rows + jnp.arange(rows))[:, None]
    return jnp.where(visible, 0.0, NEG_INF).astype(jnp.float32)


def _block_bias(rows: int, end: int, seg_BT: jax.Array | None) -> jax.Array:
    """The causal bias of one query block, [rows, end] or with segment ids [B, 1, rows, end]:
    a key of another segment is hidden like a future one."""
    bias = _causal_bias(rows, end)
    if seg_BT is None:
        return bias
    same_BtS = seg_BT[:, end - rows:end, None] == seg_BT[:, None, :end]
    return jnp.where(same_BtS, bias, NEG_INF)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise_bnth(q_BNTH, k_BNTH, v_BNTH, seg_BT, block: int) -> jax.Array:
    return _blockwise_fwd(q_BNTH, k_BNTH, v_BNTH, seg_BT, block)[0]


def _blockwise_fwd(q_BNTH, k_BNTH, v_BNTH, seg_BT, block):
    T, H = q_BNTH.shape[2:]
    qs_BNTH = q_BNTH * (1.0 / math.sqrt(H))
    outs, probs = [], []
    for end in range(block, T + 1, block):
        # Query block [end-block, end) sees keys [0, end): blocks above the diagonal are skipped.
        # The probabilities kept for the backward pass are the masked ones, so it needs no mask.
        s_BNtS = jnp.einsum("bnth,bnsh->bnts", qs_BNTH[:, :, end - block:end], k_BNTH[:, :, :end],
                            preferred_element_type=jnp.float32) + _block_bias(block, end, seg_BT)
        p_BNtS = jnp.exp(s_BNtS - s_BNtS.max(-1, keepdims=True))
        p_BNtS = (p_BNtS / p_BNtS.sum(-1, keepdims=True)).astype(v_BNTH.dtype)
        probs.append(p_BNtS)
        outs.append(jnp.einsum("bnts,bnsh->bnth", p_BNtS, v_BNTH[:, :, :end]))
    o_BNTH = jnp.concatenate(outs, axis=2)
    return o_BNTH, (qs_BNTH, k_BNTH, v_BNTH, o_BNTH, probs, seg_BT)


def _blockwise_bwd(block, residuals, do_BNTH):
    # The softmax backward written out (dS = P * (dP - rowsum(dO * O))) instead of autodiff's
    # chain through max/exp/sum/div: fewer passes over the score blocks, which dominate on CPU.
    qs_BNTH, k_BNTH, v_BNTH, o_BNTH, probs, seg_BT = residuals
    T, H = qs_BNTH.shape[2:]
    delta_BNT1 = (do_BNTH.astype(jnp.float32) * o_BNTH.astype(jnp.float32)).sum(-1, keepdims=True)
    dq_parts = []
    dk_BNTH = jnp.zeros(k_BNTH.shape, jnp.float32)
    dv_BNTH = jnp.zeros(v_BNTH.shape, jnp.float32)
    for i, end in enumerate(range(block, T + 1, block)):
        p_BNtS, do_BNtH = probs[i], do_BNTH[:, :, end - block:end]
        dv_BNTH = dv_BNTH.at[:, :, :end].add(
            jnp.einsum("bnts,bnth->bnsh", p_BNtS, do_BNtH, preferred_element_type=jnp.float32))
        dp_BNtS = jnp.einsum("bnth,bnsh->bnts", do_BNtH, v_BNTH[:, :, :end], preferred_element_type=jnp.float32)
        ds_BNtS = (p_BNtS * (dp_BNtS - delta_BNT1[:, :, end - block:end])).astype(k_BNTH.dtype)
        dq_parts.append(jnp.einsum("bnts,bnsh->bnth", ds_BNtS, k_BNTH[:, :, :end],
                                   preferred_element_type=jnp.float32) / math.sqrt(H))
        dk_BNTH = dk_BNTH.at[:, :, :end].add(
            jnp.einsum("bnts,bnth->bnsh", ds_BNtS, qs_BNTH[:, :, end - block:end], preferred_element_type=jnp.float32))
    dq_BNTH = jnp.concatenate(dq_parts, axis=2)
    # Segment ids are integers: their cotangent is float0 zeros.
    dseg = None if seg_BT is None else np.zeros(seg_BT.shape, jax.dtypes.float0)
    return dq_BNTH.astype(qs_BNTH.dtype), dk_BNTH.astype(k_BNTH.dtype), dv_BNTH.astype(v_BNTH.dtype), dseg


_blockwise_bnth.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_causal_attention(q_BTNH, k_BTKH, v_BTKH, block: int,
                               segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Causal attention per query block against only the keys at or before it (and, given
    `segment_ids_BT`, in the query's own segment).

    Written for XLA on CPU, where the score blocks (not the matmuls) dominate: heads-major
    layout, diagonal-only masking, and a hand-written backward pass. Grouped KV heads are
    repeated to the query heads (autodiff sums their gradients back).
    """
    T = q_BTNH.shape[1]
    groups = q_BTNH.shape[2] // k_BTKH.shape[2]
    if groups > 1:
        k_BTKH, v_BTKH = jnp.repeat(k_BTKH, groups, axis=2), jnp.repeat(v_BTKH, groups, axis=2)
    block = block if T % block == 0 else T
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 - [B,T,N,H] <-> [B,N,T,H]
    out = _blockwise_bnth(heads_major(q_BTNH), heads_major(k_BTKH), heads_major(v_BTKH), segment_ids_BT,
                          min(block, T))
    return heads_major(out)


PALLAS = {"splash": splash_attention, "pallas_gpu": pallas_gpu_attention}


def causal_attention(q_BTNH, k_BTKH, v_BTKH, kernel: str, block: int,
                     segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Causal attention by `kernel`; with `segment_ids_BT` a query also sees only its own segment."""
    if kernel == "blockwise":
        return blockwise_causal_attention(q_BTNH, k_BTKH, v_BTKH, block, segment_ids_BT)
    if kernel in PALLAS:
        return PALLAS[kernel](q_BTNH, k_BTKH, v_BTKH, causal=True, segment_ids_BT=segment_ids_BT)
    # The segment mask travels as `mask` [B, 1, T, T] beside is_causal; the cuDNN kernel turns it
    # into an additive bias (jax's fused attention: combine_bias_and_mask). Unverified on GPU here.
    mask = None if segment_ids_BT is None else same_segment(segment_ids_BT)[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask, is_causal=True, implementation=kernel)


def bidirectional_attention(q_BTNH, k_BTKH, v_BTKH, kernel: str) -> jax.Array:
    """Every query attends to every key (an encoder without padding).

    `blockwise` exists only for the causal case, so on CPU this is the einsum reference (with no
    mask to apply); the XLA and cuDNN kernels take `is_causal=False` directly.
    """
    if kernel in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=False, implementation=kernel)
    if kernel in PALLAS:
        return PALLAS[kernel](q_BTNH, k_BTKH, v_BTKH, causal=False)
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    out = _scores_softmax_values(q_BTNH.reshape(B, T, K, N // K, H), k_BTKH, v_BTKH, None)
    return out.reshape(B, T, N, H)


def resolve_kernel(requested: str) -> str:
    """`auto`: cuDNN flash attention on GPU, blockwise on CPU, XLA elsewhere (TPU). The Pallas
    kernels are never picked by `auto` (not yet measured on their accelerators) and are refused
    on the other accelerator (CPU runs either in interpret mode)."""
    if requested in KERNEL_PLATFORM:  # refused now, on the wrong accelerator, not at the first trace
        pallas_interpret(f"model.attention={requested}", KERNEL_PLATFORM[requested], "model.attention=auto there")
    platform = target_platform()
    if requested != "auto":
        return requested
    if platform == "gpu":
        return "cudnn"
    return "blockwise" if platform == "cpu" else "xla"


class Attention(nnx.Module):
    """Self-attention (causal or bidirectional) and, given `kv_BSD`, cross-attention.

    `scale` multiplies the scores (default 1/sqrt(head_dim); T5 uses 1, its initialisation
    absorbs the factor).
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rngs: nnx.Rngs, std: float, out_std: float, use_bias: bool, scale: float | None = None):
        self.scale = scale
        self.q = Dense((d_model,), (num_heads, head_dim), ("embed", "heads", "head_dim"),
                       rngs=rngs, std=std, use_bias=use_bias)
        self.k = Dense((d_model,), (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                       rngs=rngs, std=std, use_bias=use_bias)
        self.v = Dense((d_model,), (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                       rngs=rngs, std=std, use_bias=use_bias)
        self.o = Dense((num_heads, head_dim), (d_model,), ("heads", "head_dim", "embed"),
                       rngs=rngs, std=out_std, use_bias=use_bias)

    def __call__(self, x_BTD: jax.Array, *, rope=None, kernel: str | None = None, block: int = 128,
                 mask_BTS: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | None = None, causal: bool = True,
                 kv_BSD: jax.Array | None = None, bias_BNTS: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """Self-attention over x; with `cache`, the new keys/values are written at `cache_index`
        and the queries attend over the whole cache under `mask_BTS` ([B, T, S_cache]).

        Without a mask, `causal` picks causal (decoders) or full (encoders) attention; a given
        `mask_BTS` is applied as it is in either case. `kv_BSD` (an encoder's output) makes it
        cross-attention: keys and values come from it, under `mask_BTS` if given. `bias_BNTS`
        is added to the scores (T5's relative positions). `segment_ids_BT` (packed rows, causal
        self-attention without a cache) hides keys of other segments in every kernel."""
        dtype = x_BTD.dtype
        source_BSD = x_BTD if kv_BSD is None else kv_BSD.astype(dtype)
        q_BTNH = constrain(self.q(x_BTD, dtype), ("batch", "length", "heads", "head_dim"))
        k_BTKH = constrain(self.k(source_BSD, dtype), ("batch", "length", "kv_heads", "head_dim"))
        v_BTKH = constrain(self.v(source_BSD, dtype), ("batch", "length", "kv_heads", "head_dim"))
        if rope is not None:
            q_BTNH, k_BTKH = apply_rope(q_BTNH, rope), apply_rope(k_BTKH, rope)
        new_cache = None
        if cache is not None:
            k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_BTKH.astype(cache["k"].dtype), cache_index, 1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_BTKH.astype(cache["v"].dtype), cache_index, 1)
            new_cache = {"k": k_all, "v": v_all}
            out_BTNH = masked_attention(q_BTNH, k_all.astype(dtype), v_all.astype(dtype), mask_BTS,
                                        bias_BNTS, self.scale)
        elif mask_BTS is not None or kv_BSD is not None or bias_BNTS is not None or self.scale is not None:
            if kv_BSD is None and causal and mask_BTS is None:
                mask_BTS = jnp.tril(jnp.ones((q_BTNH.shape[1],) * 2, bool))[None]
            if segment_ids_BT is not None and kv_BSD is None:
                mask_BTS = same_segment(segment_ids_BT) if mask_BTS is None else mask_BTS & same_segment(segment_ids_BT)
            out_BTNH = masked_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS, bias_BNTS, self.scale)
        elif causal:
            out_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, kernel, block, segment_ids_BT)
        else:
            out_BTNH = bidirectional_attention(q_BTNH, k_BTKH, v_BTKH, kernel)
        return self.o(out_BTNH, dtype), new_cache
