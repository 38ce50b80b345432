"""Checkpoints: Orbax CheckpointManager, async, keep-N, restorable onto any mesh.

Layout: <run.dir>/checkpoints/<step>/{state, data, config}. Orbax writes each step into a
temporary directory and renames it only when every item is complete, so a checkpoint cut off
by a kill is never listed by `latest_step()` and never restored.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from llm_jax.config import Config


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


class Checkpointer:
    """Saves {state, data position, config} every `checkpoint.every` steps and at the end."""

    def __init__(self, run_dir: str | Path, cfg: Config, *, read_only: bool = False):
        self.every = cfg.checkpoint.every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.checkpoint.keep,
            enable_async_checkpointing=cfg.checkpoint.async_save and not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(checkpoint_dir(run_dir), options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int, final_step: int) -> bool:
        return step == final_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: dict, data_state: dict, cfg: Config, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(cfg.to_dict()))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """Restore the train state onto the shardings in `abstract_state` (any mesh)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        """Only the parameters (for generation and `llm_jax.load`), onto the given shardings."""
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                                   dtype=s.dtype), abstract_params)
        # The train state was written as one pytree; read back just its "params" subtree.
        path = Path(self.manager.directory) / str(step) / "state"
        out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
        return out["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

