"""GPT2LMHeadModel <-> a `model.arch=gpt` decoder with learned positions, LayerNorm, GELU (tanh),
biases and tied embeddings.

GPT-2's Conv1D stores kernels as [in, out] (ours too, heads aside) and fuses q, k and v into one
`c_attn` of [D, 3D]; layer i is `transformer.h.{i}.`, the output layer is the token embedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.interop.base import Adapter, needs, not_dense, register
from llm_jax.interop.tree import stack_layers, unstack_layers

_P = "transformer."


class GPT2(Adapter):
    name = "gpt2"
    model_type = "gpt2"
    hf_class = "GPT2LMHeadModel"
    arch = "gpt"

    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation {hf['activation_function']!r} is not supported (gelu_new is)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise UserError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn "
                            "are not supported")
        return {"num_layers": hf["n_layer"], "d_model": hf["n_embd"], "num_heads": hf["n_head"],
                "d_ff": hf.get("n_inner") or 4 * hf["n_embd"], "max_seq_len": hf["n_positions"],
                "position": "learned", "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
                "mlp": "gelu", "use_bias": True, "tie_embeddings": True}

    def unsupported(self, cfg: Config) -> str | None:
        m = cfg.model
        if reason := not_dense(self, cfg):
            return reason
        return needs(self.hf_class, {"model.position": (m.position, "learned"), "model.norm": (m.norm, "layernorm"),
                                     "model.mlp": (m.mlp, "gelu"), "model.use_bias": (m.use_bias, True),
                                     "model.tie_embeddings": (m.tie_embeddings, True),
                                     "model.num_kv_heads": (m.kv_heads, m.num_heads)})

    def hf_config(self, cfg: Config, eos_id: int | None, pad_id: int) -> dict[str, Any]:
        m = cfg.model
        return {"architectures": [self.hf_class], "model_type": self.model_type, "vocab_size": m.vocab_size,
                "n_positions": cfg.max_seq_len, "n_embd": m.d_model, "n_layer": m.num_layers,
                "n_head": m.num_heads, "n_inner": m.ff_dim, "activation_function": "gelu_new",
                "layer_norm_epsilon": m.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": True, "bos_token_id": eos_id, "eos_token_id": eos_id}

    def params_from_hf(self, tensors: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
        t, m = tensors, cfg.model
        H, K, D = m.num_heads, m.head_dim, m.d_model
        layers = []
        for i in range(m.num_layers):
            h = f"{_P}h.{i}."
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
        return {"embed": {"embedding": t[_P + "wte.weight"]}, "pos_embed": {"embedding": t[_P + "wpe.weight"]},
                "blocks": stack_layers(layers),
                "final_norm": {"scale": t[_P + "ln_f.weight"], "bias": t[_P + "ln_f.bias"]}}

    def params_to_hf(self, params: dict[str, Any], cfg: Config) -> dict[str, np.ndarray]:
        m = cfg.model
        D = m.d_model
        t = {_P + "wte.weight": params["embed"]["embedding"], _P + "wpe.weight": params["pos_embed"]["embedding"],
             _P + "ln_f.weight": params["final_norm"]["scale"], _P + "ln_f.bias": params["final_norm"]["bias"]}
        for i, layer in enumerate(unstack_layers(params["blocks"], m.num_layers)):
            h = f"{_P}h.{i}."
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


register(GPT2())
