"""The jitted, sharded, donated train step and the eval step, for any objective (`objectives`)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import Config
from llm_jax.models.definition import ModelDef
from llm_jax.parallel.rules import activation_mesh, logical_to_spec
from llm_jax.train.moe_losses import moe_metrics, moe_penalty, update_balance_bias
from llm_jax.train.nonfinite import guarded_update, nonfinite_flag
from llm_jax.train.objectives import EVAL_STEP, Objective
from llm_jax.train.objectives.base import Data
from llm_jax.train.optim import clip_by_norm


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Global [B, T+1] token batches: rows split over every batch-parallel mesh axis."""
    return NamedSharding(mesh, logical_to_spec(("batch", None)))


def with_reference(mdef: ModelDef, objective: Objective, ref_params: dict | None, data: Data) -> Data:
    """`data` with the frozen reference model's contribution folded into its targets
    (`Objective.add_reference`): one forward pass without dropout or gradient; unchanged when
    the objective has no reference."""
    if ref_params is None:
        return data
    inputs, targets, weights = data
    ref_out = mdef.merge(ref_params)(**inputs)
    return inputs, jax.lax.stop_gradient(objective.add_reference(ref_out, targets, weights)), weights


class ReferenceStep:
    """The train step of an objective with a reference model: the jitted step takes the reference
    parameters as an argument it does not donate (they never change), so the arrays of
    state["ref_params"] stay valid for evaluation and checkpoints, and one copy lives on the mesh.
    Called, lowered and compiled like the jitted step of the other objectives, with the state
    whole; other attributes (as_text, cost_analysis) are the wrapped function's."""

    def __init__(self, fn: Callable):
        self.fn = fn  # fn(state without ref_params, batch, ref_params): jitted or compiled

    @staticmethod
    def _split(state: dict) -> tuple[dict, dict]:
        return {k: v for k, v in state.items() if k != "ref_params"}, state["ref_params"]

    def __call__(self, state: dict, batch: jax.Array) -> tuple[dict, dict]:
        trained, ref = self._split(state)
        trained, metrics = self.fn(trained, batch, ref)
        return {**trained, "ref_params": ref}, metrics

    def lower(self, state: dict, batch: jax.Array) -> ReferenceStep:
        trained, ref = self._split(state)
        return ReferenceStep(self.fn.lower(trained, batch, ref))

    def compile(self) -> ReferenceStep:
        return ReferenceStep(self.fn.compile())

    def __getattr__(self, name: str):
        return getattr(self.fn, name)


def make_train_step(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, shardings: dict,
                    objective: Objective) -> Callable:
    """step(state, batch) -> (state, metrics); the state is donated and updated in place.

    `objective` (`objectives.build_objective`) turns the batch into model inputs and targets;
    its random draws (masks, spans) depend on (seed, step) only. An objective that
    `needs_reference` gets the reference model's output on each (micro)batch from the same jitted
    step; its `metrics` are reported per scored target beside the loss. `nonfinite` (1.0 or 0.0)
    flags a NaN or infinite loss or gradient norm; with train.on_nonfinite=skip such a step
    leaves the parameters and optimizer state as they were (`nonfinite.guarded_update`).
    """
    accum = cfg.train.grad_accum
    moe = cfg.model.moe
    # A key per step when anything random happens in the forward pass (dropout, router jitter).
    use_key = cfg.model.dropout > 0 or (moe.enabled and moe.router_jitter > 0)
    base_key = jax.random.key(cfg.seed)
    # Under `stop` and `rollback` the state after a bad step is never saved nor kept (the run
    # ends or restores a checkpoint), so only `skip` pays for keeping the old state.
    skip_nonfinite = cfg.train.on_nonfinite == "skip"

    def grads_of(params, ref_params, data, key, count, penalty_div):
        inputs, targets, weights = with_reference(mdef, objective, ref_params, data)

        def loss_fn(p):
            out = mdef.merge(p)(**inputs, dropout_key=key)
            total, _ = objective.loss(out, targets, weights, train=True)
            loss = total / count
            moe_stats = out.aux.get("moe")
            if moe_stats is not None:
                loss = loss + moe_penalty(moe_stats, moe.aux_loss_coef, moe.z_loss_coef) / penalty_div
            return loss, (total, moe_stats, objective.metrics(out, targets, weights))

        (_, (total, moe_stats, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, grads, moe_stats, sums

    def step(state: dict, batch: jax.Array, ref_params: dict | None = None) -> tuple[dict, dict]:
        with activation_mesh(mesh):
            # Dropout masks depend only on (seed, step): resumed runs draw the same ones.
            key = jax.random.fold_in(base_key, state["step"]) if use_key else None
            params = state["params"]
            # Draws (masks, spans) are made for the whole global batch before any microbatch
            # split, so gradient accumulation and every mesh see the same ones.
            data = objective.data(batch, state["step"])
            # Microbatches may hold different numbers of scored targets: each one's summed loss
            # is divided by the global count, and their gradients are summed.
            count = jnp.maximum(objective.count(data[1], data[2]), 1.0)
            if accum == 1:
                loss_sum, grads, moe_stats, sums = grads_of(params, ref_params, data, key, count, 1)
            else:
                micro = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
                    a.reshape(accum, a.shape[0] // accum, *a.shape[1:]),
                    NamedSharding(mesh, logical_to_spec((None, "batch") + (None,) * (a.ndim - 1)))), data)
                zeros = jax.tree.map(jnp.zeros_like, params)

                def body(carry, xs):
                    loss_acc, grad_acc = carry
                    micro_data, i = xs
                    k = jax.random.fold_in(key, i) if key is not None else None
                    # The MoE penalties are means over microbatches.
                    loss_sum, grads, stats, sums = grads_of(params, ref_params, micro_data, k, count, accum)
                    return (loss_acc + loss_sum, jax.tree.map(jnp.add, grad_acc, grads)), (stats, sums)

                (loss_sum, grads), (micro_stats, micro_sums) = jax.lax.scan(
                    body, (jnp.zeros((), jnp.float32), zeros), (micro, jnp.arange(accum)))
                moe_stats = jax.tree.map(lambda a: a.mean(0), micro_stats)
                sums = jax.tree.map(lambda a: a.sum(0), micro_sums)
            loss = loss_sum / count
            grad_norm = optax.tree.norm(grads)  # before clipping, as logged by nanoGPT and Levanter
            grads = clip_by_norm(grads, grad_norm, cfg.optim.clip_norm)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            params = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                       "nonfinite": nonfinite_flag(loss, grad_norm),
                       **{name: total / count for name, total in sums.items()}}
            if moe_stats is not None:
                metrics.update(moe_metrics(moe_stats))
                if moe.bias_update_rate > 0:
                    params = update_balance_bias(params, moe_stats["load"], moe.bias_update_rate)
            if skip_nonfinite:
                # The whole update (balance bias included) is dropped; the step count still advances.
                params, opt_state = guarded_update(metrics["nonfinite"], (params, opt_state),
                                                   (state["params"], state["opt_state"]))
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    replicated = NamedSharding(mesh, P())
    if not objective.needs_reference:
        return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                       out_shardings=(shardings, replicated), donate_argnums=(0,))
    trained = {k: v for k, v in shardings.items() if k != "ref_params"}
    return ReferenceStep(jax.jit(step, in_shardings=(trained, batch_sharding(mesh), shardings["ref_params"]),
                                 out_shardings=(trained, replicated), donate_argnums=(0,)))


def make_eval_step(mdef: ModelDef, mesh: Mesh, param_shardings: dict, objective: Objective) -> Callable:
    """eval(params, batch) -> (summed loss, count of scored targets, count of those the argmax
    gets right), float32 scalars; an objective that `needs_reference` takes the reference
    parameters too: eval(params, batch, ref_params).

    Plain cross entropy (no label smoothing). Objectives with random draws (mlm, span) use those
    of one fixed step (`objectives.EVAL_STEP`), the same at every evaluation.
    """

    def evaluate(params: dict, batch: jax.Array, ref_params: dict | None = None):
        with activation_mesh(mesh):
            data = objective.data(batch, EVAL_STEP)
            inputs, targets, weights = with_reference(mdef, objective, ref_params, data)
            out = mdef.merge(params)(**inputs)
            total, count = objective.loss(out, targets, weights, train=False)
            return total, count, objective.hits(out, targets, weights)

    replicated = NamedSharding(mesh, P())
    in_shardings = (param_shardings, batch_sharding(mesh))
    if objective.needs_reference:
        in_shardings += (param_shardings,)
    return jax.jit(evaluate, in_shardings=in_shardings, out_shardings=(replicated, replicated, replicated))
