"""Grouped expert MLP through JAX's Pallas Mosaic GPU kernels (`model.moe.grouped_matmul=ragged_dot_mgpu`).

`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot` multiplies rows [M, K] sorted by
group with per-group weights [G, K, N] on Hopper (TMA loads, wgmma, one persistent block per
SM): each grid step one (row tile, column tile) of one group, the weights read in place. It has
no VJP, so `grouped_matmul` below is a `jax.custom_vjp`:

- forward: y = ragged_dot(x, w);
- rows' gradient: dx = ragged_dot(dy, w, transpose_rhs=True) (dy [M, N] times w[g]^T, wgmma
  reads the weights transposed from shared memory: no transposed copy);
- weights' gradient: dw[g] = x[rows of g]^T dy[rows of g] by
  `transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy)` -> [G, K, N] (the same operands and
  layouts as autodiff of `lax.ragged_dot`: its transpose rule contracts the ragged row axis).

Rows past sum(sizes) (the padding below, the unused rows of an expert-parallel receive buffer):
`ragged_dot` writes no output row outside a group (those rows would be uninitialised memory),
so y and dx are zeroed there by a `where`; dy and x are zeroed there before the weight gradient
(the transposed kernel masks other groups' rows by multiplying with 0, which keeps a NaN). The
kernel's grid is static, (M / block_m + G - 1) x (N / block_n) tiles: tiles past the last group
run a full K loop on tile 0 and store nothing, so (unlike megablox) a worst-case receive buffer
costs compute for its slack, like `blocked`.

Inside `shard_map` (expert parallelism) the kernels need `check_vma=False`: like megablox, they
declare their outputs without the mesh axes they vary over (the weights' gradient of the
compiled transposed kernel is refused by a checking shard_map); `moe.expert_parallel` turns the
check off for this choice, and shard_map's autodiff adds the gradient sums itself.

Tiling (chosen from the shapes, not measured on a GPU yet):
- block_k = 64: one 128-byte swizzled row of 16-bit elements, the kernels' own choice.
- block_n (and the transposed kernel's block_m): 128 when it divides the dimension, else 64.
- block_m (rows): 128 when the mean group has at least 128 rows, else 64 (wgmma's M is 64).
- K and N (d_model and the expert width) are padded with zeros to multiples of 64 (a copy of the
  weights when they are not: keep both multiples of 64) and M to a multiple of block_m.
- max_concurrent_steps = 4 (four stages of 128x64 + 64x128 bf16 tiles, 128 KiB of the H100's
  228 KiB shared memory), grid_block_n = 1 (in interpret mode wider: see `_forward`).

dtypes: bfloat16 and float16 only. wgmma multiplies float32 as tf32 and cannot transpose a
32-bit operand in shared memory, which both backward kernels do; float32 is refused rather than
silently rounded (`model.dtype=bfloat16`).

Where it runs: compiled by Mosaic GPU on a Hopper GPU; on CPU in Pallas GPU interpret mode,
which simulates shared memory, TMA, barriers and wgmma but (jax 0.10.2 to at least Aug 2026) not
a wgmma operand transposed in shared memory, nor `layout_cast`, both of which the backward
kernels use. So in interpret mode the rows' gradient runs the forward kernel on swapped weights
(a copy) and the weights' gradient runs `lax.ragged_dot_general`, unless
`SIMULATE_BACKWARD_KERNELS` is on: the tests switch it on after lending the interpreter those
two operations (tests/mgpu_interpret.py), so that all three kernels are checked there. On TPU it
is refused.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError
from llm_jax.models.layers import activate
from llm_jax.parallel.platform import pallas_interpret

CHOICE = "model.moe.grouped_matmul=ragged_dot_mgpu"
DIM_ALIGN = 64  # block_k: 64 16-bit elements, one 128-byte swizzle row
STAGES = 4  # max_concurrent_steps: pipelined (row, column) tile loads in shared memory (not tuned)
FORWARD_ARGS = {"group_sizes", "block_m", "block_n", "block_k", "max_concurrent_steps", "grid_block_n",
                "transpose_rhs"}
TRANSPOSED_ARGS = FORWARD_ARGS - {"transpose_rhs"}
DETECT_RACES = False  # interpret mode: JAX's happens-before race detector (a test switches it on)
# Interpret mode: run the two backward kernels rather than their stand-ins (module docstring).
SIMULATE_BACKWARD_KERNELS = False


def check_platform() -> bool:
    """Whether the kernels run in Pallas GPU interpret mode (CPU); on TPU, or on a GPU of this
    process that is not a Hopper (wgmma exists on compute capability 9.x only), an error."""
    interpret = pallas_interpret(CHOICE, "gpu", "ragged_dot or megablox (docs/moe.md)")
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if not interpret and device.platform == "gpu" and capability and not capability.startswith("9"):
        raise UserError(f"{CHOICE} needs a Hopper GPU (compute capability 9.x, wgmma), not {device.device_kind} "
                        f"({capability}); use blocked")
    return interpret


def kernels() -> tuple:
    """The two kernel functions, checked against the signatures this module calls (written for
    jax 0.10.2; unchanged up to 0.11), so that a newer JAX that moved or changed them fails with
    a message rather than deep inside a trace."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    except ImportError as e:
        raise UserError(f"{CHOICE} needs jax.experimental.pallas.ops.gpu.ragged_dot_mgpu "
                        f"(jax {jax.__version__}: {e}); use blocked") from None
    for fn, needed in ((getattr(ragged_dot_mgpu, "ragged_dot", None), FORWARD_ARGS),
                       (getattr(transposed_ragged_dot_mgpu, "transposed_ragged_dot", None), TRANSPOSED_ARGS)):
        missing = needed - set(inspect.signature(fn).parameters) if callable(fn) else needed
        if missing:
            raise UserError(f"{CHOICE}: jax {jax.__version__} changed its Mosaic GPU ragged dot kernels "
                            f"(missing arguments {sorted(missing)}); use blocked")
    return ragged_dot_mgpu, transposed_ragged_dot_mgpu


def dim_block(dim: int) -> int:
    """block_n of a dimension that is a multiple of 64: 128 when it divides it, else 64."""
    return 128 if dim % 128 == 0 else DIM_ALIGN


def row_block(rows: int, num_groups: int) -> int:
    """block_m: 128 when the mean group has at least 128 rows, else 64."""
    return 128 if rows >= 128 * num_groups else 64


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@contextmanager
def _interpreting(interpret: bool) -> Iterator[None]:
    """Pallas GPU interpret mode for the kernels traced inside (it is read at trace time). A
    private JAX module (jax._src): imported only here, on CPU."""
    if not interpret:
        yield
        return
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode

    with force_gpu_interpret_mode(InterpretGPUParams(detect_races=DETECT_RACES)):
        yield


def _valid_rows(m: int, sizes_G: jax.Array) -> jax.Array:
    return (jnp.arange(m) < sizes_G.sum())[:, None]


def _band(n: int, interpret: bool) -> int:
    """grid_block_n: the column tiles per band of the kernels' snake order over (row, column)
    tiles. 1 on GPU. In interpret mode XLA:CPU can fold the kernel's index arithmetic to
    constants, and planar_snake's branch for a partial last band (dead when the band width
    divides the columns) then divides by zero at compile time: a SIGFPE inside LLVM (seen with
    one local expert under expert parallelism). A band wider than all columns has no zero divisor."""
    return n // dim_block(n) + 1 if interpret else 1


def _forward(x_MK, w_GKN, sizes_G, block_m: int, interpret: bool, transpose_rhs: bool = False):
    fwd, _ = kernels()
    n = w_GKN.shape[1 if transpose_rhs else 2]
    if interpret and transpose_rhs and not SIMULATE_BACKWARD_KERNELS:  # no transpose in shared memory: a copy
        w_GKN, transpose_rhs = w_GKN.swapaxes(1, 2), False
    with _interpreting(interpret):
        y = fwd.ragged_dot(x_MK, w_GKN, group_sizes=sizes_G, block_m=block_m, block_n=dim_block(n),
                           block_k=DIM_ALIGN, max_concurrent_steps=STAGES,
                           grid_block_n=_band(n, interpret), transpose_rhs=transpose_rhs)
    return jnp.where(_valid_rows(x_MK.shape[0], sizes_G), y, 0).astype(x_MK.dtype)


def _weight_grad(x_MK, dy_MN, sizes_G, interpret: bool):
    if interpret and not SIMULATE_BACKWARD_KERNELS:  # it transposes in shared memory (module docstring)
        dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(x_MK, dy_MN, sizes_G, dims,
                                          preferred_element_type=jnp.float32).astype(x_MK.dtype)
    _, transposed = kernels()
    with _interpreting(interpret):
        return transposed.transposed_ragged_dot(x_MK, dy_MN, group_sizes=sizes_G,
                                                block_m=dim_block(x_MK.shape[1]), block_n=dim_block(dy_MN.shape[1]),
                                                block_k=DIM_ALIGN, max_concurrent_steps=STAGES,
                                                grid_block_n=_band(dy_MN.shape[1], interpret))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, sizes_G: jax.Array, block_m: int,
                   interpret: bool) -> jax.Array:
    """x [M, K] (sorted by group, M a multiple of block_m, K of 64) times w [G, K, N] (N a
    multiple of 64) per group of `sizes_G` rows; rows past the sum come out zero."""
    return _forward(x_MK, w_GKN, sizes_G, block_m, interpret)


def _grouped_matmul_fwd(x_MK, w_GKN, sizes_G, block_m, interpret):
    return _forward(x_MK, w_GKN, sizes_G, block_m, interpret), (x_MK, w_GKN, sizes_G)


def _grouped_matmul_bwd(block_m, interpret, residuals, dy_MN):
    x_MK, w_GKN, sizes_G = residuals
    valid = _valid_rows(x_MK.shape[0], sizes_G)
    dy_MN = jnp.where(valid, dy_MN, 0).astype(x_MK.dtype)
    dx_MK = _forward(dy_MN, w_GKN, sizes_G, block_m, interpret, transpose_rhs=True)
    dw_GKN = _weight_grad(jnp.where(valid, x_MK, 0), dy_MN, sizes_G, interpret)
    return dx_MK, dw_GKN, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def mgpu_mlp(kind: str, w: dict, x_MD: jax.Array, sizes_E: jax.Array, tile: int | None = None) -> jax.Array:
    """The experts' MLPs on rows [M, D] sorted by expert with group sizes [E] (rows past their
    sum come out as zeros), each matmul one Mosaic GPU `ragged_dot`; `tile` overrides block_m."""
    M, D = x_MD.shape
    E = sizes_E.shape[0]
    if x_MD.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"{CHOICE} multiplies bfloat16 or float16 (wgmma transposes only 16-bit operands), "
                        f"not {x_MD.dtype}: set model.dtype=bfloat16")
    interpret = check_platform()
    block_m = tile or row_block(M, E)
    F = w["up"].shape[2]
    Mp, Dp, Fp = _pad_to(M, block_m), _pad_to(D, DIM_ALIGN), _pad_to(F, DIM_ALIGN)
    x_PD = jnp.pad(x_MD, ((0, Mp - M), (0, Dp - D)))
    pad = {"up": ((0, 0), (0, Dp - D), (0, Fp - F)), "gate": ((0, 0), (0, Dp - D), (0, Fp - F)),
           "down": ((0, 0), (0, Fp - F), (0, Dp - D))}
    w = {k: jnp.pad(v.astype(x_MD.dtype), pad[k]) for k, v in w.items()}
    sizes_E = sizes_E.astype(jnp.int32)

    def mm(a: jax.Array, b: jax.Array) -> jax.Array:
        return grouped_matmul(a, b, sizes_E, block_m, interpret)

    gate = mm(x_PD, w["gate"]) if "gate" in w else None
    # The padded hidden columns are 0 (zero weights) and stay 0 through relu and silu(0) * 0; gelu(0) = 0 too.
    y_PD = mm(activate(kind, mm(x_PD, w["up"]), gate), w["down"])
    return y_PD[:M, :D]
