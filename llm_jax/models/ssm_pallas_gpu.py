"""The selective scan as fused Pallas Triton kernels for GPU (`model.ssm.scan=pallas_gpu`).

The GPU counterpart of `ssm_pallas` (the Mosaic kernels), with its contract and its custom VJP
(`fused_vjp`). Triton has neither a sequential grid axis that carries scratch memory nor dynamic
indexing of values held in registers, and wants every tensor a power of two in size, so:

- the grid is (batch row, channel tile of `Dt` channels) and each program walks the whole
  sequence itself: a `fori_loop` over chunks of `Tc` steps whose steps are unrolled in Python;
  the state h [Dt, N] is a loop carry, in registers. Each step loads one row x_t, delta_t [Dt]
  and B_t, C_t [N], keep_t (a scalar) at a dynamic t, updates h and stores y_t. At each chunk's
  start it stores h ([B, T / Tc, D, N]) for the backward kernel.
- the backward kernel walks the chunks in reverse; for each it reloads the start state,
  recomputes the chunk's Tc states as a Python list (registers; no scratch memory, so nothing
  can race between threads, which interpret mode would not see) and runs the reverse recurrence
  dh_t = C_t dy_t + a_{t+1} dh_{t+1}, unrolled: dx, ddelta, dB and dC per channel tile
  ([D tiles, B, T, N], summed outside), dA per batch row, dh0.
- channels are padded to a multiple of `Dt` and the state to a power of two with zeros (A = 0
  gives a = 1, B = 0 keeps a padded state at its zero start, C = 0 reads nothing from it); time
  is padded to a multiple of Tc as in `ssm_pallas.kernel_inputs` (delta = 0: a = 1, b = 0).

The state is [Dt, N] (the [B, D, N] layout of the scan; no transposes). On CPU the kernels run
in Pallas interpret mode; on GPU they compile through Triton; on TPU the choice is refused.
Tile, chunk and warps are not tuned: nothing has been measured on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from llm_jax.models.ssm_pallas import fused_vjp, kernel_inputs
from llm_jax.parallel.platform import pallas_interpret

MAX_TILE = 32  # channels per program: more programs (B x D / 32) for the GPU's SMs (not tuned)
MAX_CHUNK = 16  # the backward holds Tc + 1 states of [Dt, N] in registers: 17 x 512 floats / 128 threads
NUM_WARPS = 4


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def time_chunk(chunk: int) -> int:
    """`model.ssm.chunk` rounded up to a power of two, at most MAX_CHUNK steps."""
    return min(MAX_CHUNK, _pow2(chunk))


def d_tile(D: int) -> int:
    """Channels per program: a power of two (Triton's tensors), at most MAX_TILE; D is padded to
    a multiple of it."""
    return min(MAX_TILE, _pow2(D))


def _interpret() -> bool:
    return pallas_interpret("model.ssm.scan=pallas_gpu", "gpu",
                            "model.ssm.scan=pallas (the Mosaic kernel), chunked or auto")


def _step_inputs(t, A, x_ref, delta_ref, bck_ref):
    """Step t's decay a_t [Dt, N], u_t = delta_t x_t, x_t, delta_t [Dt] and B_t, C_t [N]."""
    N = A.shape[1]
    x_t, delta_t = x_ref[t, :], delta_ref[t, :]
    B_t, C_t = bck_ref[t, pl.ds(0, N)], bck_ref[t, pl.ds(N, N)]
    keep_t = bck_ref[t, pl.ds(2 * N, 1)]  # [1]: the restart flag, broadcast over the state
    a = jnp.exp(delta_t[:, None] * A) * keep_t[None, :]
    return a, delta_t * x_t, x_t, delta_t, B_t, C_t


def _forward_kernel(Tc: int, x_ref, delta_ref, bck_ref, A_ref, h0_ref, y_ref, hlast_ref, hstart_ref):
    A = A_ref[...]

    def chunk(c, h):
        hstart_ref[c] = h
        for i in range(Tc):  # unrolled: independent loads for the scheduler
            t = c * Tc + i
            a, u, _, _, B_t, C_t = _step_inputs(t, A, x_ref, delta_ref, bck_ref)
            h = a * h + u[:, None] * B_t[None, :]
            y_ref[t, :] = jnp.sum(h * C_t[None, :], axis=1)
        return h

    hlast_ref[...] = jax.lax.fori_loop(0, x_ref.shape[0] // Tc, chunk, h0_ref[...])


def _backward_kernel(Tc: int, x_ref, delta_ref, bck_ref, A_ref, hstart_ref, dy_ref, dhlast_ref,
                     dx_ref, ddelta_ref, dB_ref, dC_ref, dA_ref, dh0_ref):
    A = A_ref[...]
    nc = x_ref.shape[0] // Tc

    def chunk(j, carry):
        dh, dA = carry  # dh: the gradient reaching the chunk's last state from later steps
        c = nc - 1 - j
        hs = [hstart_ref[c]]  # hs[i + 1] = h at step i of the chunk, hs[0] the state before it
        for i in range(Tc):
            a, u, _, _, B_t, _ = _step_inputs(c * Tc + i, A, x_ref, delta_ref, bck_ref)
            hs.append(a * hs[-1] + u[:, None] * B_t[None, :])
        for i in reversed(range(Tc)):
            t = c * Tc + i
            a, u, x_t, delta_t, B_t, C_t = _step_inputs(t, A, x_ref, delta_ref, bck_ref)
            dy_t = dy_ref[t, :]
            dh = dh + dy_t[:, None] * C_t[None, :]  # y_t = sum_n C_t h_t
            dC_ref[t, :] = jnp.sum(hs[i + 1] * dy_t[:, None], axis=0)
            dB_ref[t, :] = jnp.sum(dh * u[:, None], axis=0)  # b_t = B_t u_t
            du = jnp.sum(dh * B_t[None, :], axis=1)
            da_dlogit = dh * hs[i] * a  # d/d(delta A) of a h_{t-1}
            dx_ref[t, :] = du * delta_t
            ddelta_ref[t, :] = du * x_t + jnp.sum(da_dlogit * A, axis=1)
            dA = dA + da_dlogit * delta_t[:, None]
            dh = a * dh
        return dh, dA

    dh, dA = jax.lax.fori_loop(0, nc, chunk, (dhlast_ref[...], jnp.zeros_like(A)))
    dA_ref[...] = dA
    dh0_ref[...] = dh


def _specs(T: int, Dt: int, N: int, nc: int):
    """BlockSpecs over the grid (b, d): each program sees its row's whole sequence."""
    sq = pl.Squeezed()
    return {
        "rows": pl.BlockSpec((sq, T, Dt), lambda b, d: (b, 0, d)),  # [B, T, D]
        "bck": pl.BlockSpec((sq, T, 2 * N + 1), lambda b, d: (b, 0, 0)),  # [B, T, 2N + 1]
        "A": pl.BlockSpec((Dt, N), lambda b, d: (d, 0)),  # [D, N]
        "state": pl.BlockSpec((sq, Dt, N), lambda b, d: (b, d, 0)),  # [B, D, N]
        "starts": pl.BlockSpec((sq, nc, Dt, N), lambda b, d: (b, 0, d, 0)),  # [B, nc, D, N]
        "partial": pl.BlockSpec((sq, sq, T, N), lambda b, d: (d, b, 0, 0)),  # [D tiles, B, T, N]
    }


def _shapes(*shapes: tuple[int, ...]) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]


_PARAMS = plgpu_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _forward(x, delta, bck, A, h0, Tc: int):
    Bsz, T, D = x.shape
    N = A.shape[1]
    Dt, nc = d_tile(D), T // Tc
    s = _specs(T, Dt, N, nc)
    return pl.pallas_call(
        functools.partial(_forward_kernel, Tc),
        grid=(Bsz, D // Dt),
        in_specs=[s["rows"], s["rows"], s["bck"], s["A"], s["state"]],
        out_specs=[s["rows"], s["state"], s["starts"]],
        out_shape=_shapes((Bsz, T, D), (Bsz, D, N), (Bsz, nc, D, N)),
        compiler_params=_PARAMS,
        interpret=_interpret(),
        name="selective_scan_gpu_fwd",
    )(x, delta, bck, A, h0)


def _backward(x, delta, bck, A, hstarts, dy, dhlast, Tc: int):
    Bsz, T, D = x.shape
    N = A.shape[1]
    Dt, nc = d_tile(D), T // Tc
    nd = D // Dt
    s = _specs(T, Dt, N, nc)
    rows, state, partial = _shapes((Bsz, T, D), (Bsz, D, N), (nd, Bsz, T, N))
    return pl.pallas_call(
        functools.partial(_backward_kernel, Tc),
        grid=(Bsz, nd),
        in_specs=[s["rows"], s["rows"], s["bck"], s["A"], s["starts"], s["rows"], s["state"]],
        out_specs=[s["rows"], s["rows"], s["partial"], s["partial"], s["state"], s["state"]],
        out_shape=[rows, rows, partial, partial, state, state],
        compiler_params=_PARAMS,
        interpret=_interpret(),
        name="selective_scan_gpu_bwd",
    )(x, delta, bck, A, hstarts, dy, dhlast)


# (y without the skip term [B, T, D], last state [B, D, N]) of padded inputs: T a multiple of
# Tc, D of the channel tile, N a power of two; bck = [B_t, C_t, keep_t] [B, T, 2N + 1].
fused_scan = fused_vjp(_forward, _backward)


def pallas_gpu_scan(x, delta, A, B, C, h0, chunk: int, keep=None):
    """`ssm.selective_scan`'s contract (float32 inputs, B and C [B, T, N]): (y [B, T, D] without
    the skip term, last state [B, D, N])."""
    T, D = x.shape[1:]
    N = A.shape[1]
    Tc, pad_d, pad_n = time_chunk(chunk), -D % d_tile(D), _pow2(N) - N
    x, delta = (jnp.pad(v, ((0, 0), (0, 0), (0, pad_d))) for v in (x, delta))
    B, C = (jnp.pad(v, ((0, 0), (0, 0), (0, pad_n))) for v in (B, C))
    A = jnp.pad(A, ((0, pad_d), (0, pad_n)))
    h0 = jnp.pad(h0, ((0, 0), (0, pad_d), (0, pad_n)))
    x, delta, bck = kernel_inputs(x, delta, B, C, keep, Tc)
    y, hlast = fused_scan(x, delta, bck, A, h0, Tc)
    return y[:, :T, :D], hlast[:, :D, :N]
