"""BertForMaskedLM <-> `model.arch=bert`: post-norm encoder blocks with exact GELU, learned
positions, segment (token type) embeddings and the MLM head (dense + GELU + LayerNorm, a decoder
tied to the word embeddings unless untied, plus `cls.predictions.bias`).

torch Linear weights are [out, in] with a bias [out]; ours are [in..., out...] with heads as an
axis. Layer i is `bert.encoder.layer.{i}.`; a BERT classifier (our `data.task`) is not exported:
BertForMaskedLM has the masked-LM head it replaced.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.interop.base import Adapter, needs, not_dense, register
from llm_jax.interop.tree import kernel_from_linear, linear_from_kernel, stack_layers, unstack_layers
from llm_jax.models.bert import NUM_SEGMENTS

# BertForMaskedLM's names for the pieces of one encoder layer, after "bert.encoder.layer.{i}.".
_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "o": "attention.output.dense", "norm1": "attention.output.LayerNorm",
          "up": "intermediate.dense", "down": "output.dense", "norm2": "output.LayerNorm"}
_E = "bert.embeddings."


def _linear_in(t: dict[str, np.ndarray], name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> dict:
    """A torch Linear (weight and bias) as our Dense: kernel [*in_shape, *out_shape], bias [*out_shape]."""
    return {"kernel": kernel_from_linear(t[name + ".weight"], in_shape, out_shape),
            "bias": t[name + ".bias"].reshape(out_shape)}


def _linear_out(d: dict[str, Any], name: str, in_axes: int = 1) -> dict[str, np.ndarray]:
    """Our Dense (its first `in_axes` kernel axes the input) as a torch Linear's weight and bias."""
    return {name + ".weight": linear_from_kernel(d["kernel"], in_axes),
            name + ".bias": np.asarray(d["bias"]).reshape(-1)}


def _norm_in(t: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {"scale": t[name + ".weight"], "bias": t[name + ".bias"]}


def _norm_out(d: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    return {name + ".weight": d["scale"], name + ".bias": d["bias"]}


class Bert(Adapter):
    name = "bert"
    model_type = "bert"
    hf_class = "BertForMaskedLM"
    arch = "bert"

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("hidden_act", "gelu") != "gelu":
            raise UserError(f"BERT activation {hf['hidden_act']!r} is not supported (gelu, the erf form, is)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UserError("BERT with relative position embeddings is not supported (absolute is)")
        if hf.get("type_vocab_size", 2) != NUM_SEGMENTS:
            raise UserError(f"BERT with type_vocab_size={hf['type_vocab_size']} is not supported ({NUM_SEGMENTS} is)")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise UserError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        return {"arch": "bert", "num_layers": hf["num_hidden_layers"], "d_model": hf["hidden_size"],
                "num_heads": hf["num_attention_heads"], "d_ff": hf["intermediate_size"],
                "max_seq_len": hf["max_position_embeddings"], "position": "learned", "norm": "layernorm",
                "norm_eps": hf.get("layer_norm_eps", 1e-12), "mlp": "gelu", "use_bias": True,
                "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}

    def unsupported(self, cfg: Config) -> str | None:
        m = cfg.model
        if reason := not_dense(self, cfg):
            return reason
        if cfg.objective == "classify":
            return (f"this bert model is a classifier (data.task); export-hf writes {self.hf_class}, "
                    "which has the masked-LM head it replaced")
        return needs(self.hf_class, {"model.position": (m.position, "learned"), "model.norm": (m.norm, "layernorm"),
                                     "model.mlp": (m.mlp, "gelu"), "model.use_bias": (m.use_bias, True),
                                     "model.num_kv_heads": (m.kv_heads, m.num_heads)})

    def hf_config(self, cfg: Config, eos_id: int | None, pad_id: int) -> dict[str, Any]:
        m = cfg.model
        return {"architectures": [self.hf_class], "model_type": self.model_type, "vocab_size": m.vocab_size,
                "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
                "intermediate_size": m.ff_dim, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0, "max_position_embeddings": cfg.max_seq_len,
                "type_vocab_size": NUM_SEGMENTS, "layer_norm_eps": m.norm_eps,
                "position_embedding_type": "absolute", "tie_word_embeddings": m.tie_embeddings}

    def params_from_hf(self, tensors: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
        t, m = tensors, cfg.model
        H, K, D, F = m.num_heads, m.head_dim, m.d_model, m.ff_dim
        layers = []
        for i in range(m.num_layers):
            n = {ours: f"bert.encoder.layer.{i}.{theirs}" for ours, theirs in _LAYER.items()}
            layers.append({
                "attn": {"q": _linear_in(t, n["q"], (D,), (H, K)), "k": _linear_in(t, n["k"], (D,), (H, K)),
                         "v": _linear_in(t, n["v"], (D,), (H, K)), "o": _linear_in(t, n["o"], (H, K), (D,))},
                "norm1": _norm_in(t, n["norm1"]),
                "mlp": {"up": _linear_in(t, n["up"], (D,), (F,)), "down": _linear_in(t, n["down"], (F,), (D,))},
                "norm2": _norm_in(t, n["norm2"]),
            })
        # The output bias is cls.predictions.bias; older saves may hold only its tied alias.
        bias = t["cls.predictions.bias"] if "cls.predictions.bias" in t else t["cls.predictions.decoder.bias"]
        params = {"embed": {"embedding": t[_E + "word_embeddings.weight"]},
                  "pos_embed": {"embedding": t[_E + "position_embeddings.weight"]},
                  "segment_embed": {"embedding": t[_E + "token_type_embeddings.weight"]},
                  "embed_norm": _norm_in(t, _E + "LayerNorm"),
                  "blocks": stack_layers(layers),
                  "head_dense": _linear_in(t, "cls.predictions.transform.dense", (D,), (D,)),
                  "head_norm": _norm_in(t, "cls.predictions.transform.LayerNorm"),
                  "out_bias": bias}
        if not m.tie_embeddings:
            params["head"] = {"kernel": kernel_from_linear(t["cls.predictions.decoder.weight"])}
        return params

    def params_to_hf(self, params: dict[str, Any], cfg: Config) -> dict[str, np.ndarray]:
        m = cfg.model
        t = {_E + "word_embeddings.weight": params["embed"]["embedding"],
             _E + "position_embeddings.weight": params["pos_embed"]["embedding"],
             _E + "token_type_embeddings.weight": params["segment_embed"]["embedding"],
             **_norm_out(params["embed_norm"], _E + "LayerNorm"),
             **_linear_out(params["head_dense"], "cls.predictions.transform.dense"),
             **_norm_out(params["head_norm"], "cls.predictions.transform.LayerNorm"),
             "cls.predictions.bias": params["out_bias"]}
        if not m.tie_embeddings:
            t["cls.predictions.decoder.weight"] = linear_from_kernel(params["head"]["kernel"])
        for i, layer in enumerate(unstack_layers(params["blocks"], m.num_layers)):
            h = f"bert.encoder.layer.{i}."
            for ours in ("q", "k", "v", "o"):
                t.update(_linear_out(layer["attn"][ours], h + _LAYER[ours], in_axes=2 if ours == "o" else 1))
            for ours in ("up", "down"):
                t.update(_linear_out(layer["mlp"][ours], h + _LAYER[ours]))
            for ours in ("norm1", "norm2"):
                t.update(_norm_out(layer[ours], h + _LAYER[ours]))
        return t


register(Bert())
