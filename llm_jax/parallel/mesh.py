"""Build the device mesh from `mesh.*` and check it against the devices and the batch."""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from llm_jax.config import Config, MeshConfig
from llm_jax.errors import UserError
from llm_jax.parallel.rules import MESH_AXES


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Resolve `-1` entries (at most one) so the axes multiply to `num_devices`."""
    sizes = [getattr(mesh_cfg, axis) for axis in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise UserError(f"mesh.{axis}={size} must be a positive size or -1 (fill)")
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise UserError("only one mesh axis may be -1 (" + ", ".join(f"mesh.{MESH_AXES[i]}" for i in fill) + ")")
    fixed = math.prod(s for s in sizes if s != -1)
    desc = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if fill:
        if num_devices % fixed:
            raise UserError(f"mesh {desc} does not fit {num_devices} devices: {fixed} does not divide {num_devices}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(f"mesh {desc} needs {fixed} devices but {num_devices} are available")
    return tuple(sizes)


def make_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg.mesh, len(devices))
    check_batch(cfg, dict(zip(MESH_AXES, shape)))
    # Auto axes: GSPMD propagates shardings; we pin parameters, batches and block boundaries.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_batch(cfg: Config, sizes: dict[str, int]) -> None:
    """The per-microbatch batch must split evenly over the batch-parallel axes and processes."""
    batch_parallel = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % batch_parallel:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} (per microbatch {micro}) is not divisible by the "
            f"data-parallel size {batch_parallel} (mesh.data*mesh.fsdp*mesh.expert)"
        )
    if cfg.train.batch_size % jax.process_count():
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by {jax.process_count()} processes"
        )
    heads_split = sizes["tensor"]
    if cfg.model.num_heads % heads_split:
        raise UserError(f"model.num_heads={cfg.model.num_heads} is not divisible by mesh.tensor={heads_split}")
