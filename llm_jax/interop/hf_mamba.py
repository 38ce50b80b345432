"""Hugging Face MambaForCausalLM <-> llm-jax `model.arch=mamba` (a pure Mamba stack).

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

_MIXER = "backbone.layers.{i}.mixer."


def mamba_model_config(hf: dict) -> dict[str, Any]:
    """The `model` section of the same network, or a UserError naming what is not supported."""
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


def mamba_supported(cfg: Config) -> bool:
    m = cfg.model
    return (m.pattern == ["mamba"] and m.ssm.selective and m.norm == "rmsnorm" and m.tie_embeddings
            and not m.moe.enabled)


def mamba_to_params(t: dict, cfg: Config) -> dict:
    from llm_jax.interop.hf_weights import _stack

    m = cfg.model
    D, E = m.d_model, m.d_inner
    layers = []
    for i in range(m.num_layers):
        h = _MIXER.format(i=i)
        mixer = {"in_proj": {"kernel": t[h + "in_proj.weight"].T.reshape(D, 2, E)},
                 "conv_w": t[h + "conv1d.weight"][:, 0, :], "conv_b": t[h + "conv1d.bias"],
                 "x_proj": {"kernel": t[h + "x_proj.weight"].T}, "dt_proj": t[h + "dt_proj.weight"].T,
                 "dt_bias": t[h + "dt_proj.bias"], "A_log": t[h + "A_log"], "D": t[h + "D"],
                 "out_proj": {"kernel": t[h + "out_proj.weight"].T}}
        layers.append({"l0": {"norm": {"scale": t[f"backbone.layers.{i}.norm.weight"]}, "mixer": mixer}})
    return {"embed": {"embedding": t["backbone.embeddings.weight"]}, "blocks": _stack(layers),
            "final_norm": {"scale": t["backbone.norm_f.weight"]}}


def mamba_from_params(params: dict, cfg: Config) -> dict[str, np.ndarray]:
    from llm_jax.interop.hf_weights import _unstack

    m = cfg.model
    D = m.d_model
    t = {"backbone.embeddings.weight": params["embed"]["embedding"],
         "backbone.norm_f.weight": params["final_norm"]["scale"]}
    for i, layer in enumerate(_unstack(params["blocks"], m.num_layers)):
        h = _MIXER.format(i=i)
        x = layer["l0"]["mixer"]
        t[f"backbone.layers.{i}.norm.weight"] = layer["l0"]["norm"]["scale"]
        t[h + "in_proj.weight"] = np.asarray(x["in_proj"]["kernel"]).reshape(D, -1).T
        t[h + "conv1d.weight"] = np.asarray(x["conv_w"])[:, None, :]
        t[h + "conv1d.bias"] = x["conv_b"]
        t[h + "x_proj.weight"] = np.asarray(x["x_proj"]["kernel"]).T
        t[h + "dt_proj.weight"] = np.asarray(x["dt_proj"]).T
        t[h + "dt_proj.bias"] = x["dt_bias"]
        t[h + "A_log"] = x["A_log"]
        t[h + "D"] = x["D"]
        t[h + "out_proj.weight"] = np.asarray(x["out_proj"]["kernel"]).T
    return t


def mamba_hf_config(cfg: Config, eos_id: int | None) -> dict[str, Any]:
    m = cfg.model
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "state_size": m.ssm.d_state, "num_hidden_layers": m.num_layers,
            "expand": m.ssm.expand, "intermediate_size": m.d_inner, "conv_kernel": m.ssm.d_conv,
            "time_step_rank": m.dt_rank, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
            "layer_norm_epsilon": m.norm_eps, "residual_in_fp32": True, "tie_word_embeddings": True,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
