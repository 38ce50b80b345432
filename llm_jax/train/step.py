"""The jitted, sharded, donated train step and the eval step (causal LM objective)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm_jax.config import Config
from llm_jax.parallel.rules import activation_mesh, logical_to_spec
from llm_jax.train.optim import clip_by_norm
from llm_jax.train.state import ModelDef


def causal_lm_loss(mdef: ModelDef, params: dict, tokens_BT1: jax.Array,
                   dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross entropy (float32) over a [B, T+1] window batch, and the token count."""
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    logits_BTV, _ = mdef.merge(params)(inputs_BT, dropout_key=dropout_key)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    return losses_BT.sum(), jnp.asarray(targets_BT.size, jnp.float32)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Global [B, T+1] token batches: rows split over every batch-parallel mesh axis."""
    return NamedSharding(mesh, logical_to_spec(("batch", None)))


def make_train_step(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, shardings: dict) -> Callable:
    """step(state, batch) -> (state, metrics); the state is donated and updated in place."""
    accum = cfg.train.grad_accum
    use_dropout = cfg.model.dropout > 0
    base_key = jax.random.key(cfg.seed)
    micro_sharding = NamedSharding(mesh, logical_to_spec((None, "batch", None)))

    def grads_of(params, tokens, key):
        def loss_fn(p):
            total, count = causal_lm_loss(mdef, p, tokens, key)
            return total / count, total

        (_, total), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, grads

    def step(state: dict, batch_BT1: jax.Array) -> tuple[dict, dict]:
        with activation_mesh(mesh):
            # Dropout masks depend only on (seed, step): resumed runs draw the same ones.
            key = jax.random.fold_in(base_key, state["step"]) if use_dropout else None
            params = state["params"]
            if accum == 1:
                loss_sum, grads = grads_of(params, batch_BT1, key)
            else:
                micro = batch_BT1.reshape(accum, -1, batch_BT1.shape[-1])
                micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
                zeros = jax.tree.map(jnp.zeros_like, params)

                def body(carry, xs):
                    loss_acc, grad_acc = carry
                    tokens, i = xs
                    k = jax.random.fold_in(key, i) if key is not None else None
                    loss_sum, grads = grads_of(params, tokens, k)
                    return (loss_acc + loss_sum, jax.tree.map(jnp.add, grad_acc, grads)), None

                (loss_sum, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                                    (micro, jnp.arange(accum)))
                grads = jax.tree.map(lambda g: g / accum, grads)
            loss = loss_sum / (batch_BT1.shape[0] * (batch_BT1.shape[1] - 1))
            grad_norm = optax.tree.norm(grads)  # before clipping, as logged by nanoGPT and Levanter
            grads = clip_by_norm(grads, grad_norm, cfg.optim.clip_norm)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            params = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"])}
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_eval_step(mdef: ModelDef, mesh: Mesh, param_shardings: dict) -> Callable:
    """eval(params, batch) -> (summed loss, token count), both float32 scalars."""

    def evaluate(params: dict, batch_BT1: jax.Array):
        with activation_mesh(mesh):
            return causal_lm_loss(mdef, params, batch_BT1, None)

    replicated = NamedSharding(mesh, P())
    return jax.jit(evaluate, in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=(replicated, replicated))
