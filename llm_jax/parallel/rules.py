"""The one table that maps logical axis names to mesh axes.

Every parameter names its dimensions with logical axes (`embed`, `mlp`, `heads`, ...) and
activations are constrained with the same names at block boundaries; this table alone decides
where each lands on the mesh. An unknown logical name is a bug and raises: there is no
catch-all rule that would silently replicate a parameter.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes it is split over (in order), or () for replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),  # dense models use the expert axis as more data parallelism
    "length": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "vocab": ("tensor",),
    "position": (),
    "segment": (),  # BERT's two token-type rows: tiny, so every shard keeps both
    "relpos_buckets": (),  # T5's relative-position bias table: a few dozen rows
    "classes": (),  # a classifier's few output classes
    "layers": (),
    "norm": (),
    "gates": (),  # the gate blocks of a recurrent cell's weights: every shard needs all of them
    "expert": ("expert",),  # MoE expert weights: each device of the expert axis holds E/ep experts
    "router": (),  # the router's expert scores: every device routes its tokens over all experts
    "conv": (),  # Mamba: the few taps of the depthwise convolution
    "ssm_state": (),  # Mamba: the state size N of each channel
    "ssm_rank": (),  # Mamba: the low rank of the delta projection
    "ssm_proj": (),  # Mamba: x_proj's outputs (dt, B, C), read whole by every channel
}

_current_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("llm_jax_mesh", default=None)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """Translate logical axis names to a PartitionSpec.

    With `shape` and `mesh`, a mesh axis that does not divide its dimension is dropped (that
    dimension stays whole on it); `sharding_report` lists large parameters this leaves replicated.
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise ValueError(f"logical axis '{name}' has no rule in parallel/rules.py LOGICAL_RULES")
        axes = []
        size = 1
        for axis in LOGICAL_RULES[name]:
            if axis in used:
                continue  # a mesh axis can shard only one dimension of an array
            n = mesh.shape[axis] if mesh is not None else 1
            if shape is not None and mesh is not None and shape[dim] % (size * n):
                continue
            axes.append(axis)
            size *= n
            used.add(axis)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)



def axis_names(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def manual_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """`logical_to_spec` for a `shard_map`, without the mesh axes of size 1: they split nothing,
    and naming them would only add collectives over one device (a weight copy forward, an
    all-reduce backward)."""
    def kept(entry):
        axes = tuple(a for a in axis_names(entry) if mesh.shape[a] > 1)
        return axes if len(axes) > 1 else (axes[0] if axes else None)

    return P(*(kept(entry) for entry in logical_to_spec(names, shape, mesh)))


def sharded_shapes(shapes, shardings):
    """ShapeDtypeStructs of `shapes` carrying the matching `shardings` (trees of the same
    structure): restore targets and ahead-of-time arguments, nothing allocated."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def sharding_report(shapes: dict[str, tuple[tuple[int, ...], P]], mesh: Mesh,
                    min_elements: int = 1 << 20) -> list[str]:
    """Names of parameters of at least `min_elements` that the model-parallel axes leave whole.

    `shapes` maps a parameter path to (shape, spec). Only meaningful when fsdp or tensor > 1.
    """
    model_parallel = mesh.shape["fsdp"] * mesh.shape["tensor"] * mesh.shape["expert"]
    if model_parallel == 1:
        return []
    out = []
    for path, (shape, spec) in shapes.items():
        if math.prod(shape) >= min_elements and all(s is None for s in spec):
            out.append(f"{path} {tuple(shape)}")
    return out


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Make `constrain` active for code traced inside this block."""
    token = _current_mesh.set(mesh)
    try:
        yield
    finally:
        _current_mesh.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_mesh` (None outside one)."""
    return _current_mesh.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names (a no-op outside `activation_mesh`)."""
    mesh = _current_mesh.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))
