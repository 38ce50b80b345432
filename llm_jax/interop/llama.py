"""LlamaForCausalLM <-> a `model.arch=gpt` decoder with RoPE (the rotate-half layout), RMSNorm,
SwiGLU, grouped-query attention and no biases.

torch Linear weights are [out, in]; ours are [in..., out...] with heads as an axis. Layer i is
`model.layers.{i}.`. The public `llama_*` functions hold everything but the feed-forward part of a
block, so `mixtral` (the same decoder with MoE layers) builds on them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.interop.base import Adapter, needs, not_dense, register
from llm_jax.interop.tree import kernel_from_linear, linear_from_kernel, stack_layers, unstack_layers

# Layer i's feed-forward part: (tensors, "model.layers.{i}.", cfg) -> our entries of that layer,
# and (our layer, "model.layers.{i}.", cfg) -> its tensors.
FFNIn = Callable[[dict[str, np.ndarray], str, Config], dict[str, Any]]
FFNOut = Callable[[dict[str, Any], str, Config], dict[str, np.ndarray]]
_MLP = ("gate", "up", "down")


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}  # transformers 5 nests it; 4.x kept it at the top
    if (params.get("rope_type") or "default") != "default" or hf.get("rope_scaling"):
        raise UserError("scaled RoPE (rope_scaling / rope_type other than default) is not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The `model` section of a Llama-style config.json (Mixtral's too, before its MoE keys)."""
    heads = hf["num_attention_heads"]
    if (hf.get("head_dim") or hf["hidden_size"] // heads) * heads != hf["hidden_size"]:
        raise UserError("Llama configs with head_dim * num_attention_heads != hidden_size are not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise UserError("Llama variants with biases or a non-SiLU activation are not supported")
    return {"num_layers": hf["num_hidden_layers"], "d_model": hf["hidden_size"], "num_heads": heads,
            "num_kv_heads": hf.get("num_key_value_heads") or heads, "d_ff": hf["intermediate_size"],
            "max_seq_len": hf["max_position_embeddings"], "position": "rope", "rope_theta": _rope_theta(hf),
            "norm": "rmsnorm", "norm_eps": hf.get("rms_norm_eps", 1e-6), "mlp": "swiglu", "use_bias": False,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def llama_unsupported(hf_class: str, cfg: Config) -> str | None:
    """Why `cfg` is not a Llama decoder (RoPE, RMSNorm, SwiGLU, no biases), or None."""
    m = cfg.model
    return needs(hf_class, {"model.position": (m.position, "rope"), "model.norm": (m.norm, "rmsnorm"),
                            "model.mlp": (m.mlp, "swiglu"), "model.use_bias": (m.use_bias, False)})


def llama_hf_config(cfg: Config, eos_id: int | None) -> dict[str, Any]:
    """LlamaForCausalLM's config.json for `cfg` (Mixtral adds its keys to it)."""
    m = cfg.model
    return {"architectures": [LLAMA.hf_class], "model_type": LLAMA.model_type, "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "intermediate_size": m.ff_dim, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": m.tie_embeddings, "bos_token_id": eos_id, "eos_token_id": eos_id}


def llama_params_from_hf(t: dict[str, np.ndarray], cfg: Config, ffn_in: FFNIn) -> dict[str, Any]:
    """Our tree from a Llama-style checkpoint; `ffn_in` reads each block's feed-forward part."""
    m = cfg.model
    H, KV, K, D = m.num_heads, m.kv_heads, m.head_dim, m.d_model
    layers = []
    for i in range(m.num_layers):
        h = f"model.layers.{i}."
        a = h + "self_attn."
        attn = {"q": {"kernel": kernel_from_linear(t[a + "q_proj.weight"], out_shape=(H, K))},
                "k": {"kernel": kernel_from_linear(t[a + "k_proj.weight"], out_shape=(KV, K))},
                "v": {"kernel": kernel_from_linear(t[a + "v_proj.weight"], out_shape=(KV, K))},
                "o": {"kernel": kernel_from_linear(t[a + "o_proj.weight"], in_shape=(H, K), out_shape=(D,))}}
        layers.append({"norm1": {"scale": t[h + "input_layernorm.weight"]}, "attn": attn,
                       "norm2": {"scale": t[h + "post_attention_layernorm.weight"]}, **ffn_in(t, h, cfg)})
    params = {"embed": {"embedding": t["model.embed_tokens.weight"]}, "blocks": stack_layers(layers),
              "final_norm": {"scale": t["model.norm.weight"]}}
    if not m.tie_embeddings:
        params["head"] = {"kernel": kernel_from_linear(t["lm_head.weight"])}
    return params


def llama_params_to_hf(params: dict[str, Any], cfg: Config, ffn_out: FFNOut) -> dict[str, np.ndarray]:
    """A Llama-style checkpoint's tensors from our tree; `ffn_out` writes each block's feed-forward part."""
    m = cfg.model
    t = {"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": params["final_norm"]["scale"]}
    if not m.tie_embeddings:
        t["lm_head.weight"] = linear_from_kernel(params["head"]["kernel"])
    for i, layer in enumerate(unstack_layers(params["blocks"], m.num_layers)):
        h = f"model.layers.{i}."
        a = layer["attn"]
        for n in "qkv":
            t[h + f"self_attn.{n}_proj.weight"] = linear_from_kernel(a[n]["kernel"])
        t[h + "self_attn.o_proj.weight"] = linear_from_kernel(a["o"]["kernel"], in_axes=2)
        t[h + "input_layernorm.weight"] = layer["norm1"]["scale"]
        t[h + "post_attention_layernorm.weight"] = layer["norm2"]["scale"]
        t.update(ffn_out(layer, h, cfg))
    return t


def _mlp_in(t: dict[str, np.ndarray], h: str, cfg: Config) -> dict[str, Any]:
    return {"mlp": {name: {"kernel": kernel_from_linear(t[h + f"mlp.{name}_proj.weight"])} for name in _MLP}}


def _mlp_out(layer: dict[str, Any], h: str, cfg: Config) -> dict[str, np.ndarray]:
    return {h + f"mlp.{name}_proj.weight": linear_from_kernel(layer["mlp"][name]["kernel"]) for name in _MLP}


class Llama(Adapter):
    name = "llama"
    model_type = "llama"
    hf_class = "LlamaForCausalLM"
    arch = "gpt"

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        return llama_model_config(hf)

    def unsupported(self, cfg: Config) -> str | None:
        if reason := not_dense(self, cfg):
            return reason
        return llama_unsupported(self.hf_class, cfg)

    def hf_config(self, cfg: Config, eos_id: int | None, pad_id: int) -> dict[str, Any]:
        return llama_hf_config(cfg, eos_id)

    def params_from_hf(self, tensors: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
        return llama_params_from_hf(tensors, cfg, _mlp_in)

    def params_to_hf(self, params: dict[str, Any], cfg: Config) -> dict[str, np.ndarray]:
        return llama_params_to_hf(params, cfg, _mlp_out)


LLAMA = register(Llama())
