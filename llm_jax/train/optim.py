"""AdamW with warmup + cosine/linear/constant schedule and masked weight decay; global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llm_jax.config import Config


def make_schedule(cfg: Config) -> optax.Schedule:
    o = cfg.optim
    decay_steps = o.decay_steps or cfg.train.steps
    warmup = min(o.warmup_steps, decay_steps)
    ramp = optax.linear_schedule(0.0, o.lr, warmup) if warmup else None
    rest = max(decay_steps - warmup, 1)
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr / o.lr)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(o.lr, o.min_lr, rest)
    else:
        decay = optax.constant_schedule(o.lr)
    if ramp is None:
        return decay
    return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(params: dict, decay_embeddings: bool) -> dict:
    """Decay matrices (`kernel`); embeddings only when asked; never norms or biases."""

    def decide(path, _leaf) -> bool:
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        return name == "kernel" or (decay_embeddings and name == "embedding")

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW. Gradient clipping happens in the train step (`clip_by_norm`), which computes the
    global norm once for both the clip and the logged `grad_norm`."""
    o = cfg.optim
    return optax.adamw(make_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=lambda p: decay_mask(p, o.decay_embeddings))


def clip_by_norm(grads, norm: jax.Array, max_norm: float):
    """Scale `grads` (whose global norm is `norm`) down to `max_norm` if above it; 0 = off."""
    if max_norm <= 0:
        return grads
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
