"""Grouped expert MLP through JAX's Pallas megablox kernels (`model.moe.grouped_matmul=megablox`).

`jax.experimental.pallas.ops.tpu.megablox.gmm` multiplies rows [M, K] sorted by group with
per-group weights [G, K, N] in tiles of (tm, tk, tn): each grid step one row tile of one group,
so a group costs only its own row tiles (plus at most one tile it shares with its neighbour) and
no weights are copied. Its custom VJP computes the input gradient with `gmm` (transposed
weights) and the weight gradient with `tgmm`. Mosaic compiles it on TPU; on CPU it runs in
Pallas interpret mode (the tests); on GPU it does not run at all (`check_platform`).

Tiling (chosen here, not measured on a TPU yet):
- rows: tm a power of two near the mean group size within [128, 512] (at most M rounded up to
  16); M is padded with zero rows to a multiple of tm.
- K and N (d_model and the expert width): the largest of 512, 256, 128 that divides the
  dimension, or the whole dimension when 128 does not divide it (a block as wide as the array
  is always legal for Mosaic; a very wide one may not fit in VMEM).
Rows past the experts' (the padding above, and the unused rows of an expert-parallel receive
buffer) form one more group that has no weights: the kernel visits none of its tiles and zeroes
its rows, so they cost nothing.

Inside `shard_map` the kernel needs `check_vma=False`: megablox declares its `pallas_call`
outputs without the mesh axes they vary over, which a checking shard_map refuses
(`moe.expert_parallel` turns the check off for this choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from llm_jax.errors import UserError
from llm_jax.models.layers import activate
from llm_jax.parallel.platform import pallas_interpret

ROW_ALIGN = 16  # a bfloat16 row tile is (16, 128) on TPU: row tiles are multiples of 16


def check_platform() -> bool:
    """Whether the kernel runs in Pallas interpret mode (CPU); on GPU, an error."""
    return pallas_interpret("model.moe.grouped_matmul=megablox", "tpu",
                            "ragged_dot_mgpu (Hopper), blocked or ragged_dot (docs/moe.md)")


def tile_rows(rows: int, num_experts: int) -> int:
    """Row tile tm: the power of two at or below the mean group size, within [128, 512] (the
    TPU's matrix unit is 128 or 256 wide), at most `rows` rounded up to a multiple of 16."""
    target = max(rows // num_experts, 1)
    tm = min(512, max(128, 1 << (target.bit_length() - 1)))
    return min(tm, -(-rows // ROW_ALIGN) * ROW_ALIGN)


def dim_tile(dim: int) -> int:
    """Tile of a K or N dimension: the largest of 512, 256, 128 that divides it, else all of it."""
    return next((t for t in (512, 256, 128) if dim % t == 0), dim)


@dataclass(frozen=True)
class Tiling:
    """megablox's tiling callable: (m, k, n) -> (tm, tk, tn). Its backward pass reuses the
    forward's tiling with k and n swapped (`gmm` of the transposed weights, `tgmm`), so the K and
    N tiles are looked up per call rather than fixed once. Frozen: hashable, as a static
    argument of megablox's jitted kernels must be."""

    rows: int

    def __call__(self, m: int, k: int, n: int) -> tuple[int, int, int]:
        return self.rows, dim_tile(k), dim_tile(n)


def megablox_mlp(kind: str, w: dict, x_MD: jax.Array, sizes_E: jax.Array, tile: int | None = None) -> jax.Array:
    """The experts' MLPs on rows [M, D] sorted by expert with group sizes [E] (rows past their
    sum come out as zeros), each matmul one megablox `gmm`; `tile` overrides the row tile."""
    M, _ = x_MD.shape
    E = sizes_E.shape[0]
    if x_MD.dtype not in (jnp.float32, jnp.bfloat16):
        raise UserError(f"model.moe.grouped_matmul=megablox needs float32 or bfloat16, not {x_MD.dtype}")
    interpret = check_platform()
    tm = tile or tile_rows(M, E)
    padded = -(-M // tm) * tm
    x_PD = jnp.pad(x_MD, ((0, padded - M), (0, 0)))
    sizes_E = sizes_E.astype(jnp.int32)
    # Group E: the rows past the experts'. The weights have E groups, so gmm computes no tile of it.
    groups = jnp.concatenate([sizes_E, (padded - sizes_E.sum())[None]])
    tiling = Tiling(tm)

    def mm(a: jax.Array, b: jax.Array) -> jax.Array:
        # megablox's custom_vjp takes its static arguments positionally:
        # (lhs, rhs, group_sizes, preferred_element_type, tiling, group_offset, existing_out, transpose_rhs, interpret)
        return megablox.gmm(a, b, groups, a.dtype, tiling, None, None, False, interpret)

    gate = mm(x_PD, w["gate"]) if "gate" in w else None
    y_PD = mm(activate(kind, mm(x_PD, w["up"]), gate), w["down"])
    return y_PD[:M]
