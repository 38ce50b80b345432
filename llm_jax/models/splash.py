"""Splash attention (`model.attention=splash`): JAX's Pallas TPU kernel for block-sparse flash
attention, with segment ids for packed rows.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) takes one example, [heads, T,
head_dim], and skips the key blocks its static mask (causal, or full) leaves empty; segment ids
mask inside the blocks it visits. Here it is vmapped over the batch and, under a mesh of more
than one device, run per device in a `shard_map` (GSPMD cannot split a pallas_call: left to it,
the operands would be gathered whole onto every device).

- Grouped KV heads go in as they are: the kernel's MHA form maps query head n to KV head
  n // (N / K), the order of `masked_attention`'s reshape (n = k * G + g).
- The kernel does not scale the scores: q is multiplied by 1/sqrt(head_dim) (or `scale`) first.
- Its KV blocks must be multiples of 128 (TPU lanes), in interpret mode too, so T is padded to a
  multiple of 128 and one block length (512, 256 or 128, the largest dividing it) serves every
  pass. A causal query never sees the padded keys (they lie after every real query); without a
  causal mask, and with segment ids, the padding gets a segment of its own (-1, which no real
  token has: packing counts segments from 0), so only padded queries see it. Padded rows are
  cut off the output.
- Target TPU: the compiled kernel. Target CPU: Pallas interpret mode (slow; for tests). Target
  GPU: refused in `attention.resolve_kernel` (a Mosaic TPU kernel).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from llm_jax.parallel.platform import target_platform
from llm_jax.parallel.rules import current_mesh, logical_to_spec

LANES = 128  # the kernel's KV blocks are multiples of the TPU's 128 lanes
BLOCKS = (512, 256, 128)  # tried largest first: fewer grid steps (512: splash's own benchmarks' choice)
PAD_SEGMENT = -1


def splash_blocks(length: int) -> tuple[int, int]:
    """(block, padded length): T rounded up to a multiple of 128, and the largest of 512, 256,
    128 that divides it."""
    padded = -(-length // LANES) * LANES
    return next(b for b in BLOCKS if padded % b == 0), padded


def _kernel(heads: int, length: int, block: int, causal: bool, interpret: bool) -> splash.SplashAttentionKernel:
    """The kernel for `heads` query heads over `length` tokens. Built at each trace: it holds its
    block tables as arrays, which a cached kernel would leak out of the trace that made them
    (the Python work behind them, splash's `_process_mask`, is cached by splash itself)."""
    shape = (length, length)
    mask = splash.MultiHeadMask([splash.CausalMask(shape) if causal else splash.FullMask(shape)] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_BNTH, k_BKTH, v_BKTH, seg_BT, *, causal: bool, interpret: bool) -> jax.Array:
    """One device's share: the kernel vmapped over its examples (heads-major layout)."""
    B, N, T, H = q_BNTH.shape
    block, _ = splash_blocks(T)
    kernel = _kernel(N, T, block, causal, interpret)
    if seg_BT is None:
        return jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(q_BNTH, k_BKTH, v_BKTH, seg_BT)


def splash_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, *, causal: bool = True,
                     segment_ids_BT: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Self-attention by the splash kernel: causal or full, and given `segment_ids_BT` only within
    a query's own segment. [B, T, N, H] queries, [B, T, K, H] keys/values -> [B, T, N, H]."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    _, padded = splash_blocks(T)
    q_BNTH, k_BKTH, v_BKTH = (x.transpose(0, 2, 1, 3) for x in ((q_BTNH * scale).astype(q_BTNH.dtype), k_BTKH, v_BTKH))
    seg_BT = segment_ids_BT
    if padded > T:
        pad = [(0, 0), (0, 0), (0, padded - T), (0, 0)]
        q_BNTH, k_BKTH, v_BKTH = (jnp.pad(x, pad) for x in (q_BNTH, k_BKTH, v_BKTH))
        if seg_BT is not None or not causal:
            seg_BT = jnp.zeros((B, T), jnp.int32) if seg_BT is None else seg_BT.astype(jnp.int32)
            seg_BT = jnp.pad(seg_BT, [(0, 0), (0, padded - T)], constant_values=PAD_SEGMENT)
    local = partial(_local, causal=causal, interpret=target_platform() != "tpu")

    mesh = current_mesh()
    if mesh is not None and mesh.size > 1:
        q_spec = _manual_spec(("batch", "heads", None, None), q_BNTH.shape, mesh)
        kv_spec = _manual_spec(("batch", "kv_heads", None, None), k_BKTH.shape, mesh)
        if kv_spec[1] != q_spec[1]:
            # The tensor axis splits the query heads but not the fewer KV heads: give each query
            # head its own KV head, so every device holds the KV heads of its query heads.
            k_BKTH, v_BKTH = (jnp.repeat(x, N // K, axis=1) for x in (k_BKTH, v_BKTH))
            kv_spec = q_spec
        # check_vma=False: the kernel's pallas_calls declare their outputs without the mesh axes
        # they vary over, which the check would require.
        shard = partial(jax.shard_map, mesh=mesh, out_specs=q_spec, check_vma=False)
        if seg_BT is None:
            out_BNTH = shard(lambda q, k, v: local(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec))(
                q_BNTH, k_BKTH, v_BKTH)
        else:
            out_BNTH = shard(local, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)))(
                q_BNTH, k_BKTH, v_BKTH, seg_BT)
    else:
        out_BNTH = local(q_BNTH, k_BKTH, v_BKTH, seg_BT)
    return out_BNTH[:, :, :T].transpose(0, 2, 1, 3)


def _manual_spec(names, shape, mesh) -> P:
    """`logical_to_spec` without the mesh axes of size 1: in a shard_map they split nothing and
    would only add collectives over one device."""
    def kept(entry):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        return axes if len(axes) > 1 else (axes[0] if axes else None)

    return P(*(kept(entry) for entry in logical_to_spec(names, shape, mesh)))
