"""The train state and how it is born sharded.

The model is split once: a static `graphdef` plus parameters as a plain nested dict of arrays.
The train state is {"params", "opt_state", "step"}, a pytree that jit, Orbax and optax all
handle directly; an objective that `needs_reference` (DPO) adds "ref_params", the frozen
parameters training started from (after checkpoint.init_from), sharded as the parameters and
saved in checkpoints with them, so a resumed run compares against exactly the same reference
(even if the init_from run has since gone on or been deleted). Parameters are created inside
`jax.jit(out_shardings=...)` from abstract shapes, so no device ever holds the whole unsharded
model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import Config
from llm_jax.models.base import build
from llm_jax.models.definition import ModelDef, param_shardings
from llm_jax.parallel.rules import sharded_shapes


def init_params(cfg: Config, mdef: ModelDef, mesh: Mesh) -> dict:
    def create() -> dict:
        return nnx.to_pure_dict(nnx.state(build(cfg, mdef.dims, nnx.Rngs(cfg.seed))))

    return jax.jit(create, out_shardings=param_shardings(mdef, mesh))()


def state_shardings(mesh: Mesh, tx: optax.GradientTransformation, mdef: ModelDef, reference: bool = False) -> dict:
    """Shardings of the whole train state: optimizer moments follow their parameters; with
    `reference`, so do the reference parameters."""
    pshard = param_shardings(mdef, mesh)
    abstract_opt = jax.eval_shape(tx.init, mdef.shapes)
    replicated = NamedSharding(mesh, P())
    opt_shard = optax.tree_map_params(tx, lambda _p, s: s, abstract_opt, pshard,
                                      transform_non_params=lambda _: replicated)
    shardings = {"params": pshard, "opt_state": opt_shard, "step": replicated}
    return {**shardings, "ref_params": pshard} if reference else shardings


def start_reference(state: dict, shardings: dict) -> dict:
    """`state` with "ref_params" a copy of its parameters when its shardings have a reference
    (the copy is its own buffers: the step donates the parameters, never the reference)."""
    if "ref_params" not in shardings:
        return state
    ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["ref_params"])(state["params"])
    return {**state, "ref_params": ref}


def init_state(cfg: Config, mdef: ModelDef, mesh: Mesh, tx: optax.GradientTransformation, shardings: dict) -> dict:
    params = init_params(cfg, mdef, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return start_reference({"params": params, "opt_state": opt_state, "step": step}, shardings)


def abstract_state(mdef: ModelDef, tx: optax.GradientTransformation, shardings: dict) -> dict:
    """ShapeDtypeStructs with this mesh's shardings: the restore target for Orbax."""
    shapes = {"params": mdef.shapes, "opt_state": jax.eval_shape(tx.init, mdef.shapes),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if "ref_params" in shardings:
        shapes["ref_params"] = mdef.shapes
    return sharded_shapes(shapes, shardings)

