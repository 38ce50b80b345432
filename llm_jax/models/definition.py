"""A model split once: the static graph, parameter shapes and logical axis names, and the
shardings those names give on a mesh (no parameter is materialised here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llm_jax.config import Config
from llm_jax.models.base import Dims, build, dims_of
from llm_jax.parallel.rules import logical_to_spec, sharding_report


@dataclass(frozen=True)
class ModelDef:
    """The static half of a split model and the logical axis names of its parameters."""

    graphdef: Any
    dims: Dims  # what the shapes took from outside the config (vocabulary, lengths, heads)
    shapes: dict  # pure dict of jax.ShapeDtypeStruct
    logical: dict  # pure dict of tuples of logical axis names

    def merge(self, params: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.shapes))


def model_def(cfg: Config, vocab_size: int, num_classes: int = 0) -> ModelDef:
    """The model `cfg` describes for a vocabulary of `vocab_size` rows (and `num_classes` labels
    for a classifier), split without materialising a parameter."""
    dims = dims_of(cfg, vocab_size, num_classes)
    abstract = nnx.eval_shape(lambda: build(cfg, dims, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    logical = nnx.to_pure_dict(jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return ModelDef(graphdef, dims, shapes, logical)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def param_shardings(mdef: ModelDef, mesh: Mesh) -> dict:
    return jax.tree.map(lambda names, s: NamedSharding(mesh, logical_to_spec(names, s.shape, mesh)),
                        mdef.logical, mdef.shapes, is_leaf=_is_names)


def unsharded_large_params(mdef: ModelDef, mesh: Mesh) -> list[str]:
    """Large parameters that the mesh leaves replicated (reported so a user can fix the mesh)."""
    flat = {}
    for path, names in jax.tree_util.tree_leaves_with_path(mdef.logical, is_leaf=_is_names):
        shape = mdef.shapes
        for k in path:
            shape = shape[k.key]
        flat["/".join(k.key for k in path)] = (shape.shape, logical_to_spec(names, shape.shape, mesh))
    return sharding_report(flat, mesh)
