"""Everything a run needs before its first step, shared by `train` and `bench`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import optax
from jax.sharding import Mesh

from llm_jax.config import Config
from llm_jax.data.tasks import classes_of
from llm_jax.models.base import family_of
from llm_jax.models.definition import ModelDef, model_def, unsharded_large_params
from llm_jax.parallel.mesh import make_mesh
from llm_jax.train.objectives import Objective
from llm_jax.train.optim import make_optimizer, make_schedule
from llm_jax.train.state import abstract_state, state_shardings
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
    objective: Objective
    train_step: Callable
    eval_step: Callable
    flops_per_token: float
    warnings: list[str]

    def abstract_state(self) -> dict:
        return abstract_state(self.mdef, self.tx, self.shardings)

    def to_global(self, local_batch) -> jax.Array:
        """This process's rows -> the global batch array laid out on the mesh."""
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh), local_batch)


def build_setup(cfg: Config, vocab_size: int, objective: Objective, mesh: Mesh | None = None) -> TrainSetup:
    """`objective`: from `objectives.build_objective` (or `tokenizer_objective`)."""
    mesh = mesh if mesh is not None else make_mesh(cfg)
    mdef = model_def(cfg, vocab_size, classes_of(cfg))
    tx = make_optimizer(cfg)
    schedule = make_schedule(cfg)
    shardings = state_shardings(mesh, tx, mdef, reference=objective.needs_reference)
    warnings = [f"parameter left replicated by the mesh: {p}" for p in unsharded_large_params(mdef, mesh)]
    flops_per_token = family_of(cfg.model.arch).flops_per_token(cfg, mdef.shapes)
    if objective.needs_reference:  # the reference's forward pass: a third of the policy's forward + backward
        flops_per_token *= 4 / 3
    return TrainSetup(
        cfg=cfg, mesh=mesh, mdef=mdef, vocab_size=vocab_size, tx=tx, schedule=schedule,
        shardings=shardings, objective=objective,
        train_step=make_train_step(cfg, mdef, tx, schedule, mesh, shardings, objective),
        eval_step=make_eval_step(mdef, mesh, shardings["params"], objective),
        flops_per_token=flops_per_token,
        warnings=warnings,
    )
