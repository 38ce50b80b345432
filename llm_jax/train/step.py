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
from llm_jax.train.objectives import EVAL_STEP, Objective
from llm_jax.train.optim import clip_by_norm


def token_loss(mdef: ModelDef, params: dict, data: tuple, dropout_key: jax.Array | None,
               smoothing: float = 0.0, smoothing_ids: int = 0) -> tuple[jax.Array, jax.Array]:
    """Cross entropy (float32) summed over the positions the weights select (None: all), and their count.

    `data` is an objective's (model inputs, targets, weights). With `smoothing` > 0 each target
    keeps 1 - smoothing of its probability and the rest is spread evenly over ids
    [0, smoothing_ids) (Szegedy et al. 2016): the loss adds smoothing * mean(-log p) over them.
    """
    inputs, targets_BT, weights_BT = data
    logits_BTV, _ = forward(mdef, params, inputs, dropout_key)
    return summed_loss(logits_BTV, targets_BT, weights_BT, smoothing, smoothing_ids)


def forward(mdef: ModelDef, params: dict, inputs: dict, dropout_key: jax.Array | None,
            with_moe_stats: bool = False) -> tuple[jax.Array, dict | None]:
    """Logits of the model on an objective's inputs, and its MoE routing statistics (or None)."""
    model = mdef.merge(params)
    if with_moe_stats:
        logits_BTV, _, moe_stats = model(**inputs, dropout_key=dropout_key, with_moe_stats=True)
        return logits_BTV, moe_stats
    return model(**inputs, dropout_key=dropout_key)[0], None


def summed_loss(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array | None,
                smoothing: float = 0.0, smoothing_ids: int = 0) -> tuple[jax.Array, jax.Array]:
    """`token_loss` on given logits."""
    if smoothing > 0:
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
        losses_BT = (1 - smoothing) * nll_BT - smoothing * logp_BTV[..., :smoothing_ids].mean(-1)
    else:
        losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    if weights_BT is None:
        return losses_BT.sum(), jnp.asarray(targets_BT.size, jnp.float32)
    return (losses_BT * weights_BT).sum(), weights_BT.sum()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Global [B, T+1] token batches: rows split over every batch-parallel mesh axis."""
    return NamedSharding(mesh, logical_to_spec(("batch", None)))


def make_train_step(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, shardings: dict,
                    objective: Objective) -> Callable:
    """step(state, batch) -> (state, metrics); the state is donated and updated in place.

    `objective` (`objectives.build_objective`) turns the batch into model inputs and targets;
    its random draws (masks, spans) depend on (seed, step) only.
    """
    accum = cfg.train.grad_accum
    moe = cfg.model.moe
    # A key per step when anything random happens in the forward pass (dropout, router jitter).
    use_key = cfg.model.dropout > 0 or (moe.enabled and moe.router_jitter > 0)
    base_key = jax.random.key(cfg.seed)
    micro_sharding = NamedSharding(mesh, logical_to_spec((None, "batch", None)))

    def grads_of(params, data, key, denom, penalty_div):
        def loss_fn(p):
            logits_BTV, moe_stats = forward(mdef, p, data[0], key, moe.enabled)
            total, count = summed_loss(logits_BTV, data[1], data[2], objective.smoothing, objective.smoothing_ids)
            loss = total / (count if denom is None else denom)
            if moe_stats is not None:
                loss = loss + moe_penalty(moe_stats, moe.aux_loss_coef, moe.z_loss_coef) / penalty_div
            return loss, (total, moe_stats)

        (_, (total, moe_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, grads, moe_stats

    def step(state: dict, batch: jax.Array) -> tuple[dict, dict]:
        with activation_mesh(mesh):
            # Dropout masks depend only on (seed, step): resumed runs draw the same ones.
            key = jax.random.fold_in(base_key, state["step"]) if use_key else None
            params = state["params"]
            # Draws (masks, spans) are made for the whole global batch before any microbatch
            # split, so gradient accumulation and every mesh see the same ones.
            data = objective.data(batch, state["step"])
            if data[2] is not None:
                # Microbatches hold different numbers of scored positions: each one's summed
                # loss is divided by the global count, and their gradients are summed.
                count = jnp.maximum(data[2].sum(), 1.0)
                denom, grad_div = count, 1
            else:
                count = jnp.asarray(data[1].size, jnp.float32)
                denom, grad_div = None, accum  # equal micro counts: the mean of means
            # The MoE penalties are means over microbatches whichever way the CE is combined.
            penalty_div = accum // grad_div
            if accum == 1:
                loss_sum, grads, moe_stats = grads_of(params, data, key, denom, penalty_div)
            else:
                micro = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
                    a.reshape(accum, -1, a.shape[-1]), micro_sharding), data)
                zeros = jax.tree.map(jnp.zeros_like, params)

                def body(carry, xs):
                    loss_acc, grad_acc = carry
                    micro_data, i = xs
                    k = jax.random.fold_in(key, i) if key is not None else None
                    loss_sum, grads, stats = grads_of(params, micro_data, k, denom, penalty_div)
                    return (loss_acc + loss_sum, jax.tree.map(jnp.add, grad_acc, grads)), stats

                (loss_sum, grads), micro_stats = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                                              (micro, jnp.arange(accum)))
                moe_stats = jax.tree.map(lambda a: a.mean(0), micro_stats)
                if grad_div != 1:
                    grads = jax.tree.map(lambda g: g / grad_div, grads)
            loss = loss_sum / count
            grad_norm = optax.tree.norm(grads)  # before clipping, as logged by nanoGPT and Levanter
            grads = clip_by_norm(grads, grad_norm, cfg.optim.clip_norm)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            params = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"])}
            if moe_stats is not None:
                metrics.update(moe_metrics(moe_stats))
                if moe.bias_update_rate > 0:
                    params = update_balance_bias(params, moe_stats["load"], moe.bias_update_rate)
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_eval_step(mdef: ModelDef, mesh: Mesh, param_shardings: dict, objective: Objective) -> Callable:
    """eval(params, batch) -> (summed loss, count of scored targets, count of those the argmax
    gets right), float32 scalars.

    Plain cross entropy (no label smoothing). Objectives with random draws (mlm, span) use those
    of one fixed step (`objectives.EVAL_STEP`), the same at every evaluation.
    """

    def evaluate(params: dict, batch: jax.Array):
        with activation_mesh(mesh):
            inputs, targets_BT, weights_BT = objective.data(batch, EVAL_STEP)
            logits_BTV, _ = mdef.merge(params)(**inputs)
            total, count = summed_loss(logits_BTV, targets_BT, weights_BT)
            hits_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
            hits = hits_BT.sum() if weights_BT is None else (hits_BT * weights_BT).sum()
            return total, count, hits

    replicated = NamedSharding(mesh, P())
    return jax.jit(evaluate, in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=(replicated, replicated, replicated))
