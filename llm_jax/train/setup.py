"""Everything a run needs before its first step, shared by `train` and `bench`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import optax
from jax.sharding import Mesh

from llm_jax.config import Config
from llm_jax.metrics import flops_per_token, matmul_params
from llm_jax.parallel.mesh import make_mesh
from llm_jax.train.objectives import MLMSpec
from llm_jax.train.optim import make_optimizer, make_schedule
from llm_jax.train.state import ModelDef, abstract_state, model_def, state_shardings, unsharded_large_params
from llm_jax.train.step import batch_sharding, make_eval_step, make_train_step


@dataclass
class TrainSetup:
    cfg: Config
    mesh: Mesh
    mdef: ModelDef
    vocab_size: int
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: dict
    train_step: Callable
    eval_step: Callable
    flops_per_token: float
    warnings: list[str]

    def abstract_state(self) -> dict:
        return abstract_state(self.mdef, self.tx, self.shardings)

    def to_global(self, local_batch) -> jax.Array:
        """This process's rows -> the global batch array laid out on the mesh."""
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh), local_batch)


def build_setup(cfg: Config, vocab_size: int, mesh: Mesh | None = None, mlm: MLMSpec | None = None) -> TrainSetup:
    """`mlm`: the masking spec, needed by masked-LM models (bert); see `objectives.mlm_spec`."""
    mesh = mesh if mesh is not None else make_mesh(cfg)
    mdef = model_def(cfg, vocab_size)
    tx = make_optimizer(cfg)
    schedule = make_schedule(cfg)
    shardings = state_shardings(mesh, tx, mdef)
    warnings = [f"parameter left replicated by the mesh: {p}" for p in unsharded_large_params(mdef, mesh)]
    return TrainSetup(
        cfg=cfg, mesh=mesh, mdef=mdef, vocab_size=vocab_size, tx=tx, schedule=schedule,
        shardings=shardings,
        train_step=make_train_step(cfg, mdef, tx, schedule, mesh, shardings, mlm),
        eval_step=make_eval_step(mdef, mesh, shardings["params"], cfg=cfg, mlm=mlm),
        flops_per_token=flops_per_token(cfg, matmul_params(cfg, mdef.shapes)),
        warnings=warnings,
    )
