"""Grouped expert MLPs for dropless MoE: rows [M, D] sorted by expert, group sizes [E].

Two forms besides `lax.ragged_dot` (which XLA:CPU lowers to one dense product per expert over
all M rows, E times the work):

- `blocked_mlp`: the rows copied into blocks of `block` rows, each block one expert's, and one
  batched matmul over all blocks with a per-block copy of its expert's weights. Static shapes
  and one large matmul (fast on accelerators), but the M/block + E blocks of the static bound
  are all computed, used or not.
- `looped_mlp`: a `while_loop` over the blocks actually used, each block read in place from the
  sorted rows and multiplied by its expert's weights, with a hand-written backward pass (also a
  loop) accumulating the weight gradients per expert. No padding copies, no weight copies and
  no work for unused blocks; the blocks run one after another (measured faster on CPU).

Rows past `sum(sizes)` belong to no group and come out as zeros.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llm_jax.models.layers import activate


def block_rows(rows: int, num_experts: int) -> int:
    """Block length of `blocked_mlp`: the power of two at or below half the mean group size,
    within [64, 1024]. XLA:CPU multiplies a few large blocks much faster than many small ones,
    while each expert wastes up to a block of padding (measured on moe_small, 8192 rows, 8
    experts: blocks of 128, 256, 512, 1024 gave 6018, 6454, 7553, 5958 tokens/s)."""
    target = max(rows // (2 * num_experts), 1)
    return min(1024, max(64, 1 << (target.bit_length() - 1)))


def blocked_mlp(kind: str, w: dict, x_MD: jax.Array, sizes_E: jax.Array, block: int | None = None) -> jax.Array:
    """Grouped MLP as a batched matmul over blocks of `block` rows, each block one expert's.

    Each expert's rows start a new block, so at most M/block + E blocks are needed (a static
    bound); every block is multiplied by its own copy of its expert's weights.
    """
    M, D = x_MD.shape
    E = sizes_E.shape[0]
    block = block or block_rows(M, E)
    table = _block_table(sizes_E, M, block)
    nb = table.expert_B.shape[0]
    rows_BM = table.start_B[:, None] + jnp.arange(block)[None, :]
    valid_BM = rows_BM < table.end_B[:, None]  # blocks past the last expert's are all invalid
    source_BM = jnp.clip(rows_BM, 0, M - 1)
    x_BMD = jnp.where(valid_BM[..., None], x_MD[source_BM], 0).astype(x_MD.dtype)
    # Per-block weight copies by a one-hot matmul, not a gather: its gradient is then a matmul
    # too, where a gather's is a scatter-add (slow on CPU).
    onehot_BE = jax.nn.one_hot(table.expert_B, E, dtype=x_MD.dtype)
    wb = {k: jnp.einsum("be,e...->b...", onehot_BE, v) for k, v in w.items()}
    gate = jnp.einsum("bmd,bdf->bmf", x_BMD, wb["gate"]) if "gate" in wb else None
    h_BMF = activate(kind, jnp.einsum("bmd,bdf->bmf", x_BMD, wb["up"]), gate)
    y_BMD = jnp.einsum("bmf,bfd->bmd", h_BMF, wb["down"])
    # Back to the sorted rows: row r of expert e sits in block first_block[e] + i // block, i = r - row_start[e].
    rows = jnp.arange(M)
    expert_M = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_E), rows, side="right"), E - 1)
    i_M = rows - table.start_E[expert_M]
    y_MD = y_BMD[jnp.minimum(table.first_block_E[expert_M] + i_M // block, nb - 1), i_M % block]
    return jnp.where((rows < sizes_E.sum())[:, None], y_MD, 0).astype(x_MD.dtype)


def loop_block_rows(rows: int, num_experts: int) -> int:
    """Block length of `looped_mlp`: the power of two at or below the mean group size, within
    [64, 512]; larger blocks make fewer, more efficient matmuls."""
    target = max(rows // num_experts, 1)
    return min(512, max(64, 1 << (target.bit_length() - 1)))


class BlockTable(NamedTuple):
    """Blocks of `block` rows over one segment of each expert's rows (static bound: the arrays'
    length). Expert e's segment [start_E[e], start_E[e] + size_e) makes ceil(size_e / block)
    blocks, the first being block first_block_E[e]; rows of a block past the segment's end are
    masked."""
    expert_B: jax.Array       # each block's expert
    start_B: jax.Array        # each block's first row
    end_B: jax.Array          # its expert's segment's end row
    used: jax.Array           # how many blocks hold rows
    first_block_E: jax.Array  # each expert's first block
    start_E: jax.Array        # each expert's segment's first row


def _segment_table(start_E: jax.Array, size_E: jax.Array, nb: int, block: int) -> BlockTable:
    E = size_E.shape[0]
    blocks_E = (size_E + block - 1) // block
    block_end_E = jnp.cumsum(blocks_E)
    first_block_E = block_end_E - blocks_E
    expert_B = jnp.minimum(jnp.searchsorted(block_end_E, jnp.arange(nb), side="right"), E - 1)
    start_B = start_E[expert_B] + (jnp.arange(nb) - first_block_E[expert_B]) * block
    return BlockTable(expert_B, start_B, (start_E + size_E)[expert_B], block_end_E[-1], first_block_E, start_E)


def _block_table(sizes_E: jax.Array, M: int, block: int) -> BlockTable:
    """Blocks over all of each expert's rows: at most M/block + E of them."""
    return _segment_table(jnp.cumsum(sizes_E) - sizes_E, sizes_E, -(-M // block) + sizes_E.shape[0], block)


def _loop_tables(sizes_E: jax.Array, M: int, block: int, tail: int) -> tuple[BlockTable, BlockTable]:
    """`looped_mlp`'s two passes: each expert's whole blocks of `block` rows (at most M/block),
    then its remaining rows in blocks of `tail` (fewer than block/tail per expert)."""
    E = sizes_E.shape[0]
    start_E = jnp.cumsum(sizes_E) - sizes_E
    whole_E = sizes_E // block * block
    tail_bound = min(-(-M // tail) + E, E * -(-block // tail))
    return (_segment_table(start_E, whole_E, max(M // block, 1), block),
            _segment_table(start_E + whole_E, sizes_E - whole_E, tail_bound, tail))


def _rows(a: jax.Array, start: jax.Array, block: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, start, block, axis=0)


def _put_rows(a: jax.Array, rows: jax.Array, start: jax.Array, valid: jax.Array) -> jax.Array:
    """a[start:start+block] = rows where `valid`, else kept (rows of a neighbouring group)."""
    return jax.lax.dynamic_update_slice_in_dim(a, jnp.where(valid[:, None], rows, _rows(a, start, rows.shape[0])),
                                               start, axis=0)


def _add_at(a_E: jax.Array, e: jax.Array, delta: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(a_E, jax.lax.dynamic_index_in_dim(a_E, e, keepdims=False) + delta,
                                               e, axis=0)


def _run_passes(body, tables: tuple[BlockTable, ...], blocks: tuple[int, ...], buffers: tuple) -> tuple:
    """buffers = body(table, block, b, buffers) for each pass's table and block length, for
    b = 0 .. table.used - 1. Each pass's first block runs outside its loop: under shard_map its
    outputs vary over the union of the inputs' mesh axes, which gives the loop's carry its type
    (zeros made here would vary over none). With no block used, the first one is all masked
    and changes nothing."""
    for table, block in zip(tables, blocks):
        def step(carry, table=table, block=block):
            b, buffers = carry
            return b + 1, body(table, block, b, buffers)

        buffers = jax.lax.while_loop(lambda carry, table=table: carry[0] < table.used, step, step((0, buffers)))[1]
    return buffers


def _block_rows(table: BlockTable, block: int, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Block b's expert, first row and which of its rows are its segment's."""
    s = table.start_B[b]
    return table.expert_B[b], s, s + jnp.arange(block) < table.end_B[b]


def _looped_forward(kind: str, blocks: tuple[int, int], w: dict, x_MD: jax.Array, sizes_E: jax.Array):
    M, D = x_MD.shape
    x_PD = jnp.pad(x_MD, ((0, blocks[0]), (0, 0)))  # every block's slice fits, even at the end
    F = w["up"].shape[-1]
    zeros_PF = jnp.zeros((M + blocks[0], F), x_MD.dtype)

    def body(table, block, b, buffers):
        y_PD, up_PF, gate_PF = buffers
        e, s, valid = _block_rows(table, block, b)
        xb = _rows(x_PD, s, block)
        up = xb @ w["up"][e]
        gate = xb @ w["gate"][e] if gate_PF is not None else None
        yb = activate(kind, up, gate) @ w["down"][e]
        return (_put_rows(y_PD, yb, s, valid), _put_rows(up_PF, up, s, valid),
                _put_rows(gate_PF, gate, s, valid) if gate_PF is not None else None)

    tables = _loop_tables(sizes_E, M, *blocks)
    y_PD, up_PF, gate_PF = _run_passes(body, tables, blocks,
                                       (jnp.zeros_like(x_PD), zeros_PF, zeros_PF if "gate" in w else None))
    return y_PD[:M], (x_PD, up_PF, gate_PF, tables)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _looped(kind: str, blocks: tuple[int, int], w: dict, x_MD: jax.Array, sizes_E: jax.Array) -> jax.Array:
    return _looped_forward(kind, blocks, w, x_MD, sizes_E)[0]


def _looped_fwd(kind, blocks, w, x_MD, sizes_E):
    y, saved = _looped_forward(kind, blocks, w, x_MD, sizes_E)
    return y, (w, saved)


def _looped_bwd(kind, blocks, residuals, dy_MD):
    w, (x_PD, up_PF, gate_PF, tables) = residuals
    M = dy_MD.shape[0]
    dy_PD = jnp.pad(dy_MD, ((0, blocks[0]), (0, 0)))
    f32 = jnp.float32

    def body(table, block, b, buffers):
        dx_PD, dw = buffers
        e, s, valid = _block_rows(table, block, b)
        # Rows of other groups get no output gradient, so they add nothing to this expert's weights.
        dyb = jnp.where(valid[:, None], _rows(dy_PD, s, block), 0)
        xb = _rows(x_PD, s, block)
        up = _rows(up_PF, s, block)
        gate = _rows(gate_PF, s, block) if gate_PF is not None else None
        h, act_vjp = jax.vjp(lambda u, g: activate(kind, u, g), up, gate)
        dw = dict(dw)
        dw["down"] = _add_at(dw["down"], e, jnp.matmul(h.T, dyb, preferred_element_type=f32))
        d_up, d_gate = act_vjp(dyb @ w["down"][e].T)
        dw["up"] = _add_at(dw["up"], e, jnp.matmul(xb.T, d_up, preferred_element_type=f32))
        dxb = d_up @ w["up"][e].T
        if gate is not None:
            dw["gate"] = _add_at(dw["gate"], e, jnp.matmul(xb.T, d_gate, preferred_element_type=f32))
            dxb = dxb + d_gate @ w["gate"][e].T
        return _put_rows(dx_PD, dxb, s, valid), dw

    dx_PD, dw = _run_passes(body, tables, blocks,
                            (jnp.zeros_like(x_PD), {k: jnp.zeros(v.shape, f32) for k, v in w.items()}))
    dw = {k: v.astype(w[k].dtype) for k, v in dw.items()}
    return dw, dx_PD[:M], None


_looped.defvjp(_looped_fwd, _looped_bwd)


def _varying_axes(a: jax.Array) -> frozenset:
    """The mesh axes `a` varies over inside shard_map (empty outside); the attribute's name
    differs between JAX versions."""
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _vary_alike(*arrays):
    """Each array made to vary over the union of their mesh axes. Inside shard_map the weights
    vary over fewer axes than the tokens (not over `data`); autodiff of this cast sums their
    gradient over the missing axes, which the hand-written backward pass leaves to it."""
    union = frozenset().union(*(_varying_axes(a) for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(union - _varying_axes(a)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def looped_mlp(kind: str, w: dict, x_MD: jax.Array, sizes_E: jax.Array, block: int | None = None,
               tail: int | None = None) -> jax.Array:
    """Grouped MLP by loops over the used blocks (module docstring): each expert's whole blocks
    of `block` rows (default `loop_block_rows`), then its remainder of fewer rows in blocks of
    `tail` rows (default block / 4), so that an expert computes at most a tail of masked rows
    instead of up to a whole block (with 4096 rows over 8 experts, blocks of 512 alone computed
    up to 1.5x the rows used)."""
    M = x_MD.shape[0]
    block = min(block or loop_block_rows(M, sizes_E.shape[0]), M)
    tail = min(tail or max(block // 4, 1), block)
    names = list(w)
    *ws, x_MD = _vary_alike(*(w[k] for k in names), x_MD)
    return _looped(kind, (block, tail), dict(zip(names, ws)), x_MD, sizes_E.astype(jnp.int32))
