"""What JAX's Pallas GPU interpreter (jax 0.10.2, unchanged on jax main of Aug 2026) lacks to run
the two backward kernels of `model.moe.grouped_matmul=ragged_dot_mgpu`, lent for tests only:

- a wgmma operand transposed in shared memory (`plgpu.transpose_ref`): the interpreter's wgmma
  reads each operand by its indexing transforms only and fails on a `TransposeTransform`. The
  stand-in below reads the same range (so the race detector sees the same read) and applies the
  permutation to what it read, as the hardware reads the tile transposed;
- `plgpu.layout_cast` (a register layout hint, the identity on values): it has no CPU lowering;
- the SM count the transposed kernel sizes its persistent grid by (`jax.devices()[0].core_count`,
  which CPU devices lack).

All of it reaches into private JAX modules (`jax._src`); `simulate_backward_kernels` checks the
one signature it replaces, so that a JAX which changed it fails naming this file, not deep in a
trace."""

from __future__ import annotations

import inspect
import types

import jax
import numpy as np

from llm_jax.models import mgpu_mlp

# The keyword arguments of JAX's interpreter callback `gpu_callbacks.wgmma` that `_wgmma` replaces.
WGMMA_ARGS = {"token", "device_id", "grid_point_coords", "thread_id", "acc_allocation_key_as_array",
              "acc_transforms", "acc_dtype", "a_allocation_key_as_array", "a_transforms",
              "b_allocation_key_as_array", "b_transforms", "source_info"}


def lend_sm_count(monkeypatch, count: int) -> None:
    """The transposed kernel's module sees devices with `count` SMs (its persistent grid)."""
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    real = transposed_ragged_dot_mgpu.jax

    class _Jax(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real, name)

    shim = _Jax("jax")
    shim.devices = lambda *a, **k: [types.SimpleNamespace(core_count=count)]
    monkeypatch.setattr(transposed_ragged_dot_mgpu, "jax", shim)


def _split_transposes(transforms: tuple) -> tuple[tuple, tuple[int, ...] | None]:
    """Indexing transforms (made concrete) and the permutation of the transposes after them.
    Both kernels transpose a whole shared-memory tile after indexing it (`transpose_ref` of a
    pipeline buffer); a transpose followed by an index, which neither does, would need the index
    mapped back through the permutation and is refused by name instead of read wrongly."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.state.types import TransposeTransform

    rest = tuple(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(transforms)))
    permutation = None
    while rest and isinstance(rest[-1], TransposeTransform):
        inner = rest[-1].permutation
        permutation = inner if permutation is None else tuple(inner[i] for i in permutation)
        rest = rest[:-1]
    if any(isinstance(t, TransposeTransform) for t in rest):
        raise ValueError("tests/mgpu_interpret.py reads a transpose only after the indexing, not before it")
    return rest, permutation


def _wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
           acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
           source_info=None):
    """acc += a @ b on the simulated shared memory, operands read through their transposes."""
    from jax._src.pallas.mosaic.interpret import utils
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    device_id, thread_id = int(device_id), int(thread_id)
    memory = gpu_callbacks._get_shared_memory()
    thread = memory.get_global_thread_id(device_id, thread_id)
    log = utils.GPULoggingInfo(device_id=device_id, grid_point_coords=tuple(int(c) for c in grid_point_coords),
                               thread_id=thread_id, source_info=source_info)

    def located(key_array, transforms):
        indexers, permutation = _split_transposes(transforms)
        return gpu_callbacks.HostAllocationKey.from_array(key_array), utils.to_range(indexers), permutation

    def read(key_array, transforms):
        key, where, permutation = located(key_array, transforms)
        value, _, _ = memory.get_buffer_content(key, where, thread, logging_info=log)
        return value if permutation is None else np.transpose(value, permutation)

    a, b = read(a_allocation_key_as_array, a_transforms), read(b_allocation_key_as_array, b_transforms)
    acc_key, acc_range, _ = located(acc_allocation_key_as_array, acc_transforms)
    acc, _, _ = memory.get_buffer_content(acc_key, acc_range, thread, logging_info=log)
    memory.store_buffer_content(acc_key, acc_range, acc + np.matmul(a, b, dtype=acc_dtype), thread, logging_info=log)
    return token


def simulate_backward_kernels(monkeypatch, sm_count: int = 4) -> None:
    """Teach the interpreter the transposed operand and layout_cast, lend `sm_count` SMs, and let
    `mgpu_mlp` run both backward kernels in interpret mode instead of their XLA stand-ins."""
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic_gpu.core import layout_cast_p
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    changed = WGMMA_ARGS ^ set(inspect.signature(gpu_callbacks.wgmma).parameters)
    assert not changed, f"JAX's interpreter wgmma changed ({sorted(changed)}): update tests/mgpu_interpret.py"
    monkeypatch.setattr(gpu_callbacks, "wgmma", _wgmma)
    monkeypatch.setitem(mlir._platform_specific_lowerings["cpu"], layout_cast_p,
                        mlir.LoweringRuleEntry(lambda ctx, x, new_layout: [x], True))
    lend_sm_count(monkeypatch, sm_count)
    monkeypatch.setattr(mgpu_mlp, "SIMULATE_BACKWARD_KERNELS", True)
