"""Hugging Face MixtralForCausalLM <-> llm-jax: a Llama decoder whose MLPs are MoE layers.

On disk (transformers 4 and 5 alike) layer i holds `block_sparse_moe.gate.weight` [E, D] (the
router) and, per expert j, `block_sparse_moe.experts.{j}.w1` (gate, SiLU), `w3` (up), both
[F, D], and `w2` (down) [D, F]. Routing: softmax over all experts, top-k, renormalised; no
capacity limit. Our MoE layer holds `router` [D, E] and the experts stacked: `gate`, `up`
[E, D, F] and `down` [E, F, D]. Attention and norms are Llama's (`hf_weights._llama_*`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError

_PREFIX = "model.layers.{i}.block_sparse_moe."
# Our expert weight -> Mixtral's per-expert Linear.
_EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


def mixtral_model_config(hf: dict, llama_model: dict) -> dict[str, Any]:
    """The `model` section: Llama's, plus the MoE keys."""
    if hf.get("sliding_window"):
        raise UserError(f"Mixtral with sliding-window attention (sliding_window={hf['sliding_window']}) is not "
                        "supported; set it to null")
    top_k = hf.get("num_experts_per_tok", 2)
    return {**llama_model, "moe": {
        "num_experts": hf["num_local_experts"], "top_k": top_k, "every": 1, "capacity_factor": -1,
        "routing": "softmax_topk", "renormalize": True, "router_jitter": hf.get("router_jitter_noise", 0.0),
        # transformers' balancing loss sums the per-choice loads (k when balanced); ours is 1 when
        # balanced, so the same penalty needs k times the coefficient.
        "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001) * top_k, "z_loss_coef": 0.0}}


def mixtral_supported(cfg: Config) -> bool:
    """Whether MixtralForCausalLM computes the same network (a Llama decoder with MoE in every
    block, softmax-top-k-renormalised routing, no shared experts, no choice bias)."""
    moe = cfg.model.moe
    renormalised = moe.routing == "topk_softmax" or moe.renormalize
    return (moe.every == 1 and moe.num_shared_experts == 0 and moe.bias_update_rate == 0 and renormalised
            and cfg.model.mlp == "swiglu")


def mixtral_moe_in(t: dict, i: int, num_experts: int) -> dict:
    """Layer i's MoE parameters from Mixtral tensors."""
    h = _PREFIX.format(i=i)
    experts = {ours: np.stack([t[h + f"experts.{j}.{theirs}.weight"].T for j in range(num_experts)])
               for ours, theirs in _EXPERT_NAMES.items()}
    return {"router": t[h + "gate.weight"].T, "experts": experts}


def mixtral_moe_out(moe: dict, i: int) -> dict[str, np.ndarray]:
    """Layer i's Mixtral tensors from our MoE parameters."""
    h = _PREFIX.format(i=i)
    t = {h + "gate.weight": np.asarray(moe["router"]).T}
    for ours, theirs in _EXPERT_NAMES.items():
        for j, w in enumerate(np.asarray(moe["experts"][ours])):
            t[h + f"experts.{j}.{theirs}.weight"] = w.T
    return t


def mixtral_hf_config(cfg: Config, llama: dict) -> dict[str, Any]:
    moe = cfg.model.moe
    return {**llama, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "intermediate_size": cfg.model.expert_ff_dim, "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "router_jitter_noise": moe.router_jitter,
            "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k, "sliding_window": None,
            "output_router_logits": False}
