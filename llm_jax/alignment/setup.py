"""An RL run's pieces before its first step: the policy's model and optimiser on the mesh, the
prompts and reward, and the step function that the ordinary Trainer runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.alignment.prompts import PromptSet
from llm_jax.alignment.rollout import (
    completion_ids,
    left_pad,
    on_mesh,
    prompt_width,
    response_mask,
    rows_sharding,
    sample,
    step_prompts,
    to_host,
)
from llm_jax.alignment.steps import make_experience, make_update
from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.models.base import compute_dtype
from llm_jax.models.decoding import bounded_length
from llm_jax.models.definition import ModelDef, model_def
from llm_jax.train.optim import make_optimizer, make_schedule
from llm_jax.train.state import abstract_state, init_state, state_shardings


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch axes split a rollout batch."""
    spec = rows_sharding(mesh, 1).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


@dataclass
class RLSetup:
    cfg: Config
    mesh: Mesh
    mdef: ModelDef
    tx: optax.GradientTransformation
    shardings: dict
    prompts: PromptSet
    tokenizer: Any
    train_rows: list[list[int]]
    width: int
    experience: Callable
    update: Callable
    ref_params: Any = None  # the frozen reference policy (init_from's parameters), set by the runner

    @property
    def rollouts_per_step(self) -> int:
        return self.cfg.rl.prompts_per_step * self.cfg.rl.group_size

    def abstract_state(self) -> dict:
        state = abstract_state(self.mdef, self.tx, {k: v for k, v in self.shardings.items() if k != "kl_coef"})
        return {**state, "kl_coef": jax.ShapeDtypeStruct((), jnp.float32, sharding=self.shardings["kl_coef"])}

    def init_state(self, params: dict | None = None) -> dict:
        """A fresh train state (parameters `params` when given: the policy of init_from)."""
        base = {k: v for k, v in self.shardings.items() if k != "kl_coef"}
        if params is None:
            state = init_state(self.cfg, self.mdef, self.mesh, self.tx, base)
        else:  # (no second random initialisation of a model that is about to be replaced)
            state = {"params": params, "opt_state": jax.jit(self.tx.init, out_shardings=base["opt_state"])(params),
                     "step": jax.device_put(jnp.zeros((), jnp.int32), base["step"])}
        state["kl_coef"] = jax.device_put(jnp.float32(self.cfg.rl.kl_coef), self.shardings["kl_coef"])
        return state

    def _sample(self, params: dict, rows: list[list[int]], key: jax.Array, temperature: float,
                sharding_of: Callable[[int], NamedSharding]) -> tuple[np.ndarray, np.ndarray, jax.Array]:
        """(completions [B, N] and left-padded prompts [B, P] on the host, prompt lengths on the mesh)."""
        prompts_BP, lengths = left_pad(rows, self.width)
        lengths_B = on_mesh(lengths, sharding_of(1))
        resp_BN = sample(self.mdef, params, self.mesh, on_mesh(prompts_BP, sharding_of(2)), lengths_B, key,
                         temperature=temperature, max_new_tokens=self.cfg.rl.max_new_tokens,
                         eos_id=self.tokenizer.eos_id, vocab_limit=self.tokenizer.vocab_size,
                         cache_dtype=str(compute_dtype(self.cfg)))
        return to_host(resp_BN), prompts_BP, lengths_B

    def step(self, state: dict, step: int) -> tuple[dict, dict]:
        """One RL step: rollout -> host reward -> experience -> update."""
        cfg, rl = self.cfg, self.cfg.rl
        t0 = time.perf_counter()
        picked = step_prompts(len(self.train_rows), rl.prompts_per_step, rl.group_size, cfg.seed, step)
        rows = [self.train_rows[i] for i in picked]
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        resp, prompt_tokens, lengths_B = self._sample(state["params"], rows, key, rl.temperature,
                                                         lambda nd: rows_sharding(self.mesh, nd))
        t1 = time.perf_counter()
        texts = [self.tokenizer.decode(c) for c in completion_ids(resp, self.tokenizer.eos_id)]
        scores = np.asarray(self.prompts.reward_fn([self.prompts.train[i] for i in picked], texts), np.float32)
        if scores.shape != (len(rows),) or not np.isfinite(scores).all():
            raise UserError(f"rl.reward={rl.reward} gave scores of shape {scores.shape} (finite: "
                            f"{bool(np.isfinite(scores).all())}); want {len(rows)} finite numbers")
        t2 = time.perf_counter()
        tokens_BT = on_mesh(np.concatenate([prompt_tokens, resp], axis=1), rows_sharding(self.mesh, 2))
        batch = {"tokens_BT": tokens_BT, "lengths_B": lengths_B,
                 "mask_BN": response_mask(on_mesh(resp, rows_sharding(self.mesh, 2)), self.tokenizer.eos_id),
                 "scores_B": on_mesh(scores, rows_sharding(self.mesh, 1))}
        exp, exp_metrics = self.experience(state["params"], self.ref_params, state["kl_coef"], batch)
        state, metrics = self.update(state, exp, exp_metrics["kl"])
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        timing = {"gen_seconds": t1 - t0, "reward_seconds": t2 - t1, "update_seconds": t3 - t2}
        return state, {**metrics, **exp_metrics, **{k: jnp.float32(v) for k, v in timing.items()}}

    def evaluate(self, params: dict) -> dict:
        """Mean reward of greedy completions of the first rl.eval_prompts held-out prompts."""
        count = self.cfg.rl.eval_prompts
        prompts = self.prompts.held_out[:count]
        if not count or not prompts:
            return {}
        rows = [self.tokenizer.encode(p) for p in prompts]
        if prompt_width(rows) > self.width:
            rows = [r[-self.width:] for r in rows]  # (held-out prompts longer than any training prompt)
        replicated = NamedSharding(self.mesh, P())
        resp, _, _ = self._sample(params, rows, jax.random.key(0), 0.0, lambda nd: replicated)
        texts = [self.tokenizer.decode(c) for c in completion_ids(resp, self.tokenizer.eos_id)]
        return {"eval_reward": float(np.mean(self.prompts.reward_fn(prompts, texts)))}


def per_update(cfg: Config) -> Config:
    """`cfg` whose learning-rate schedule runs over optimiser updates: an RL step makes
    rl.epochs x rl.minibatches of them, so the decay spans train.steps x that many (unless
    optim.decay_steps is set), and optim.warmup_steps counts updates too."""
    updates = cfg.train.steps * cfg.rl.epochs * cfg.rl.minibatches
    optim = cfg.optim.model_copy(update={"decay_steps": cfg.optim.decay_steps or updates})
    return cfg.model_copy(update={"optim": optim})


def build_rl_setup(cfg: Config, mesh: Mesh, tokenizer: Any, prompts: PromptSet, vocab_size: int) -> RLSetup:
    rl = cfg.rl
    if cfg.model.spec.kind != "decoder":
        raise UserError(f"rl.method={rl.method} trains a decoder that generates; model.arch={cfg.model.arch} is "
                        f"{cfg.model.spec.kind}")
    if rl.method == "ppo" and not getattr(cfg.model, "score_head", False):
        raise UserError("rl.method=ppo needs a value head: set model.score_head=true")
    B = rl.prompts_per_step * rl.group_size
    ways = batch_devices(mesh)
    if (B // rl.minibatches) % ways:
        raise UserError(f"a minibatch of {B // rl.minibatches} completions (rl.prompts_per_step * rl.group_size / "
                        f"rl.minibatches) does not split over the mesh's {ways} batch shards")
    train_rows = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts.train]
    width = prompt_width(train_rows)
    limit = bounded_length(cfg)
    if limit is not None and width + rl.max_new_tokens > limit:
        raise UserError(f"prompts of up to {width} tokens (padded) + rl.max_new_tokens={rl.max_new_tokens} exceed "
                        f"the model's {limit} positions; raise model.max_seq_len or train.seq_len")
    mdef = model_def(cfg, vocab_size)
    tx = make_optimizer(per_update(cfg))
    schedule = make_schedule(per_update(cfg))
    shardings = {**state_shardings(mesh, tx, mdef), "kl_coef": NamedSharding(mesh, P())}
    return RLSetup(cfg=cfg, mesh=mesh, mdef=mdef, tx=tx, shardings=shardings, prompts=prompts, tokenizer=tokenizer,
                   train_rows=train_rows, width=width,
                   experience=make_experience(cfg, mdef, mesh, width, tokenizer.vocab_size),
                   update=make_update(cfg, mdef, tx, schedule, mesh, shardings, width, tokenizer.vocab_size))
