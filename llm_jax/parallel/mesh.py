"""Build the device mesh from `mesh.*` and check it against the devices and the batch."""

from __future__ import annotations

import math

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from llm_jax.config.schema import Config, MeshConfig
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


def dcn_shape(mesh_cfg: MeshConfig) -> tuple[int, ...]:
    """Slices along each axis (multi-slice TPU over the data-centre network; 1s otherwise)."""
    return tuple(getattr(mesh_cfg, f"dcn_{axis}") for axis in MESH_AXES)


def make_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    dcn = dcn_shape(cfg.mesh)
    slices = math.prod(dcn)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        shape = mesh_shape(cfg.mesh, len(devices))
        check_batch(cfg, dict(zip(MESH_AXES, shape)))
        # Auto axes: GSPMD propagates shardings; we pin parameters, batches and block boundaries.
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if len(devices) % slices:
        raise UserError(f"{len(devices)} devices do not split into {slices} slices (mesh.dcn_*)")
    # mesh.data etc. size each axis within a slice (ICI); dcn_* multiplies it across slices.
    ici = mesh_shape(cfg.mesh, len(devices) // slices)
    check_batch(cfg, {axis: i * d for axis, i, d in zip(MESH_AXES, ici, dcn)})
    # Multi-slice TPU devices know their slice; elsewhere (GPU hosts, CPU tests) every device
    # reports slice 0 and each process stands for a slice.
    per_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
    if per_process and jax.process_count() != slices:
        raise UserError(f"mesh.dcn_* asks for {slices} slices but there are {jax.process_count()} processes "
                        "(without TPU slices, each process is one slice)")
    try:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=per_process)
    except (ValueError, AssertionError) as exc:
        raise UserError(f"cannot lay out mesh ICI {ici} x DCN {dcn} on these devices: {exc}") from None
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def check_batch(cfg: Config, sizes: dict[str, int], processes: int | None = None) -> None:
    """The per-microbatch batch must split evenly over the batch-parallel axes and processes."""
    processes = jax.process_count() if processes is None else processes
    batch_parallel = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % batch_parallel:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} (per microbatch {micro}) is not divisible by the "
            f"data-parallel size {batch_parallel} (mesh.data*mesh.fsdp*mesh.expert)"
        )
    if cfg.train.batch_size % processes:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by {processes} processes"
        )
    heads_split = sizes["tensor"]
    if cfg.model.spec.attends(cfg.model) and cfg.model.num_heads % heads_split:
        raise UserError(f"model.num_heads={cfg.model.num_heads} is not divisible by mesh.tensor={heads_split}")
    moe = cfg.model.moe
    if moe.enabled and moe.num_experts % sizes["expert"]:
        raise UserError(f"model.moe.num_experts={moe.num_experts} is not divisible by mesh.expert={sizes['expert']}")


def single_device_mesh() -> Mesh:
    """Every mesh axis of size 1 on the first device: inference and conversions of one model."""
    return jax.make_mesh((1,) * len(MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=jax.devices()[:1])
