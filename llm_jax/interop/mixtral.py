"""MixtralForCausalLM <-> a Llama decoder (see `llama`) whose MLPs are MoE layers.

On disk (transformers 4 and 5 alike) layer i holds `block_sparse_moe.gate.weight` [E, D] (the
router) and, per expert j, `block_sparse_moe.experts.{j}.w1` (gate, SiLU), `w3` (up), both
[F, D], and `w2` (down) [D, F]. Routing: softmax over all experts, top-k, renormalised; no
capacity limit. Our MoE layer holds `router` [D, E] and the experts stacked: `gate`, `up`
[E, D, F] and `down` [E, F, D]. Attention, norms and embeddings are Llama's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.interop.base import Adapter, needs, register, wrong_arch
from llm_jax.interop.llama import (
    llama_hf_config,
    llama_model_config,
    llama_params_from_hf,
    llama_params_to_hf,
    llama_unsupported,
)
from llm_jax.interop.tree import kernel_from_linear, linear_from_kernel

# Our expert weight -> Mixtral's per-expert Linear.
_EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


def _moe_in(t: dict[str, np.ndarray], h: str, cfg: Config) -> dict[str, Any]:
    h += "block_sparse_moe."
    experts = {ours: np.stack([kernel_from_linear(t[h + f"experts.{j}.{theirs}.weight"])
                               for j in range(cfg.model.moe.num_experts)])
               for ours, theirs in _EXPERT_NAMES.items()}
    return {"moe": {"router": kernel_from_linear(t[h + "gate.weight"]), "experts": experts}}


def _moe_out(layer: dict[str, Any], h: str, cfg: Config) -> dict[str, np.ndarray]:
    h += "block_sparse_moe."
    moe = layer["moe"]
    t = {h + "gate.weight": linear_from_kernel(moe["router"])}
    for ours, theirs in _EXPERT_NAMES.items():
        for j, kernel in enumerate(np.asarray(moe["experts"][ours])):
            t[h + f"experts.{j}.{theirs}.weight"] = linear_from_kernel(kernel)
    return t


class Mixtral(Adapter):
    name = "mixtral"
    model_type = "mixtral"
    hf_class = "MixtralForCausalLM"
    arch = "gpt"

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("sliding_window"):
            raise UserError(f"Mixtral with sliding-window attention (sliding_window={hf['sliding_window']}) is not "
                            "supported; set it to null")
        top_k = hf.get("num_experts_per_tok", 2)
        return {**llama_model_config(hf), "moe": {
            "num_experts": hf["num_local_experts"], "top_k": top_k, "every": 1, "capacity_factor": -1,
            "routing": "softmax_topk", "renormalize": True, "router_jitter": hf.get("router_jitter_noise", 0.0),
            # transformers' balancing loss sums the per-choice loads (k when balanced); ours is 1 when
            # balanced, so the same penalty needs k times the coefficient.
            "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001) * top_k, "z_loss_coef": 0.0}}

    def unsupported(self, cfg: Config) -> str | None:
        """A Llama decoder with MoE in every block, softmax-top-k-renormalised routing, no shared
        experts and no choice bias."""
        if wrong := wrong_arch(self, cfg):
            return wrong
        moe = cfg.model.moe
        if not moe.enabled:
            return f"{self.hf_class} needs MoE layers (model.moe.num_experts > 0)"
        if decoder := llama_unsupported(self.hf_class, cfg):
            return decoder
        renormalised = moe.routing == "topk_softmax" or moe.renormalize
        return needs(self.hf_class, {"model.moe.every": (moe.every, 1),
                                     "model.moe.num_shared_experts": (moe.num_shared_experts, 0),
                                     "model.moe.bias_update_rate": (moe.bias_update_rate, 0),
                                     "model.moe.renormalize": (renormalised, True)})

    def hf_config(self, cfg: Config, eos_id: int | None, pad_id: int) -> dict[str, Any]:
        moe = cfg.model.moe
        return {**llama_hf_config(cfg, eos_id), "architectures": [self.hf_class], "model_type": self.model_type,
                "intermediate_size": cfg.model.expert_ff_dim, "num_local_experts": moe.num_experts,
                "num_experts_per_tok": moe.top_k, "router_jitter_noise": moe.router_jitter,
                "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k, "sliding_window": None,
                "output_router_logits": False}

    def params_from_hf(self, tensors: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
        return llama_params_from_hf(tensors, cfg, _moe_in)

    def params_to_hf(self, params: dict[str, Any], cfg: Config) -> dict[str, np.ndarray]:
        return llama_params_to_hf(params, cfg, _moe_out)


register(Mixtral())
