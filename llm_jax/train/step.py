"""The jitted, sharded, donated train step and the eval step (causal LM or masked LM objective)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm_jax.config import Config
from llm_jax.parallel.rules import activation_mesh, logical_to_spec
from llm_jax.train.objectives import EVAL_STEP, MLMSpec, causal_targets, mlm_key, mlm_targets
from llm_jax.train.optim import clip_by_norm
from llm_jax.train.state import ModelDef


def token_loss(mdef: ModelDef, params: dict, inputs_BT: jax.Array, targets_BT: jax.Array,
               weights_BT: jax.Array | None, dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Cross entropy (float32) summed over the positions `weights_BT` selects (None: all), and their count."""
    logits_BTV, _ = mdef.merge(params)(inputs_BT, dropout_key=dropout_key)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    if weights_BT is None:
        return losses_BT.sum(), jnp.asarray(targets_BT.size, jnp.float32)
    return (losses_BT * weights_BT).sum(), weights_BT.sum()


def causal_lm_loss(mdef: ModelDef, params: dict, tokens_BT1: jax.Array,
                   dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy (float32) over a [B, T+1] window batch, and the token count."""
    return token_loss(mdef, params, *causal_targets(tokens_BT1), dropout_key)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Global [B, T+1] token batches: rows split over every batch-parallel mesh axis."""
    return NamedSharding(mesh, logical_to_spec(("batch", None)))


def make_train_step(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, shardings: dict,
                    mlm: MLMSpec | None = None) -> Callable:
    """step(state, batch) -> (state, metrics); the state is donated and updated in place.

    The objective follows `model.arch` (`cfg.model.objective`): next-token prediction, or masked
    LM (which needs `mlm`, the mask id and replacement range) with masks drawn from (seed, step).
    """
    accum = cfg.train.grad_accum
    use_dropout = cfg.model.dropout > 0
    masked = cfg.model.objective == "mlm"
    if masked and mlm is None:
        raise ValueError("the masked-LM objective needs an MLMSpec (objectives.mlm_spec)")
    base_key = jax.random.key(cfg.seed)
    micro_sharding = NamedSharding(mesh, logical_to_spec((None, "batch", None)))

    def grads_of(params, data, key, denom):
        def loss_fn(p):
            total, count = token_loss(mdef, p, *data, key)
            return total / (count if denom is None else denom), total

        (_, total), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, grads

    def step(state: dict, batch_BT1: jax.Array) -> tuple[dict, dict]:
        with activation_mesh(mesh):
            # Dropout masks depend only on (seed, step): resumed runs draw the same ones.
            key = jax.random.fold_in(base_key, state["step"]) if use_dropout else None
            params = state["params"]
            if masked:
                # Masks are drawn for the whole global batch before any microbatch split, so
                # gradient accumulation and every mesh see the same masked positions.
                data = mlm_targets(batch_BT1, mlm_key(cfg.seed, state["step"]), mlm)
                # Microbatches hold different numbers of masked positions: each one's summed
                # loss is divided by the global count, and their gradients are summed.
                count = jnp.maximum(data[2].sum(), 1.0)
                denom, grad_div = count, 1
            else:
                data = causal_targets(batch_BT1)
                count = jnp.asarray(data[1].size, jnp.float32)
                denom, grad_div = None, accum  # equal micro counts: the mean of means
            if accum == 1:
                loss_sum, grads = grads_of(params, data, key, denom)
            else:
                micro = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
                    a.reshape(accum, -1, a.shape[-1]), micro_sharding), data)
                zeros = jax.tree.map(jnp.zeros_like, params)

                def body(carry, xs):
                    loss_acc, grad_acc = carry
                    micro_data, i = xs
                    k = jax.random.fold_in(key, i) if key is not None else None
                    loss_sum, grads = grads_of(params, micro_data, k, denom)
                    return (loss_acc + loss_sum, jax.tree.map(jnp.add, grad_acc, grads)), None

                (loss_sum, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                                    (micro, jnp.arange(accum)))
                if grad_div != 1:
                    grads = jax.tree.map(lambda g: g / grad_div, grads)
            loss = loss_sum / count
            grad_norm = optax.tree.norm(grads)  # before clipping, as logged by nanoGPT and Levanter
            grads = clip_by_norm(grads, grad_norm, cfg.optim.clip_norm)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            params = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"])}
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_eval_step(mdef: ModelDef, mesh: Mesh, param_shardings: dict, *, cfg: Config | None = None,
                   mlm: MLMSpec | None = None) -> Callable:
    """eval(params, batch) -> (summed loss, count of scored tokens), both float32 scalars.

    Masked LM (`cfg.model.objective == "mlm"`) scores the positions of one fixed key's masks
    (`objectives.EVAL_STEP`), the same at every evaluation.
    """
    masked = cfg is not None and cfg.model.objective == "mlm"
    if masked and mlm is None:
        raise ValueError("the masked-LM objective needs an MLMSpec (objectives.mlm_spec)")

    def evaluate(params: dict, batch_BT1: jax.Array):
        with activation_mesh(mesh):
            if masked:
                data = mlm_targets(batch_BT1, mlm_key(cfg.seed, EVAL_STEP), mlm)
                return token_loss(mdef, params, *data, None)
            return causal_lm_loss(mdef, params, batch_BT1, None)

    replicated = NamedSharding(mesh, P())
    return jax.jit(evaluate, in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=(replicated, replicated))
