"""Hugging Face checkpoints <-> llm-jax: configs and weights of GPT2LMHeadModel, LlamaForCausalLM,
BertForMaskedLM, (in `hf_t5`) T5ForConditionalGeneration, (in `hf_mixtral`) MixtralForCausalLM and
(in `hf_mamba`) MambaForCausalLM.

A Hugging Face directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`), and usually `tokenizer.json`. Weights are read and written with
safetensors' numpy API, so neither torch nor transformers is needed here.

This module maps configs, reads and writes the files and decides which class a model is; the
weight layouts of each family are `hf_weights` (and `hf_t5`, `hf_mamba`, `hf_mixtral`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llm_jax.config import Config, validate
from llm_jax.errors import UserError
from llm_jax.interop.hf_weights import FROM_PARAMS, params_from_hf  # noqa: F401  (callers use hf.params_from_hf)
from llm_jax.models.bert import NUM_SEGMENTS

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM",
             "t5": "T5ForConditionalGeneration", "mixtral": "MixtralForCausalLM", "mamba": "MambaForCausalLM"}


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "config.yaml").exists()


def read_hf_config(path: Path) -> dict[str, Any]:
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {exc}") from None
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise UserError(f"{path}: model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    return hf


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}  # transformers 5 nests it; 4.x kept it at the top
    if (params.get("rope_type") or "default") != "default" or hf.get("rope_scaling"):
        raise UserError("scaled RoPE (rope_scaling / rope_type other than default) is not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, run_dir: str = "runs/hf") -> Config:
    """The llm-jax config of the same network; data keys point at the checkpoint's tokenizer."""
    kind = hf["model_type"]
    seq_len = None
    if kind == "t5":
        from llm_jax.interop.hf_t5 import t5_model_config

        model = t5_model_config(hf)
        seq_len = 512  # relative positions: no table bounds the length
    elif kind == "mamba":
        from llm_jax.interop.hf_mamba import mamba_model_config

        model = mamba_model_config(hf)
    elif kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation {hf['activation_function']!r} is not supported (gelu_new is)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise UserError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
        model = {"num_layers": hf["n_layer"], "d_model": hf["n_embd"], "num_heads": hf["n_head"],
                 "d_ff": hf.get("n_inner") or 4 * hf["n_embd"], "max_seq_len": hf["n_positions"],
                 "position": "learned", "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
                 "mlp": "gelu", "use_bias": True, "tie_embeddings": True}
    elif kind == "bert":
        if hf.get("hidden_act", "gelu") != "gelu":
            raise UserError(f"BERT activation {hf['hidden_act']!r} is not supported (gelu, the erf form, is)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UserError("BERT with relative position embeddings is not supported (absolute is)")
        if hf.get("type_vocab_size", 2) != NUM_SEGMENTS:
            raise UserError(f"BERT with type_vocab_size={hf['type_vocab_size']} is not supported ({NUM_SEGMENTS} is)")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise UserError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        model = {"arch": "bert", "num_layers": hf["num_hidden_layers"], "d_model": hf["hidden_size"],
                 "num_heads": hf["num_attention_heads"], "d_ff": hf["intermediate_size"],
                 "max_seq_len": hf["max_position_embeddings"], "position": "learned", "norm": "layernorm",
                 "norm_eps": hf.get("layer_norm_eps", 1e-12), "mlp": "gelu", "use_bias": True,
                 "tie_embeddings": bool(hf.get("tie_word_embeddings", True))}
    else:
        heads = hf["num_attention_heads"]
        if (hf.get("head_dim") or hf["hidden_size"] // heads) * heads != hf["hidden_size"]:
            raise UserError("Llama configs with head_dim * num_attention_heads != hidden_size are not supported")
        if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
            raise UserError("Llama variants with biases or a non-SiLU activation are not supported")
        model = {"num_layers": hf["num_hidden_layers"], "d_model": hf["hidden_size"], "num_heads": heads,
                 "num_kv_heads": hf.get("num_key_value_heads") or heads, "d_ff": hf["intermediate_size"],
                 "max_seq_len": hf["max_position_embeddings"], "position": "rope", "rope_theta": _rope_theta(hf),
                 "norm": "rmsnorm", "norm_eps": hf.get("rms_norm_eps", 1e-6), "mlp": "swiglu", "use_bias": False,
                 "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}
        if kind == "mixtral":
            from llm_jax.interop.hf_mixtral import mixtral_model_config

            model = mixtral_model_config(hf, model)
    model.update(vocab_size=hf["vocab_size"], vocab_multiple=1, dropout=0.0)
    seq_len = seq_len or min(1024, model["max_seq_len"])
    return validate({"run": {"dir": run_dir}, "model": model, "train": {"seq_len": seq_len, "src_len": seq_len}})


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path} has no model.safetensors (PyTorch .bin checkpoints are not read; "
                        "re-save with save_pretrained(safe_serialization=True))")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def family_of(cfg: Config) -> str:
    """Which Hugging Face class expresses this llm-jax config exactly, or a UserError saying why none does."""
    m = cfg.model
    if m.arch == "mamba":
        from llm_jax.interop.hf_mamba import mamba_supported

        if mamba_supported(cfg):
            return "mamba"
        raise UserError("this mamba model has no Hugging Face equivalent here: MambaForCausalLM is a pure, selective "
                        "Mamba stack (model.layer_pattern=[mamba]) with RMSNorm and tied embeddings")
    if m.moe.enabled and m.arch != "gpt":
        raise UserError(f"a model.arch={m.arch} with MoE layers has no Hugging Face equivalent here "
                        "(MixtralForCausalLM is a decoder)")
    if m.is_recurrent or m.arch == "transformer":
        raise UserError(f"model.arch={m.arch} has no Hugging Face equivalent here: export-hf writes "
                        "GPT-2, Llama, BERT or T5")
    if m.arch == "t5":
        from llm_jax.interop.hf_t5 import t5_supported

        if t5_supported(cfg):
            return "t5"
        raise UserError("this t5 model has no Hugging Face equivalent here: T5ForConditionalGeneration (v1.0) "
                        "needs relative positions, RMSNorm, ReLU, no biases, tied embeddings and multi-head attention")
    if m.arch == "bert":
        if cfg.objective == "classify":
            raise UserError("this bert model is a classifier (data.task); export-hf writes BertForMaskedLM, "
                            "which has the masked-LM head it replaced")
        if (m.position, m.norm, m.mlp, m.use_bias) == ("learned", "layernorm", "gelu", True) \
                and m.kv_heads == m.num_heads:
            return "bert"
        raise UserError("this bert model has no Hugging Face equivalent here: BertForMaskedLM needs learned "
                        "positions, LayerNorm, GELU, biases and multi-head attention")
    llama_like = (m.position, m.norm, m.mlp, m.use_bias) == ("rope", "rmsnorm", "swiglu", False)
    if m.moe.enabled:
        from llm_jax.interop.hf_mixtral import mixtral_supported

        if llama_like and mixtral_supported(cfg):
            return "mixtral"
        raise UserError("this MoE model has no Hugging Face equivalent here: MixtralForCausalLM needs a Llama "
                        "decoder (RoPE, RMSNorm, SwiGLU, no biases) with MoE in every block "
                        "(model.moe.every=1), renormalised top-k gates, no shared experts and no bias balancing")
    if (m.position, m.norm, m.mlp, m.use_bias, m.tie_embeddings) == ("learned", "layernorm", "gelu", True, True) \
            and m.kv_heads == m.num_heads:
        return "gpt2"
    if llama_like:
        return "llama"
    raise UserError("this model has no Hugging Face equivalent here: export-hf writes GPT-2 (learned positions, "
                    "LayerNorm, GELU, biases, tied, multi-head) or Llama (RoPE, RMSNorm, SwiGLU, no biases)")


def hf_config_of(cfg: Config, kind: str, eos_id: int | None, pad_id: int = 0) -> dict[str, Any]:
    m = cfg.model
    vocab = m.vocab_size
    if kind == "t5":
        from llm_jax.interop.hf_t5 import t5_hf_config

        return t5_hf_config(cfg, eos_id, pad_id)
    if kind == "mamba":
        from llm_jax.interop.hf_mamba import mamba_hf_config

        return mamba_hf_config(cfg, eos_id)
    if kind == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
                "n_positions": cfg.max_seq_len, "n_embd": m.d_model, "n_layer": m.num_layers,
                "n_head": m.num_heads, "n_inner": m.ff_dim, "activation_function": "gelu_new",
                "layer_norm_epsilon": m.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": True, "bos_token_id": eos_id, "eos_token_id": eos_id}
    if kind == "bert":
        return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab,
                "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
                "intermediate_size": m.ff_dim, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0, "max_position_embeddings": cfg.max_seq_len,
                "type_vocab_size": NUM_SEGMENTS, "layer_norm_eps": m.norm_eps,
                "position_embedding_type": "absolute", "tie_word_embeddings": m.tie_embeddings}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
             "hidden_size": m.d_model, "intermediate_size": m.ff_dim, "num_hidden_layers": m.num_layers,
             "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
             "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
             "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
             "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
             "tie_word_embeddings": m.tie_embeddings, "bos_token_id": eos_id, "eos_token_id": eos_id}
    if kind == "mixtral":
        from llm_jax.interop.hf_mixtral import mixtral_hf_config

        return mixtral_hf_config(cfg, llama)
    return llama


def write_hf(out: Path, cfg: Config, params: dict, tokenizer_json: Path | None, eos_id: int | None,
             pad_id: int = 0) -> str:
    """Write config.json, model.safetensors (and tokenizer.json) that transformers loads."""
    from safetensors.numpy import save_file

    kind = family_of(cfg)
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in FROM_PARAMS[kind](params, cfg).items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_of(cfg, kind, eos_id, pad_id), indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return kind
