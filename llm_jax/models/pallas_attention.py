"""Self-attention by JAX's Pallas flash-attention kernels, with segment ids for packed rows.

- `splash` (`model.attention=splash`): `jax.experimental.pallas.ops.tpu.splash_attention`, the
  block-sparse TPU kernel. It takes one example, [heads, T, head_dim], and skips the key blocks
  its static mask (causal, or full) leaves empty; segment ids mask inside the blocks it visits.
  Vmapped over the batch. Grouped KV heads go in as they are: its MHA form maps query head n to
  KV head n // (N / K), the order of `masked_attention`'s reshape (n = k * G + g). Its KV blocks
  must be multiples of 128 (TPU lanes), in interpret mode too, so T is padded to a multiple of
  128 and one block length (512, 256 or 128, the largest dividing it) serves every pass.
- `pallas_gpu` (`model.attention=pallas_gpu`): `jax.experimental.pallas.ops.gpu.attention.mha`,
  the Triton flash-attention kernel, over [B, T, heads, head_dim] with one segment-id row per
  example. It needs as many KV heads as query heads: grouped KV heads are repeated (autodiff sums
  their gradients back). Blocks of 128 queries/keys forward and 32 backward (the kernel's
  defaults); T is padded to a power of two of at least 32 up to 128, then to a multiple of 128.

Both: neither kernel scales the scores by itself here: q is multiplied by 1/sqrt(head_dim) (or
`scale`) first. A causal query never sees the padded keys (they lie after every real query);
without a causal mask, and with segment ids, the padding gets a segment of its own (-1, which no
real token has: packing counts segments from 0), so only padded queries see it. Padded rows are
cut off the output. On the kernel's own platform it is compiled; on CPU it runs in Pallas
interpret mode (slow: for tests); on the other accelerator `attention.resolve_kernel` refuses it.
Under a mesh of more than one device each runs per device in a `shard_map` over the batch and
head axes (GSPMD cannot split a pallas_call: left to it, the operands would be gathered whole
onto every device).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_flash
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from llm_jax.parallel.platform import pallas_interpret
from llm_jax.parallel.rules import current_mesh, manual_spec

LANES = 128  # splash's KV blocks are multiples of the TPU's 128 lanes
SPLASH_BLOCKS = (512, 256, 128)  # tried largest first: fewer grid steps (512: splash's own benchmarks' choice)
GPU_BLOCK, GPU_BACKWARD_BLOCK = 128, 32  # the Pallas GPU kernel's default tiles
PAD_SEGMENT = -1
# The kernel each choice runs compiled on; anywhere else but CPU (interpret mode) it is refused.
KERNEL_PLATFORM = {"splash": "tpu", "pallas_gpu": "gpu"}


def _interpret(kernel: str) -> bool:
    """Interpret mode on CPU, compiled on the kernel's accelerator, refused on the other one."""
    return pallas_interpret(f"model.attention={kernel}", KERNEL_PLATFORM[kernel], "model.attention=auto there")


def splash_blocks(length: int) -> tuple[int, int]:
    """(block, padded length): T rounded up to a multiple of 128, and the largest of 512, 256,
    128 that divides it."""
    padded = -(-length // LANES) * LANES
    return next(b for b in SPLASH_BLOCKS if padded % b == 0), padded


def gpu_padded_length(length: int) -> int:
    """T padded for the GPU kernel: its tiles are powers of two (Triton) that divide T."""
    if length <= GPU_BLOCK:
        return max(GPU_BACKWARD_BLOCK, 1 << (length - 1).bit_length())
    return -(-length // GPU_BLOCK) * GPU_BLOCK


def splash_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, *, causal: bool = True,
                     segment_ids_BT: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Self-attention by the splash kernel: causal or full, and given `segment_ids_BT` only within
    a query's own segment. [B, T, N, H] queries, [B, T, K, H] keys/values -> [B, T, N, H]."""
    T = q_BTNH.shape[1]
    _, padded = splash_blocks(T)
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 - [B,T,N,H] <-> [B,N,T,H]
    q, k, v, seg = _scaled_and_padded(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, padded, causal, scale)
    local = partial(_splash_local, causal=causal, interpret=_interpret("splash"))
    out_BNTH = _per_device(local, heads_major(q), heads_major(k), heads_major(v), seg, heads_dim=1)
    return heads_major(out_BNTH)[:, :T]


def pallas_gpu_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, *, causal: bool = True,
                         segment_ids_BT: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Self-attention by the Pallas GPU (Triton) flash kernel; arguments as `splash_attention`."""
    T, N = q_BTNH.shape[1:3]
    groups = N // k_BTKH.shape[2]
    if groups > 1:
        k_BTKH, v_BTKH = jnp.repeat(k_BTKH, groups, axis=2), jnp.repeat(v_BTKH, groups, axis=2)
    q, k, v, seg = _scaled_and_padded(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, gpu_padded_length(T), causal, scale)
    local = partial(_gpu_local, causal=causal, interpret=_interpret("pallas_gpu"))
    return _per_device(local, q, k, v, seg, heads_dim=2)[:, :T]


def _scaled_and_padded(q_BTNH, k_BTKH, v_BTKH, seg_BT, padded: int, causal: bool, scale: float | None):
    """q times the score scale; q, k, v and the segment ids padded to `padded` tokens (the
    padding in a segment of its own where a query could otherwise see it)."""
    B, T, _, H = q_BTNH.shape
    q_BTNH = (q_BTNH * (1.0 / math.sqrt(H) if scale is None else scale)).astype(q_BTNH.dtype)
    if padded == T:
        return q_BTNH, k_BTKH, v_BTKH, seg_BT
    pad = [(0, 0), (0, padded - T), (0, 0), (0, 0)]
    q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, pad) for x in (q_BTNH, k_BTKH, v_BTKH))
    if seg_BT is not None or not causal:
        seg_BT = jnp.zeros((B, T), jnp.int32) if seg_BT is None else seg_BT.astype(jnp.int32)
        seg_BT = jnp.pad(seg_BT, [(0, 0), (0, padded - T)], constant_values=PAD_SEGMENT)
    return q_BTNH, k_BTKH, v_BTKH, seg_BT


def _splash_kernel(heads: int, length: int, causal: bool, interpret: bool) -> splash.SplashAttentionKernel:
    """The splash kernel for `heads` query heads over `length` tokens. Built at each trace: it
    holds its block tables as arrays, which a cached kernel would leak out of the trace that
    made them (the Python work behind them, splash's `_process_mask`, is cached by splash)."""
    block, _ = splash_blocks(length)
    shape = (length, length)
    mask = splash.MultiHeadMask([splash.CausalMask(shape) if causal else splash.FullMask(shape)] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q_BNTH, k_BKTH, v_BKTH, seg_BT, *, causal: bool, interpret: bool) -> jax.Array:
    """One device's share: the splash kernel vmapped over its examples."""
    kernel = _splash_kernel(q_BNTH.shape[1], q_BNTH.shape[2], causal, interpret)
    if seg_BT is None:
        return jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(q_BNTH, k_BKTH, v_BKTH, seg_BT)


def _gpu_local(q_BTNH, k_BTNH, v_BTNH, seg_BT, *, causal: bool, interpret: bool) -> jax.Array:
    """One device's share: the Pallas GPU kernel over its examples (q already scaled)."""
    block = min(GPU_BLOCK, q_BTNH.shape[1])
    sizes = gpu_flash.BlockSizes(block_q=block, block_k=block, block_q_dkv=GPU_BACKWARD_BLOCK,
                                 block_kv_dkv=GPU_BACKWARD_BLOCK, block_q_dq=GPU_BACKWARD_BLOCK,
                                 block_kv_dq=GPU_BACKWARD_BLOCK)
    return gpu_flash.mha(q_BTNH, k_BTNH, v_BTNH, seg_BT, sm_scale=1.0, causal=causal, block_sizes=sizes,
                         interpret=interpret)


def _per_device(local: Callable, q, k, v, seg_BT, *, heads_dim: int) -> jax.Array:
    """`local(q, k, v, seg_BT)` on each device's examples and heads (dim 0 is the batch, dim
    `heads_dim` the heads); outside a mesh of more than one device, once over everything."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return local(q, k, v, seg_BT)
    names = lambda heads: tuple({0: "batch", heads_dim: heads}.get(d) for d in range(4))  # noqa: E731
    q_spec = manual_spec(names("heads"), q.shape, mesh)
    kv_spec = manual_spec(names("kv_heads"), k.shape, mesh)
    if kv_spec[heads_dim] != q_spec[heads_dim]:
        # The tensor axis splits the query heads but not the fewer KV heads: give each query
        # head its own KV head, so every device holds the KV heads of its query heads.
        groups = q.shape[heads_dim] // k.shape[heads_dim]
        k, v = (jnp.repeat(x, groups, axis=heads_dim) for x in (k, v))
        kv_spec = q_spec
    # check_vma=False: the kernels' pallas_calls declare their outputs without the mesh axes
    # they vary over, which the check would require.
    shard = partial(jax.shard_map, mesh=mesh, out_specs=q_spec, check_vma=False)
    if seg_BT is None:
        return shard(lambda q, k, v: local(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec))(q, k, v)
    return shard(local, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)))(q, k, v, seg_BT)
