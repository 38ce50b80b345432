"""What the train step does with the MoE layers' routing statistics: the balancing penalties
added to the loss, the logged metrics, and the aux-loss-free bias update.

Statistics (`models.moe.MoE`) come stacked over MoE layers: `aux_loss` [G], `z_loss` [G],
`load` [G, E] (share of assignments per expert), `dropped` [G] (share of assignments dropped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def moe_penalty(stats: dict, aux_coef: float, z_coef: float) -> jax.Array:
    """aux_coef * mean over layers of the balancing loss + z_coef * mean of the z-loss."""
    return aux_coef * stats["aux_loss"].mean() + z_coef * stats["z_loss"].mean()


def moe_metrics(stats: dict) -> dict[str, jax.Array]:
    """Logged per step: the two losses and the dropped share (means over MoE layers), the load
    per layer and expert, and `moe_load_max`: the busiest expert's load times E (1 = balanced)."""
    num_experts = stats["load"].shape[-1]
    return {"moe_aux_loss": stats["aux_loss"].mean(), "moe_z_loss": stats["z_loss"].mean(),
            "moe_dropped": stats["dropped"].mean(), "moe_load": stats["load"],
            "moe_load_max": stats["load"].max() * num_experts}


def update_balance_bias(params: dict, load_GE: jax.Array, rate: float) -> dict:
    """DeepSeek-V3's aux-loss-free balancing: raise the choice bias of experts below the mean
    load by `rate`, lower those above it (each MoE layer's `balance_bias` is [G, E])."""
    step_GE = rate * jnp.sign(1.0 / load_GE.shape[-1] - load_GE)

    def update(path, leaf):
        name = getattr(path[-1], "key", None)
        return leaf + step_GE.reshape(leaf.shape).astype(leaf.dtype) if name == "balance_bias" else leaf

    return jax.tree_util.tree_map_with_path(update, params)
