"""MambaForCausalLM <-> `model.arch=mamba` (a pure, selective Mamba stack).

Layer i: `backbone.layers.{i}.norm.weight` (RMSNorm) and `mixer.`: `in_proj.weight` [2E, D] (x
then z), `conv1d.weight` [E, 1, K] and `conv1d.bias`, `x_proj.weight` [R + 2N, E] (dt, B, C),
`dt_proj.weight` [E, R] and `dt_proj.bias`, `A_log` [E, N], `D` [E], `out_proj.weight` [D, E].
Embeddings `backbone.embeddings.weight`, tied to the output; final `backbone.norm_f.weight`.
Ours: the stacked pattern group `blocks.l0` with `norm` and `mixer` (kernels [in, out]).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.interop.base import Adapter, needs, register, wrong_arch
from llm_jax.interop.tree import kernel_from_linear, linear_from_kernel, stack_layers, unstack_layers

_LAYER = "backbone.layers.{i}."


class Mamba(Adapter):
    name = "mamba"
    model_type = "mamba"
    hf_class = "MambaForCausalLM"
    arch = "mamba"

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("use_bias"):
            raise UserError("Mamba with biases in in_proj/out_proj (use_bias=true) is not supported")
        if not hf.get("use_conv_bias", True):
            raise UserError("Mamba without a conv bias (use_conv_bias=false) is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"Mamba activation {hf['hidden_act']!r} is not supported (silu is)")
        if not hf.get("tie_word_embeddings", True):
            raise UserError("Mamba with an untied output layer is not supported")
        d_model = hf["hidden_size"]
        expand = hf.get("expand", 2)
        if hf.get("intermediate_size", expand * d_model) != expand * d_model:
            raise UserError("Mamba with intermediate_size != expand * hidden_size is not supported")
        rank = hf.get("time_step_rank", "auto")
        return {"arch": "mamba", "num_layers": hf["num_hidden_layers"], "d_model": d_model,
                "norm": "rmsnorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "use_bias": False,
                "tie_embeddings": True, "max_seq_len": 2048,
                "ssm": {"d_state": hf.get("state_size", 16), "d_conv": hf.get("conv_kernel", 4), "expand": expand,
                        "dt_rank": None if rank == "auto" else int(rank)}}

    def unsupported(self, cfg: Config) -> str | None:
        m = cfg.model
        if wrong := wrong_arch(self, cfg):
            return wrong
        return needs(f"{self.hf_class} (a pure, selective Mamba stack)", {
            "model.layer_pattern": (m.pattern, ["mamba"]), "model.ssm.selective": (m.ssm.selective, True),
            "model.norm": (m.norm, "rmsnorm"), "model.tie_embeddings": (m.tie_embeddings, True)})

    def hf_config(self, cfg: Config, eos_id: int | None, pad_id: int) -> dict[str, Any]:
        m = cfg.model
        return {"architectures": [self.hf_class], "model_type": self.model_type, "vocab_size": m.vocab_size,
                "hidden_size": m.d_model, "state_size": m.ssm.d_state, "num_hidden_layers": m.num_layers,
                "expand": m.ssm.expand, "intermediate_size": m.d_inner, "conv_kernel": m.ssm.d_conv,
                "time_step_rank": m.dt_rank, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
                "layer_norm_epsilon": m.norm_eps, "residual_in_fp32": True, "tie_word_embeddings": True,
                "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}

    def params_from_hf(self, tensors: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
        t, m = tensors, cfg.model
        layers = []
        for i in range(m.num_layers):
            h = _LAYER.format(i=i) + "mixer."
            mixer = {"in_proj": {"kernel": kernel_from_linear(t[h + "in_proj.weight"], out_shape=(2, m.d_inner))},
                     "conv_w": t[h + "conv1d.weight"][:, 0, :], "conv_b": t[h + "conv1d.bias"],
                     "x_proj": {"kernel": kernel_from_linear(t[h + "x_proj.weight"])},
                     "dt_proj": kernel_from_linear(t[h + "dt_proj.weight"]), "dt_bias": t[h + "dt_proj.bias"],
                     "A_log": t[h + "A_log"], "D": t[h + "D"],
                     "out_proj": {"kernel": kernel_from_linear(t[h + "out_proj.weight"])}}
            layers.append({"l0": {"norm": {"scale": t[_LAYER.format(i=i) + "norm.weight"]}, "mixer": mixer}})
        return {"embed": {"embedding": t["backbone.embeddings.weight"]}, "blocks": stack_layers(layers),
                "final_norm": {"scale": t["backbone.norm_f.weight"]}}

    def params_to_hf(self, params: dict[str, Any], cfg: Config) -> dict[str, np.ndarray]:
        m = cfg.model
        t = {"backbone.embeddings.weight": params["embed"]["embedding"],
             "backbone.norm_f.weight": params["final_norm"]["scale"]}
        for i, layer in enumerate(unstack_layers(params["blocks"], m.num_layers)):
            h = _LAYER.format(i=i) + "mixer."
            x = layer["l0"]["mixer"]
            t[_LAYER.format(i=i) + "norm.weight"] = layer["l0"]["norm"]["scale"]
            t[h + "in_proj.weight"] = linear_from_kernel(x["in_proj"]["kernel"])
            t[h + "conv1d.weight"] = np.asarray(x["conv_w"])[:, None, :]
            t[h + "conv1d.bias"] = x["conv_b"]
            t[h + "x_proj.weight"] = linear_from_kernel(x["x_proj"]["kernel"])
            t[h + "dt_proj.weight"] = linear_from_kernel(x["dt_proj"])
            t[h + "dt_proj.bias"] = x["dt_bias"]
            t[h + "A_log"] = x["A_log"]
            t[h + "D"] = x["D"]
            t[h + "out_proj.weight"] = linear_from_kernel(x["out_proj"]["kernel"])
        return t


register(Mamba())
