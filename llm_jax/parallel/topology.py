"""Cloud TPU topologies by the names Google gives them (`v5p-128`, `v5e-256`), as devices this CPU
machine can compile for (ahead of time, through libtpu: the `tpu` extra).

The number in a name counts TensorCores for v4 and v5p (two per chip, used as one "megacore"
device) and chips for v5e and v6e. The chips form a 3D torus (v4, v5p) or a 2D one (v5e, v6e);
`ici_shape` lays them out as Cloud TPU does for a full slice.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

from jax.experimental import topologies

from llm_jax.errors import UserError


@dataclass(frozen=True)
class Generation:
    cores_per_chip: int  # how the accelerator-type name counts: 2 = TensorCores, 1 = chips
    dims: int  # torus dimensions
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 per chip, from the data sheets


GENERATIONS = {
    "v4": Generation(cores_per_chip=2, dims=3, hbm_bytes=32 * 2**30, peak_flops=275e12),
    "v5p": Generation(cores_per_chip=2, dims=3, hbm_bytes=95 * 2**30, peak_flops=459e12),
    "v5e": Generation(cores_per_chip=1, dims=2, hbm_bytes=16 * 2**30, peak_flops=197e12),
    "v6e": Generation(cores_per_chip=1, dims=2, hbm_bytes=32 * 2**30, peak_flops=918e12),
}
ALIASES = {"v5litepod": "v5e", "v6": "v6e"}


@dataclass(frozen=True)
class TpuTopology:
    name: str  # as given, e.g. "v5p-128"
    generation: str  # "v5p"
    chips: int  # per slice
    num_slices: int
    ici_shape: tuple[int, ...]
    hbm_bytes: int  # per chip
    peak_flops: float  # per chip

    @property
    def total_chips(self) -> int:
        return self.chips * self.num_slices

    def devices(self) -> list:
        """One JAX device per chip (megacore on v4/v5p), every slice; needs libtpu."""
        gen = GENERATIONS[self.generation]
        layout = "x".join(map(str, self.ici_shape))
        # A host holds 2x2 chips (the hosts of multi-host slices); smaller slices sit on one host.
        host = (min(self.ici_shape[0], 2), min(self.ici_shape[1], 2), 1)
        kwargs: dict = {"chips_per_host_bounds": host, "num_slices": self.num_slices}
        if gen.cores_per_chip == 2:
            kwargs["chip_config_name"] = "megacore"
        if importlib.util.find_spec("libtpu") is None:
            raise UserError("compiling for a TPU topology needs libtpu: pip install 'llm-jax[tpu]'")
        # libtpu takes a machine-wide lock when it loads, meant for a host's chips; compiling drives
        # no chip, so several processes (tests, other users of this machine) may compile at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            desc = topologies.get_topology_desc(topology_name=f"{self.generation}:{layout}", platform="tpu", **kwargs)
        except Exception as exc:  # a layout this libtpu refuses
            raise UserError(f"cannot describe TPU topology {self.name}: {str(exc).splitlines()[0]}") from None
        return list(desc.devices)


def ici_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The torus of a full slice: start from one host (2x2, 2x2x1) and double the smallest side,
    the later one on ties: 4x4 (16 chips), 8x16 (128), 4x4x4 (64), 4x4x8 (128)."""
    if chips < 4:  # the one- and two-chip v5e/v6e slices
        return (1, chips) if dims == 2 and chips in (1, 2) else ()
    shape = [2, 2] if dims == 2 else [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape) if math.prod(shape) == chips else ()


def parse_topology(name: str, num_slices: int = 1) -> TpuTopology:
    """`v5p-128`, `v5e-16`, `v5litepod-16`, `v4-8`, `v6e-256` (the accelerator types of Cloud TPU)."""
    if num_slices < 1:
        raise UserError(f"--num-slices must be at least 1, got {num_slices}")
    prefix, _, count = name.lower().partition("-")
    generation = ALIASES.get(prefix, prefix)
    if generation not in GENERATIONS or not count.isdigit():
        known = ", ".join(f"{g}-N" for g in GENERATIONS)
        raise UserError(f"unknown TPU topology {name!r}: expected one of {known} (e.g. v5p-128, v5e-16)")
    gen = GENERATIONS[generation]
    units = int(count)
    chips, odd = divmod(units, gen.cores_per_chip)
    shape = ici_shape(chips, gen.dims) if chips and not odd else ()
    if not shape:
        raise UserError(f"{name}: {units} is not a slice size of {generation} "
                        f"({'TensorCores, two per chip' if gen.cores_per_chip == 2 else 'chips'}; "
                        f"e.g. {generation}-{8 if gen.cores_per_chip == 2 else 16})")
    return TpuTopology(name=name, generation=generation, chips=chips, num_slices=num_slices, ici_shape=shape,
                       hbm_bytes=gen.hbm_bytes, peak_flops=gen.peak_flops)
