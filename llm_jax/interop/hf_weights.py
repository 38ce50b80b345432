"""Hugging Face weights <-> llm-jax parameters, per family: GPT-2 and Llama (Mixtral reuses
Llama's with its MoE layers), BERT here; T5 and Mamba in `hf_t5` / `hf_mamba`.

GPT-2's Conv1D stores [in, out] and fuses q, k, v in one `c_attn`; torch Linear (Llama, BERT)
stores [out, in]. Our kernels are [in..., out...] with heads as their own axis, and block
parameters are stacked along a leading layer axis. Configs and files are `hf`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError


def _stack(per_layer: list[dict]) -> dict:
    """[layer trees] -> one tree with a leading layer axis on every leaf."""
    if isinstance(per_layer[0], dict):
        return {k: _stack([layer[k] for layer in per_layer]) for k in per_layer[0]}
    return np.stack(per_layer)


def _unstack(tree: dict, n: int) -> list[dict]:
    if isinstance(tree, dict):
        parts = {k: _unstack(v, n) for k, v in tree.items()}
        return [{k: parts[k][i] for k in tree} for i in range(n)]
    return [np.asarray(tree[i]) for i in range(n)]


def _gpt2_to_params(t: dict, cfg: Config) -> dict:
    m = cfg.model
    H, K, D = m.num_heads, m.head_dim, m.d_model
    p = "transformer."
    layers = []
    for i in range(m.num_layers):
        h = f"{p}h.{i}."
        qkv_w = t[h + "attn.c_attn.weight"]  # [D, 3D] = [in, q | k | v]
        qkv_b = t[h + "attn.c_attn.bias"]
        attn = {name: {"kernel": qkv_w[:, j * D:(j + 1) * D].reshape(D, H, K),
                       "bias": qkv_b[j * D:(j + 1) * D].reshape(H, K)} for j, name in enumerate("qkv")}
        attn["o"] = {"kernel": t[h + "attn.c_proj.weight"].reshape(H, K, D), "bias": t[h + "attn.c_proj.bias"]}
        layers.append({
            "norm1": {"scale": t[h + "ln_1.weight"], "bias": t[h + "ln_1.bias"]},
            "attn": attn,
            "norm2": {"scale": t[h + "ln_2.weight"], "bias": t[h + "ln_2.bias"]},
            "mlp": {"up": {"kernel": t[h + "mlp.c_fc.weight"], "bias": t[h + "mlp.c_fc.bias"]},
                    "down": {"kernel": t[h + "mlp.c_proj.weight"], "bias": t[h + "mlp.c_proj.bias"]}},
        })
    return {"embed": {"embedding": t[p + "wte.weight"]}, "pos_embed": {"embedding": t[p + "wpe.weight"]},
            "blocks": _stack(layers),
            "final_norm": {"scale": t[p + "ln_f.weight"], "bias": t[p + "ln_f.bias"]}}


def _gpt2_from_params(params: dict, cfg: Config) -> dict[str, np.ndarray]:
    m = cfg.model
    D = m.d_model
    p = "transformer."
    t = {p + "wte.weight": params["embed"]["embedding"], p + "wpe.weight": params["pos_embed"]["embedding"],
         p + "ln_f.weight": params["final_norm"]["scale"], p + "ln_f.bias": params["final_norm"]["bias"]}
    for i, layer in enumerate(_unstack(params["blocks"], m.num_layers)):
        h = f"{p}h.{i}."
        a = layer["attn"]
        t[h + "attn.c_attn.weight"] = np.concatenate([a[n]["kernel"].reshape(D, D) for n in "qkv"], axis=1)
        t[h + "attn.c_attn.bias"] = np.concatenate([a[n]["bias"].reshape(D) for n in "qkv"])
        t[h + "attn.c_proj.weight"] = a["o"]["kernel"].reshape(D, D)
        t[h + "attn.c_proj.bias"] = a["o"]["bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            t[h + theirs + ".weight"], t[h + theirs + ".bias"] = layer[ours]["scale"], layer[ours]["bias"]
        for ours, theirs in (("up", "c_fc"), ("down", "c_proj")):
            t[h + f"mlp.{theirs}.weight"] = layer["mlp"][ours]["kernel"]
            t[h + f"mlp.{theirs}.bias"] = layer["mlp"][ours]["bias"]
    return t


def _llama_to_params(t: dict, cfg: Config) -> dict:
    m = cfg.model
    H, KV, K, D = m.num_heads, m.kv_heads, m.head_dim, m.d_model
    layers = []
    for i in range(m.num_layers):
        h = f"model.layers.{i}."
        attn = {"q": {"kernel": t[h + "self_attn.q_proj.weight"].T.reshape(D, H, K)},
                "k": {"kernel": t[h + "self_attn.k_proj.weight"].T.reshape(D, KV, K)},
                "v": {"kernel": t[h + "self_attn.v_proj.weight"].T.reshape(D, KV, K)},
                "o": {"kernel": t[h + "self_attn.o_proj.weight"].T.reshape(H, K, D)}}
        layers.append({
            "norm1": {"scale": t[h + "input_layernorm.weight"]},
            "attn": attn,
            "norm2": {"scale": t[h + "post_attention_layernorm.weight"]},
        })
        if m.moe.enabled:
            from llm_jax.interop.hf_mixtral import mixtral_moe_in

            layers[-1]["moe"] = mixtral_moe_in(t, i, m.moe.num_experts)
        else:
            layers[-1]["mlp"] = {name: {"kernel": t[h + f"mlp.{name}_proj.weight"].T} for name in ("gate", "up", "down")}
    params = {"embed": {"embedding": t["model.embed_tokens.weight"]}, "blocks": _stack(layers),
              "final_norm": {"scale": t["model.norm.weight"]}}
    if not m.tie_embeddings:
        params["head"] = {"kernel": t["lm_head.weight"].T}
    return params


def _llama_from_params(params: dict, cfg: Config) -> dict[str, np.ndarray]:
    m = cfg.model
    D = m.d_model
    t = {"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": params["final_norm"]["scale"]}
    if not m.tie_embeddings:
        t["lm_head.weight"] = params["head"]["kernel"].T
    for i, layer in enumerate(_unstack(params["blocks"], m.num_layers)):
        h = f"model.layers.{i}."
        a = layer["attn"]
        for n in "qkv":
            t[h + f"self_attn.{n}_proj.weight"] = a[n]["kernel"].reshape(D, -1).T
        t[h + "self_attn.o_proj.weight"] = a["o"]["kernel"].reshape(-1, D).T
        t[h + "input_layernorm.weight"] = layer["norm1"]["scale"]
        t[h + "post_attention_layernorm.weight"] = layer["norm2"]["scale"]
        if m.moe.enabled:
            from llm_jax.interop.hf_mixtral import mixtral_moe_out

            t.update(mixtral_moe_out(layer["moe"], i))
            continue
        for name in ("gate", "up", "down"):
            t[h + f"mlp.{name}_proj.weight"] = layer["mlp"][name]["kernel"].T
    return t


def _linear_in(t: dict, name: str, out_shape: tuple) -> dict:
    """A torch Linear ([out, in] weight, [out] bias) as our Dense: kernel [in, *out_shape]."""
    w = t[name + ".weight"]
    return {"kernel": w.T.reshape(w.shape[1], *out_shape), "bias": t[name + ".bias"].reshape(out_shape)}


def _linear_out(d: dict, name: str, in_size: int) -> dict[str, np.ndarray]:
    """Our Dense (kernel [in..., out...]) as a torch Linear's weight [out, in] and bias [out]."""
    kernel = np.asarray(d["kernel"])
    return {name + ".weight": kernel.reshape(in_size, -1).T, name + ".bias": np.asarray(d["bias"]).reshape(-1)}


def _norm_in(t: dict, name: str) -> dict:
    return {"scale": t[name + ".weight"], "bias": t[name + ".bias"]}


def _norm_out(d: dict, name: str) -> dict[str, np.ndarray]:
    return {name + ".weight": d["scale"], name + ".bias": d["bias"]}


# BertForMaskedLM's names for the pieces of one encoder layer, after "bert.encoder.layer.{i}.".
_BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "o": "attention.output.dense", "norm1": "attention.output.LayerNorm",
               "up": "intermediate.dense", "down": "output.dense", "norm2": "output.LayerNorm"}


def _bert_to_params(t: dict, cfg: Config) -> dict:
    m = cfg.model
    H, K, D = m.num_heads, m.head_dim, m.d_model
    e = "bert.embeddings."
    layers = []
    for i in range(m.num_layers):
        h = f"bert.encoder.layer.{i}."
        n = {k: h + v for k, v in _BERT_LAYER.items()}
        o = _linear_in(t, n["o"], (D,))
        o["kernel"] = o["kernel"].reshape(H, K, D)
        layers.append({
            "attn": {"q": _linear_in(t, n["q"], (H, K)), "k": _linear_in(t, n["k"], (H, K)),
                     "v": _linear_in(t, n["v"], (H, K)), "o": o},
            "norm1": _norm_in(t, n["norm1"]),
            "mlp": {"up": _linear_in(t, n["up"], (m.ff_dim,)), "down": _linear_in(t, n["down"], (D,))},
            "norm2": _norm_in(t, n["norm2"]),
        })
    # The output bias is cls.predictions.bias; older saves may hold only its tied alias.
    bias = t["cls.predictions.bias"] if "cls.predictions.bias" in t else t["cls.predictions.decoder.bias"]
    params = {"embed": {"embedding": t[e + "word_embeddings.weight"]},
              "pos_embed": {"embedding": t[e + "position_embeddings.weight"]},
              "segment_embed": {"embedding": t[e + "token_type_embeddings.weight"]},
              "embed_norm": _norm_in(t, e + "LayerNorm"),
              "blocks": _stack(layers),
              "head_dense": _linear_in(t, "cls.predictions.transform.dense", (D,)),
              "head_norm": _norm_in(t, "cls.predictions.transform.LayerNorm"),
              "out_bias": bias}
    if not m.tie_embeddings:
        params["head"] = {"kernel": t["cls.predictions.decoder.weight"].T}
    return params


def _bert_from_params(params: dict, cfg: Config) -> dict[str, np.ndarray]:
    m = cfg.model
    D = m.d_model
    e = "bert.embeddings."
    t = {e + "word_embeddings.weight": params["embed"]["embedding"],
         e + "position_embeddings.weight": params["pos_embed"]["embedding"],
         e + "token_type_embeddings.weight": params["segment_embed"]["embedding"],
         **_norm_out(params["embed_norm"], e + "LayerNorm"),
         **_linear_out(params["head_dense"], "cls.predictions.transform.dense", D),
         **_norm_out(params["head_norm"], "cls.predictions.transform.LayerNorm"),
         "cls.predictions.bias": params["out_bias"]}
    if not m.tie_embeddings:
        t["cls.predictions.decoder.weight"] = np.asarray(params["head"]["kernel"]).T
    for i, layer in enumerate(_unstack(params["blocks"], m.num_layers)):
        h = f"bert.encoder.layer.{i}."
        for ours in ("q", "k", "v", "o"):
            t.update(_linear_out(layer["attn"][ours], h + _BERT_LAYER[ours], D))
        for ours in ("up", "down"):
            t.update(_linear_out(layer["mlp"][ours], h + _BERT_LAYER[ours], m.ff_dim if ours == "down" else D))
        for ours in ("norm1", "norm2"):
            t.update(_norm_out(layer[ours], h + _BERT_LAYER[ours]))
    return t


def _t5_to_params(t: dict, cfg: Config) -> dict:
    from llm_jax.interop.hf_t5 import t5_to_params  # hf_t5 builds on this module's helpers

    return t5_to_params(t, cfg)


def _t5_from_params(params: dict, cfg: Config) -> dict[str, np.ndarray]:
    from llm_jax.interop.hf_t5 import t5_from_params

    return t5_from_params(params, cfg)


def _mamba_to_params(t: dict, cfg: Config) -> dict:
    from llm_jax.interop.hf_mamba import mamba_to_params  # hf_mamba builds on this module's helpers

    return mamba_to_params(t, cfg)


def _mamba_from_params(params: dict, cfg: Config) -> dict[str, np.ndarray]:
    from llm_jax.interop.hf_mamba import mamba_from_params

    return mamba_from_params(params, cfg)


TO_PARAMS: dict[str, Callable[[dict, Config], dict]] = {"gpt2": _gpt2_to_params, "llama": _llama_to_params,
                                                        "bert": _bert_to_params, "t5": _t5_to_params,
                                                        "mixtral": _llama_to_params, "mamba": _mamba_to_params}
FROM_PARAMS: dict[str, Callable[[dict, Config], dict]] = {"gpt2": _gpt2_from_params, "llama": _llama_from_params,
                                                          "bert": _bert_from_params, "t5": _t5_from_params,
                                                          "mixtral": _llama_from_params, "mamba": _mamba_from_params}


def params_from_hf(kind: str, tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    try:
        return TO_PARAMS[kind](tensors, cfg)
    except KeyError as exc:
        raise UserError(f"the {kind} checkpoint lacks tensor {exc.args[0]}") from None
