"""Hugging Face T5ForConditionalGeneration <-> llm-jax `model.arch=t5`: config and weights.

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
from llm_jax.interop.hf_weights import _stack, _unstack

# Block `layer` indices of T5's modules, and our names for the same pieces.
_ENCODER_LAYERS = {"norm1": "layer.0.layer_norm", "attn": "layer.0.SelfAttention",
                   "norm2": "layer.1.layer_norm", "mlp": "layer.1.DenseReluDense"}
_DECODER_LAYERS = {"norm1": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
                   "norm2": "layer.1.layer_norm", "cross_attn": "layer.1.EncDecAttention",
                   "norm3": "layer.2.layer_norm", "mlp": "layer.2.DenseReluDense"}
_BIAS = "layer.0.SelfAttention.relative_attention_bias.weight"


def t5_model_config(hf: dict) -> dict[str, Any]:
    """The `model` section of the same network, or a UserError naming what is not supported."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj != "relu":
        raise UserError(f"T5 feed_forward_proj {proj!r} is not supported (relu, the T5 v1.0 layout, is)")
    heads, d_kv, d_model = hf["num_heads"], hf["d_kv"], hf["d_model"]
    if heads * d_kv != d_model:
        raise UserError(f"T5 configs with num_heads * d_kv ({heads} * {d_kv}) != d_model ({d_model}) are not supported")
    if not hf.get("tie_word_embeddings", True):
        raise UserError("T5 with untied output embeddings (tie_word_embeddings=false) is not supported")
    return {"arch": "t5", "num_layers": hf["num_layers"], "num_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
            "d_model": d_model, "num_heads": heads, "d_ff": hf["d_ff"], "position": "relative",
            "relative_buckets": hf.get("relative_attention_num_buckets", 32),
            "relative_max_distance": hf.get("relative_attention_max_distance", 128),
            "norm": "rmsnorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-6), "mlp": "relu",
            "use_bias": False, "tie_embeddings": True}


def _attention_in(t: dict, name: str, H: int, K: int, D: int) -> dict:
    return {"q": {"kernel": t[name + ".q.weight"].T.reshape(D, H, K)},
            "k": {"kernel": t[name + ".k.weight"].T.reshape(D, H, K)},
            "v": {"kernel": t[name + ".v.weight"].T.reshape(D, H, K)},
            "o": {"kernel": t[name + ".o.weight"].T.reshape(H, K, D)}}


def _attention_out(a: dict, name: str, D: int) -> dict[str, np.ndarray]:
    out = {name + f".{n}.weight": np.asarray(a[n]["kernel"]).reshape(D, -1).T for n in "qkv"}
    out[name + ".o.weight"] = np.asarray(a["o"]["kernel"]).reshape(-1, D).T
    return out


def _stack_in(t: dict, prefix: str, n_layers: int, names: dict, H: int, K: int, D: int) -> dict:
    layers = []
    for i in range(n_layers):
        h = f"{prefix}.block.{i}."
        layer = {}
        for ours, theirs in names.items():
            if ours.startswith("norm"):
                layer[ours] = {"scale": t[h + theirs + ".weight"]}
            elif ours == "mlp":
                layer[ours] = {"up": {"kernel": t[h + theirs + ".wi.weight"].T},
                               "down": {"kernel": t[h + theirs + ".wo.weight"].T}}
            else:
                layer[ours] = _attention_in(t, h + theirs, H, K, D)
        layers.append(layer)
    return _stack(layers)


def _stack_out(stacked: dict, prefix: str, n_layers: int, names: dict, D: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(_unstack(stacked, n_layers)):
        h = f"{prefix}.block.{i}."
        for ours, theirs in names.items():
            if ours.startswith("norm"):
                out[h + theirs + ".weight"] = layer[ours]["scale"]
            elif ours == "mlp":
                out[h + theirs + ".wi.weight"] = np.asarray(layer[ours]["up"]["kernel"]).T
                out[h + theirs + ".wo.weight"] = np.asarray(layer[ours]["down"]["kernel"]).T
            else:
                out.update(_attention_out(layer[ours], h + theirs, D))
    return out


def t5_to_params(t: dict, cfg: Config) -> dict:
    m = cfg.model
    H, K, D = m.num_heads, m.head_dim, m.d_model
    return {"embed": {"embedding": t["shared.weight"]},
            "encoder_bias": {"table": t["encoder.block.0." + _BIAS]},
            "decoder_bias": {"table": t["decoder.block.0." + _BIAS]},
            "encoder": _stack_in(t, "encoder", m.num_layers, _ENCODER_LAYERS, H, K, D),
            "decoder": _stack_in(t, "decoder", m.decoder_layers, _DECODER_LAYERS, H, K, D),
            "encoder_norm": {"scale": t["encoder.final_layer_norm.weight"]},
            "decoder_norm": {"scale": t["decoder.final_layer_norm.weight"]}}


def t5_from_params(params: dict, cfg: Config) -> dict[str, np.ndarray]:
    m = cfg.model
    D = m.d_model
    t = {"shared.weight": params["embed"]["embedding"],
         "encoder.block.0." + _BIAS: params["encoder_bias"]["table"],
         "decoder.block.0." + _BIAS: params["decoder_bias"]["table"],
         "encoder.final_layer_norm.weight": params["encoder_norm"]["scale"],
         "decoder.final_layer_norm.weight": params["decoder_norm"]["scale"]}
    t.update(_stack_out(params["encoder"], "encoder", m.num_layers, _ENCODER_LAYERS, D))
    t.update(_stack_out(params["decoder"], "decoder", m.decoder_layers, _DECODER_LAYERS, D))
    return t


def t5_supported(cfg: Config) -> bool:
    m = cfg.model
    return (m.position, m.norm, m.mlp, m.use_bias, m.tie_embeddings) == ("relative", "rmsnorm", "relu", False, True) \
        and m.kv_heads == m.num_heads


def t5_hf_config(cfg: Config, eos_id: int | None, pad_id: int) -> dict[str, Any]:
    m = cfg.model
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": m.vocab_size,
            "d_model": m.d_model, "d_kv": m.head_dim, "d_ff": m.ff_dim, "num_layers": m.num_layers,
            "num_decoder_layers": m.decoder_layers, "num_heads": m.num_heads,
            "relative_attention_num_buckets": m.relative_buckets,
            "relative_attention_max_distance": m.relative_max_distance, "dropout_rate": 0.0,
            "layer_norm_epsilon": m.norm_eps, "feed_forward_proj": "relu", "tie_word_embeddings": True,
            "is_encoder_decoder": True, "pad_token_id": pad_id, "eos_token_id": eos_id,
            "decoder_start_token_id": pad_id}
