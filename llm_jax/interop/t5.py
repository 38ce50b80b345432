"""T5ForConditionalGeneration <-> `model.arch=t5`.

The v1.0 layout: ReLU feed-forward (`feed_forward_proj="relu"`), RMS norms without bias, no
biases anywhere, one relative-position bias table per stack (stored in block 0's self-attention
and shared by every layer), a decoder output tied to `shared.weight` and scaled by d_model^-0.5.
torch Linear weights are [out, in]; our kernels are [in..., out...] with heads as an axis.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.interop.base import Adapter, needs, not_dense, register
from llm_jax.interop.tree import kernel_from_linear, linear_from_kernel, stack_layers, unstack_layers

# Block `layer` indices of T5's modules, and our names for the same pieces.
_ENCODER_LAYERS = {"norm1": "layer.0.layer_norm", "attn": "layer.0.SelfAttention",
                   "norm2": "layer.1.layer_norm", "mlp": "layer.1.DenseReluDense"}
_DECODER_LAYERS = {"norm1": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
                   "norm2": "layer.1.layer_norm", "cross_attn": "layer.1.EncDecAttention",
                   "norm3": "layer.2.layer_norm", "mlp": "layer.2.DenseReluDense"}
_BIAS = "layer.0.SelfAttention.relative_attention_bias.weight"


def _attention_in(t: dict[str, np.ndarray], name: str, H: int, K: int, D: int) -> dict[str, Any]:
    attn = {n: {"kernel": kernel_from_linear(t[f"{name}.{n}.weight"], out_shape=(H, K))} for n in "qkv"}
    attn["o"] = {"kernel": kernel_from_linear(t[name + ".o.weight"], in_shape=(H, K), out_shape=(D,))}
    return attn


def _attention_out(a: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    out = {f"{name}.{n}.weight": linear_from_kernel(a[n]["kernel"]) for n in "qkv"}
    out[name + ".o.weight"] = linear_from_kernel(a["o"]["kernel"], in_axes=2)
    return out


def _stack_in(t: dict[str, np.ndarray], prefix: str, n_layers: int, names: dict[str, str], cfg: Config) -> dict:
    m = cfg.model
    layers = []
    for i in range(n_layers):
        h = f"{prefix}.block.{i}."
        layer: dict[str, Any] = {}
        for ours, theirs in names.items():
            if ours.startswith("norm"):
                layer[ours] = {"scale": t[h + theirs + ".weight"]}
            elif ours == "mlp":
                layer[ours] = {"up": {"kernel": kernel_from_linear(t[h + theirs + ".wi.weight"])},
                               "down": {"kernel": kernel_from_linear(t[h + theirs + ".wo.weight"])}}
            else:
                layer[ours] = _attention_in(t, h + theirs, m.num_heads, m.head_dim, m.d_model)
        layers.append(layer)
    return stack_layers(layers)


def _stack_out(stacked: dict, prefix: str, n_layers: int, names: dict[str, str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(unstack_layers(stacked, n_layers)):
        h = f"{prefix}.block.{i}."
        for ours, theirs in names.items():
            if ours.startswith("norm"):
                out[h + theirs + ".weight"] = layer[ours]["scale"]
            elif ours == "mlp":
                out[h + theirs + ".wi.weight"] = linear_from_kernel(layer[ours]["up"]["kernel"])
                out[h + theirs + ".wo.weight"] = linear_from_kernel(layer[ours]["down"]["kernel"])
            else:
                out.update(_attention_out(layer[ours], h + theirs))
    return out


class T5(Adapter):
    name = "t5"
    model_type = "t5"
    hf_class = "T5ForConditionalGeneration"
    arch = "t5"
    seq_len = 512  # relative positions: no table bounds the length

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        proj = hf.get("feed_forward_proj", "relu")
        if proj != "relu":
            raise UserError(f"T5 feed_forward_proj {proj!r} is not supported (relu, the T5 v1.0 layout, is)")
        heads, d_kv, d_model = hf["num_heads"], hf["d_kv"], hf["d_model"]
        if heads * d_kv != d_model:
            raise UserError(f"T5 configs with num_heads * d_kv ({heads} * {d_kv}) != d_model ({d_model}) "
                            "are not supported")
        if not hf.get("tie_word_embeddings", True):
            raise UserError("T5 with untied output embeddings (tie_word_embeddings=false) is not supported")
        return {"arch": "t5", "num_layers": hf["num_layers"],
                "num_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
                "d_model": d_model, "num_heads": heads, "d_ff": hf["d_ff"], "position": "relative",
                "relative_buckets": hf.get("relative_attention_num_buckets", 32),
                "relative_max_distance": hf.get("relative_attention_max_distance", 128),
                "norm": "rmsnorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-6), "mlp": "relu",
                "use_bias": False, "tie_embeddings": True}

    def unsupported(self, cfg: Config) -> str | None:
        m = cfg.model
        if reason := not_dense(self, cfg):
            return reason
        return needs(f"{self.hf_class} (v1.0)", {
            "model.position": (m.position, "relative"), "model.norm": (m.norm, "rmsnorm"), "model.mlp": (m.mlp, "relu"),
            "model.use_bias": (m.use_bias, False), "model.tie_embeddings": (m.tie_embeddings, True),
            "model.num_kv_heads": (m.kv_heads, m.num_heads)})

    def hf_config(self, cfg: Config, eos_id: int | None, pad_id: int) -> dict[str, Any]:
        m = cfg.model
        return {"architectures": [self.hf_class], "model_type": self.model_type, "vocab_size": m.vocab_size,
                "d_model": m.d_model, "d_kv": m.head_dim, "d_ff": m.ff_dim, "num_layers": m.num_layers,
                "num_decoder_layers": m.decoder_layers, "num_heads": m.num_heads,
                "relative_attention_num_buckets": m.relative_buckets,
                "relative_attention_max_distance": m.relative_max_distance, "dropout_rate": 0.0,
                "layer_norm_epsilon": m.norm_eps, "feed_forward_proj": "relu", "tie_word_embeddings": True,
                "is_encoder_decoder": True, "pad_token_id": pad_id, "eos_token_id": eos_id,
                "decoder_start_token_id": pad_id}

    def params_from_hf(self, tensors: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
        t, m = tensors, cfg.model
        return {"embed": {"embedding": t["shared.weight"]},
                "encoder_bias": {"table": t["encoder.block.0." + _BIAS]},
                "decoder_bias": {"table": t["decoder.block.0." + _BIAS]},
                "encoder": _stack_in(t, "encoder", m.num_layers, _ENCODER_LAYERS, cfg),
                "decoder": _stack_in(t, "decoder", m.decoder_layers, _DECODER_LAYERS, cfg),
                "encoder_norm": {"scale": t["encoder.final_layer_norm.weight"]},
                "decoder_norm": {"scale": t["decoder.final_layer_norm.weight"]}}

    def params_to_hf(self, params: dict[str, Any], cfg: Config) -> dict[str, np.ndarray]:
        m = cfg.model
        t = {"shared.weight": params["embed"]["embedding"],
             "encoder.block.0." + _BIAS: params["encoder_bias"]["table"],
             "decoder.block.0." + _BIAS: params["decoder_bias"]["table"],
             "encoder.final_layer_norm.weight": params["encoder_norm"]["scale"],
             "decoder.final_layer_norm.weight": params["decoder_norm"]["scale"]}
        t.update(_stack_out(params["encoder"], "encoder", m.num_layers, _ENCODER_LAYERS))
        t.update(_stack_out(params["decoder"], "decoder", m.decoder_layers, _DECODER_LAYERS))
        return t


register(T5())
