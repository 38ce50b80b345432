"""The selective scan as fused Pallas kernels (`model.ssm.scan=pallas`): Mamba's hardware-aware scan.

The forward kernel runs on a grid (batch, channel tiles, time chunks); the time axis is sequential
and carries the state h [N, D tile] in a VMEM scratch. Each step it reads one time step of x,
delta [T, D] and B, C [T, N] from the chunk's blocks, updates h and writes y [T, D]: no
[B, T, D, N] array ever goes to HBM. It also writes the state at each chunk's start
([B, T / chunk, N, D], small) for the backward kernel, which walks the chunks in reverse,
recomputes the chunk's states from that boundary state into VMEM and runs the reverse recurrence
dh_t = C_t dy_t + a_{t+1} dh_{t+1}.

Layout (Mosaic's rule: a block's last two dims are multiples of (8, 128) or the array's own):
the state is [N, D tile] (channels in lanes; `d_tile`), the time chunk a multiple of 8; B, C and
the restarts travel as one [B, T, 2N + 1] array, a step's row of which is reshaped into [N, 1]
columns that broadcast over the channels (a dynamic slice of one lane column does not lower).

On CPU the kernels run in Pallas interpret mode (an XLA loop over the grid: slower to compile
than the XLA scans); on TPU through Mosaic. There is no GPU lowering (the sequential grid axis
with a scratch carry is TPU-only Pallas): `ssm_pallas_gpu` is the Triton counterpart.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llm_jax.errors import UserError
from llm_jax.parallel.platform import pallas_interpret
from llm_jax.parallel.rules import current_mesh, manual_spec

LANES, SUBLANES = 128, 8
MAX_TILE = 512  # channels per kernel instance: 4 vregs of lanes per state row (not tuned)
UNROLL = 8  # time steps per loop iteration on TPU: independent work for the scheduler (not tuned)
INTERPRET_UNROLL = 1  # in interpret mode unrolling only multiplies the CPU compile time
VMEM_BUDGET = 12 << 20  # under the 16 MiB that Mosaic allows a kernel by default (v5e)


def backward_vmem_bytes(Tc: int, Dt: int, N: int) -> int:
    """The backward kernel's VMEM, the larger one: the chunk's states, double-buffered [Tc, Dt]
    blocks (x, delta, dy, dx, ddelta) and [Tc, 2N + 1] / [Tc, N] blocks padded to 128 lanes."""
    lanes = LANES * -(-(2 * N + 1) // LANES)
    rows = SUBLANES * -(-N // SUBLANES)  # each [N, Dt] state pads to whole sublane tiles
    return 4 * ((Tc + 1) * rows * Dt + 2 * 5 * Tc * Dt + 2 * Tc * lanes + 2 * 2 * Tc * LANES)


def d_tile(D: int, Tc: int = SUBLANES, N: int = 1) -> int:
    """Channels per kernel instance: the largest multiple of 128 lanes up to MAX_TILE that
    divides D and keeps the backward kernel within VMEM_BUDGET, else the whole of D (a block
    may always span a whole dimension)."""
    for tile in range(MAX_TILE, 0, -LANES):
        if D % tile == 0 and (tile == LANES or backward_vmem_bytes(Tc, tile, N) <= VMEM_BUDGET):
            return tile
    return D


def check_vmem(Tc: int, Dt: int, N: int) -> None:
    if not _interpret() and backward_vmem_bytes(Tc, Dt, N) > VMEM_BUDGET:
        raise UserError(f"model.ssm.scan=pallas: a chunk of {Tc} steps x {Dt} channels x state {N} needs "
                        f"{backward_vmem_bytes(Tc, Dt, N) >> 20} MiB of VMEM in the backward kernel, over "
                        f"{VMEM_BUDGET >> 20} MiB; lower model.ssm.chunk")


def time_chunk(chunk: int) -> int:
    """The chunk rounded up to a multiple of 8 sublanes."""
    return -(-chunk // SUBLANES) * SUBLANES


def _interpret() -> bool:
    return pallas_interpret("model.ssm.scan=pallas", "tpu",
                            "model.ssm.scan=pallas_gpu (the Triton kernel), chunked or auto")


# Batch rows and channel tiles are independent (megacore may split them); time carries the state.
_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _step_inputs(t, A, x_ref, delta_ref, bck_ref):
    """Step t's rows x_t, delta_t [1, Dt], columns B_t, C_t [N, 1] and decay a_t [N, Dt]."""
    N = A.shape[0]
    delta_t = delta_ref[pl.ds(t, 1), :]
    x_t = x_ref[pl.ds(t, 1), :]
    bck_t = bck_ref[pl.ds(t, 1), :]  # [1, 2N + 1]: B_t, C_t, keep_t
    B_t, C_t = bck_t[:, :N].reshape(N, 1), bck_t[:, N:2 * N].reshape(N, 1)
    a = jnp.exp(delta_t * A) * bck_t[:, 2 * N:]
    return a, delta_t, x_t, B_t, C_t


def _forward_kernel(unroll: int, x_ref, delta_ref, bck_ref, A_ref, h0_ref,
                    y_ref, hlast_ref, hstart_ref, h_scr):
    @pl.when(pl.program_id(2) == 0)
    def _():
        h_scr[...] = h0_ref[...]

    hstart_ref[...] = h_scr[...]
    A = A_ref[...]

    def step(t, h):
        a, delta_t, x_t, B_t, C_t = _step_inputs(t, A, x_ref, delta_ref, bck_ref)
        h = a * h + B_t * (delta_t * x_t)
        y_ref[pl.ds(t, 1), :] = jnp.sum(h * C_t, axis=0, keepdims=True)
        return h

    h = jax.lax.fori_loop(0, x_ref.shape[0], step, h_scr[...], unroll=unroll)
    h_scr[...] = h
    hlast_ref[...] = h  # the block stays put over the time axis; the last chunk's write is kept


def _backward_kernel(unroll: int, x_ref, delta_ref, bck_ref, A_ref, hstart_ref, dy_ref, dhlast_ref,
                     dx_ref, ddelta_ref, dB_ref, dC_ref, dA_ref, dh0_ref, dh_scr, dA_scr, hs_scr):
    Tc = x_ref.shape[0]

    @pl.when(pl.program_id(2) == 0)  # the last chunk: the gradient of the final state enters
    def _():
        dh_scr[...] = dhlast_ref[...]
        dA_scr[...] = jnp.zeros_like(dA_scr)

    A = A_ref[...]
    hs_scr[0] = hstart_ref[...]

    def recompute(t, h):  # hs[t + 1] = h_t, hs[0] = the state before the chunk
        a, delta_t, x_t, B_t, C_t = _step_inputs(t, A, x_ref, delta_ref, bck_ref)
        h = a * h + B_t * (delta_t * x_t)
        hs_scr[t + 1] = h
        return h

    jax.lax.fori_loop(0, Tc, recompute, hstart_ref[...], unroll=unroll)

    def step(i, carry):
        dh, dA = carry  # dh: the gradient reaching h_t from later steps
        t = Tc - 1 - i
        a, delta_t, x_t, B_t, C_t = _step_inputs(t, A, x_ref, delta_ref, bck_ref)
        dy_t = dy_ref[pl.ds(t, 1), :]
        dh = dh + C_t * dy_t  # y_t = sum_n C_t h_t
        dC_t = jnp.sum(hs_scr[t + 1] * dy_t, axis=1, keepdims=True)
        u = delta_t * x_t  # b_t = B_t u_t
        du = jnp.sum(dh * B_t, axis=0, keepdims=True)
        dB_t = jnp.sum(dh * u, axis=1, keepdims=True)
        dB_ref[pl.ds(t, 1), :] = dB_t.reshape(1, -1)
        dC_ref[pl.ds(t, 1), :] = dC_t.reshape(1, -1)
        da_dlogit = dh * hs_scr[t] * a  # d/d(delta A) of a h_{t-1}
        dx_ref[pl.ds(t, 1), :] = du * delta_t
        ddelta_ref[pl.ds(t, 1), :] = du * x_t + jnp.sum(da_dlogit * A, axis=0, keepdims=True)
        return a * dh, dA + da_dlogit * delta_t

    dh, dA = jax.lax.fori_loop(0, Tc, step, (dh_scr[...], dA_scr[...]), unroll=unroll)
    dh_scr[...] = dh
    dA_scr[...] = dA
    dA_ref[...] = dA  # both blocks stay put over the time axis; chunk 0's write is kept
    dh0_ref[...] = dh


def _specs(Tc: int, Dt: int, N: int, nc: int, reverse: bool):
    """BlockSpecs over the grid (b, d, c); `reverse` walks the time chunks from the last."""
    sq = pl.Squeezed()

    def chunk(c):
        return nc - 1 - c if reverse else c

    return {
        "rows": pl.BlockSpec((sq, Tc, Dt), lambda b, d, c: (b, chunk(c), d)),  # [B, T, D]
        "bck": pl.BlockSpec((sq, Tc, 2 * N + 1), lambda b, d, c: (b, chunk(c), 0)),  # [B, T, 2N + 1]
        "A": pl.BlockSpec((N, Dt), lambda b, d, c: (0, d)),  # [N, D]
        "state": pl.BlockSpec((sq, N, Dt), lambda b, d, c: (b, 0, d)),  # [B, N, D]
        "starts": pl.BlockSpec((sq, sq, N, Dt), lambda b, d, c: (b, chunk(c), 0, d)),  # [B, nc, N, D]
        "partial": pl.BlockSpec((sq, sq, Tc, N), lambda b, d, c: (d, b, chunk(c), 0)),  # [D tiles, B, T, N]
    }


def _shapes(*shapes: tuple[int, ...]) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]


def _forward(x, delta, bck, At, h0t, Tc: int):
    Bsz, T, D = x.shape
    N = At.shape[0]
    Dt, nc = d_tile(D, Tc, N), T // Tc
    s = _specs(Tc, Dt, N, nc, reverse=False)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_forward_kernel, INTERPRET_UNROLL if _interpret() else UNROLL),
        grid=(Bsz, D // Dt, nc),
        in_specs=[s["rows"], s["rows"], s["bck"], s["A"], s["state"]],
        out_specs=[s["rows"], s["state"], s["starts"]],
        out_shape=_shapes((Bsz, T, D), (Bsz, N, D), (Bsz, nc, N, D)),
        scratch_shapes=[pltpu.VMEM((N, Dt), f32)],
        compiler_params=_PARAMS,
        interpret=_interpret(),
        name="selective_scan_fwd",
    )(x, delta, bck, At, h0t)


def _backward(x, delta, bck, At, hstarts, dy, dhlast, Tc: int):
    Bsz, T, D = x.shape
    N = At.shape[0]
    Dt, nc = d_tile(D, Tc, N), T // Tc
    nd = D // Dt
    s = _specs(Tc, Dt, N, nc, reverse=True)
    f32 = jnp.float32
    rows, state, partial = _shapes((Bsz, T, D), (Bsz, N, D), (nd, Bsz, T, N))
    return pl.pallas_call(
        functools.partial(_backward_kernel, INTERPRET_UNROLL if _interpret() else UNROLL),
        grid=(Bsz, nd, nc),
        in_specs=[s["rows"], s["rows"], s["bck"], s["A"], s["starts"], s["rows"], s["state"]],
        out_specs=[s["rows"], s["rows"], s["partial"], s["partial"], s["state"], s["state"]],
        out_shape=[rows, rows, partial, partial, state, state],
        scratch_shapes=[pltpu.VMEM((N, Dt), f32), pltpu.VMEM((N, Dt), f32), pltpu.VMEM((Tc + 1, N, Dt), f32)],
        compiler_params=_PARAMS,
        interpret=_interpret(),
        name="selective_scan_bwd",
    )(x, delta, bck, At, hstarts, dy, dhlast)


def fused_vjp(forward: Callable, backward: Callable) -> Callable:
    """The scan of a forward and a backward kernel as one differentiable function
    (x, delta, bck, A, h0, Tc) -> (y, last state); shared by this TPU kernel and the GPU one
    (`ssm_pallas_gpu`). `forward` returns (y, last state, chunk start states); `backward` takes
    (x, delta, bck, A, start states, dy, dlast, Tc) and returns dx, ddelta, dB and dC as partial
    sums per channel tile, dA per batch row and dh0."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def fused(x, delta, bck, A, h0, Tc: int):
        y, hlast, _ = forward(x, delta, bck, A, h0, Tc)
        return y, hlast

    def fused_fwd(x, delta, bck, A, h0, Tc):
        y, hlast, hstarts = forward(x, delta, bck, A, h0, Tc)
        return (y, hlast), (x, delta, bck, A, hstarts)

    def fused_bwd(Tc, residuals, cotangents):
        x, delta, bck, A, hstarts = residuals
        dy, dhlast = cotangents
        dx, ddelta, dB, dC, dA, dh0 = backward(x, delta, bck, A, hstarts, dy, dhlast, Tc)
        # dB, dC: one partial sum per channel tile; dA: one per batch row; keep has no gradient.
        dbck = jnp.concatenate([dB.sum(0), dC.sum(0), jnp.zeros_like(bck[..., :1])], axis=-1)
        return dx, ddelta, dbck, dA.sum(0), dh0

    fused.defvjp(fused_fwd, fused_bwd)
    return fused


# (y without the skip term [B, T, D], last state [B, N, D]) of padded, kernel-layout inputs:
# T a multiple of Tc, bck = [B_t, C_t, keep_t] [B, T, 2N + 1], A and the states transposed.
fused_scan = fused_vjp(_forward, _backward)


def kernel_inputs(x, delta, B, C, keep, Tc: int):
    """x, delta [B, T', D] and bck = [B_t, C_t, keep_t] [B, T', 2N + 1], T padded to T', a
    multiple of Tc (`keep` None: no restarts)."""
    Bsz, T, _ = x.shape
    pad = -T % Tc
    keep = jnp.ones((Bsz, T), jnp.float32) if keep is None else keep
    bck = jnp.concatenate([B, C, keep[..., None]], axis=-1)
    # Padded steps have delta = 0 and keep = 1: a = 1, b = 0, the state passes through unchanged
    # (their B and C are 1 too, which changes nothing: b = delta B x, and their y is cut off).
    x, delta = (jnp.pad(v, ((0, 0), (0, pad), (0, 0))) for v in (x, delta))
    bck = jnp.pad(bck, ((0, 0), (0, pad), (0, 0)), constant_values=1.0)
    return x, delta, bck


def pallas_scan(x, delta, A, B, C, h0, chunk: int, keep=None):
    """`ssm.selective_scan`'s contract (float32 inputs, B and C [B, T, N]): (y [B, T, D] without
    the skip term, last state [B, D, N])."""
    T, D = x.shape[1:]
    Tc = time_chunk(chunk)
    x, delta, bck = kernel_inputs(x, delta, B, C, keep, Tc)
    check_vmem(Tc, d_tile(D, Tc, B.shape[-1]), B.shape[-1])
    y, hlast = fused_scan(x, delta, bck, A.T, jnp.swapaxes(h0, 1, 2), Tc)
    return y[:, :T], jnp.swapaxes(hlast, 1, 2)


def sharded_pallas_scan(x, delta, A, B, C, h0, chunk: int, keep=None, scan: Callable | None = None):
    """`scan` (default `pallas_scan`; `ssm_pallas_gpu.pallas_gpu_scan` has its contract) under an
    `activation_mesh` of several devices run per device by `shard_map` (the partitioner cannot
    split a Pallas call; it would gather every operand onto every device): batch rows split like
    the batch, channels like d_inner (`mlp`, over `tensor`)."""
    scan = pallas_scan if scan is None else scan
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return scan(x, delta, A, B, C, h0, chunk, keep)
    names = {"x": ("batch", "length", "mlp"), "delta": ("batch", "length", "mlp"), "A": ("mlp", "ssm_state"),
             "B": ("batch", "length", None), "C": ("batch", "length", None), "h0": ("batch", "mlp", "ssm_state")}
    args = {"x": x, "delta": delta, "A": A, "B": B, "C": C, "h0": h0}
    if keep is not None:
        names["keep"], args["keep"] = ("batch", "length"), keep
    specs = {k: manual_spec(n, args[k].shape, mesh) for k, n in names.items()}

    def local(a: dict):
        return scan(a["x"], a["delta"], a["A"], a["B"], a["C"], a["h0"], chunk, a.get("keep"))

    # check_vma=False: Pallas interpret mode does not track varying axes (JAX 0.10.2 fails in
    # its grid loop). Without the check, the transpose of shard_map sums the gradients of
    # operands copied over an axis (A over the batch axes, B and C over tensor) over that axis.
    out_specs = (specs["x"], specs["h0"])
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_specs, check_vma=False)(args)
