"""`llm-jax train CONFIG` with rl.method in {ppo, grpo, rloo}: a run directory, the policy from
checkpoint.init_from (the reference is a frozen copy of it, restored from init_from again on
resume rather than checkpointed twice), and the ordinary Trainer running the RL step with the
same checkpoint, metrics and SIGTERM hooks as `llm-jax train`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax

from llm_jax.alignment.prompts import prompt_set
from llm_jax.alignment.setup import RLSetup, build_rl_setup
from llm_jax.config import Config, read_run_config
from llm_jax.data import load_tokenizer
from llm_jax.errors import UserError
from llm_jax.interop import pretrained
from llm_jax.models.base import model_vocab_size
from llm_jax.parallel.distributed import barrier, broadcast_flag
from llm_jax.parallel.mesh import make_mesh
from llm_jax.runtime.metrics import MetricsWriter
from llm_jax.runtime.run_dir import check_run_dir, write_run_config
from llm_jax.train.nonfinite import StopOnNonfinite
from llm_jax.train.run import ProgressAdvance, SaveCheckpoints, open_checkpoints
from llm_jax.train.state import init_params
from llm_jax.train.trainer import Evaluate, Hook, StepTimeout, Trainer, host_record


class LogRL(Hook):
    """Every train.log_every steps (and the last): the step's metrics as one record and a line."""

    def __init__(self, every: int, last: int, writer: MetricsWriter):
        self.every, self.last, self.writer = every, last, writer
        self.latest: dict = {}

    def after_step(self, trainer: Trainer, done: int, state: Any, metrics: dict) -> bool:
        if done % self.every and done != self.last:
            return False
        record = host_record(done, metrics)
        trainer.drain()  # the step has finished: a non-finite one stops the run before it is logged
        self.writer.write(record)
        share = record["gen_seconds"] / max(record["gen_seconds"] + record["reward_seconds"]
                                            + record["update_seconds"], 1e-9)
        self.writer.log(f"step {done}: reward {record['reward']:.4f}, kl {record['kl']:.4f}, "
                        f"kl_coef {record['kl_coef']:.4g}, response_len {record['response_len']:.1f}, "
                        f"generating {share:.0%} of the step")
        self.latest.update(record)
        return False


def _tokenizer(cfg: Config, run_dir: Path) -> Any:
    """init_from's tokenizer, copied into this run (so `llm_jax.load` reads it); byte without init_from."""
    if not cfg.checkpoint.init_from:
        return load_tokenizer(cfg, run_dir)
    source = Path(cfg.checkpoint.init_from).expanduser()
    source_cfg = read_run_config(source)
    if source_cfg.data.tokenizer != cfg.data.tokenizer:
        raise UserError(f"data.tokenizer={cfg.data.tokenizer!r}, but checkpoint.init_from {source} was trained "
                        f"with {source_cfg.data.tokenizer!r}; use the same")
    if (source / "tokenizer").is_dir() and not (run_dir / "tokenizer").exists() and jax.process_index() == 0:
        shutil.copytree(source / "tokenizer", run_dir / "tokenizer")
    return load_tokenizer(source_cfg, source)


def initial_params(cfg: Config, setup: RLSetup) -> tuple[dict, list[str]]:
    """init_from's parameters on this mesh (heads it lacks, such as the value head, fresh)."""
    fresh = init_params(cfg, setup.mdef, setup.mesh)
    if not cfg.checkpoint.init_from:
        return fresh, []
    return pretrained.pretrained_params(cfg, setup.mdef, setup.shardings["params"], fresh)


def rl_train(cfg: Config, mesh=None) -> dict:
    """Run (or resume) the RL run in cfg.run.dir; returns the last logged metrics."""
    if cfg.rl.method == "none":
        raise UserError("rl.method=none: this is an ordinary training run")
    if cfg.train.on_nonfinite != "stop":
        raise UserError(f"train.on_nonfinite={cfg.train.on_nonfinite} is for `llm-jax train` without rl.method; "
                        "an RL run stops on a non-finite loss (train.on_nonfinite=stop)")
    run_dir, existed = check_run_dir(cfg)
    existed = broadcast_flag(existed)
    if existed and read_run_config(run_dir).checkpoint.init_from != cfg.checkpoint.init_from:
        # The reference policy is read from init_from again on resume: it must be the same one.
        raise UserError(f"run directory {run_dir} was started from checkpoint.init_from="
                        f"{read_run_config(run_dir).checkpoint.init_from!r}, the reference policy; keep it")
    if cfg.checkpoint.init_from:
        pretrained.check_init_from(cfg)
    mesh = mesh if mesh is not None else make_mesh(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(cfg, run_dir)
    prompts = prompt_set(cfg)
    setup = build_rl_setup(cfg, mesh, tokenizer, prompts, model_vocab_size(cfg, tokenizer.vocab_size))
    write_run_config(cfg, run_dir)
    barrier("run_dir")
    ckpt, resumed, writer = open_checkpoints(cfg, run_dir, existed, setup.abstract_state)
    setup.ref_params, fresh = initial_params(cfg, setup)
    writer.log(f"run {run_dir}: rl.method={cfg.rl.method}, {setup.mdef.num_params / 1e6:.2f}M parameters, "
               f"{len(prompts.train)} prompts, {setup.rollouts_per_step} completions per step, "
               f"mesh {dict(mesh.shape)}" + (f"; newly initialised: {', '.join(fresh)}" if fresh else ""))
    order = {"seed": cfg.seed, "n_prompts": len(prompts.train), "rollouts": setup.rollouts_per_step}
    if resumed is not None:
        start, (state, data_state) = resumed
        changed = [f"{k}: {data_state[k]} -> {v}" for k, v in order.items() if k in data_state and data_state[k] != v]
        if changed:
            raise UserError("the prompts changed since the checkpoint (" + "; ".join(changed) + "); use a new run.dir")
        start = int(data_state.get("next_step", start))
        writer.log(f"resumed from checkpoint at step {start}")
    else:
        # The policy starts as a copy of the reference (the train state's own arrays: it is donated).
        state = setup.init_state(jax.tree.map(lambda a: a.copy(), setup.ref_params))
        start = 0

    log = LogRL(cfg.train.log_every, cfg.train.steps, writer)

    def write_eval(record: dict) -> None:
        writer.write(record)
        writer.log(f"step {record['step']}: eval_reward {record['eval_reward']:.4f}")

    hooks: list[Hook] = [ProgressAdvance(writer), log]
    evals = None
    if cfg.rl.eval_prompts:
        evals = Evaluate(cfg.train.eval_every, cfg.train.steps, setup.evaluate, write_eval)
        hooks.append(evals)
    save = SaveCheckpoints(ckpt, cfg, lambda: order, writer.log)
    hooks.append(save)
    watchdog = StepTimeout(cfg.train.step_timeout_s)  # last: kicked once a step's hooks are done
    hooks.append(watchdog)
    # train.on_nonfinite=stop only: the RL step updates the policy over several minibatches in place.
    trainer = Trainer(setup.step, hooks, StopOnNonfinite(ckpt))
    try:
        state, _ = trainer.run(state, ((s, s) for s in range(start, cfg.train.steps)))
    finally:
        watchdog.close()  # first: a run that ended (finished, stopped or failed) is never killed later
        save.close()
        ckpt.close()
        writer.close()
    final = {**log.latest, **(evals.latest if evals else {})}
    if trainer.stopped_at is not None:
        final["stopped_at"] = trainer.stopped_at
    final["params"] = state["params"]
    return final
