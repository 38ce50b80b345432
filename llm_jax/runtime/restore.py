"""A run directory's trained parameters on one device: what inference and export-hf read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_jax.config import Config, read_run_config
from llm_jax.data import load_tokenizer
from llm_jax.data.tasks import classes_of
from llm_jax.errors import UserError
from llm_jax.models.base import model_vocab_size
from llm_jax.models.definition import ModelDef, model_def, param_shardings
from llm_jax.parallel.mesh import single_device_mesh
from llm_jax.parallel.rules import sharded_shapes
from llm_jax.runtime.checkpoint import Checkpointer, checkpoint_dir


def restore_params(run_dir: str | Path, step: int | None = None) -> tuple[Config, Any, ModelDef, dict, int]:
    """(config, tokenizer, model definition, parameters, step) of a run directory's newest complete
    checkpoint (or of `step`), restored straight onto a 1-device mesh (Orbax reshards whatever
    mesh the run trained on)."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    cfg = read_run_config(run_dir)
    if not checkpoint_dir(run_dir).is_dir():
        raise UserError(f"{run_dir} has no checkpoints; train it first")
    ckpt = Checkpointer(run_dir, cfg, read_only=True)
    try:
        steps = ckpt.manager.all_steps()
        if step is None:
            step = ckpt.newest_sound_step()  # newer damaged steps are named in a warning
            if step is None:
                raise UserError(f"{run_dir} has no complete checkpoint; train it first")
        elif step not in steps:
            raise UserError(f"{run_dir} has no checkpoint at step {step} (have: {sorted(steps)})")
        elif (damage := ckpt.check(step)) is not None:
            raise UserError(f"checkpoint step {step} of {run_dir} is damaged ({damage})")
        tokenizer = load_tokenizer(cfg, run_dir)
        mdef = model_def(cfg, model_vocab_size(cfg, tokenizer.vocab_size), classes_of(cfg))
        shardings = param_shardings(mdef, single_device_mesh())
        abstract = sharded_shapes(mdef.shapes, shardings)
        try:
            params = ckpt.restore_params(step, abstract)
        except ValueError as exc:  # TensorStore's word for a file it cannot read
            raise UserError(f"checkpoint step {step} of {run_dir} could not be restored: {exc}") from None
    finally:
        ckpt.close()
    return cfg, tokenizer, mdef, params, step
