"""Pick the model class by `model.arch` and fill the values derived from config and devices."""

from __future__ import annotations

import jax
from flax import nnx

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.models.attention import resolve_kernel
from llm_jax.models.bert import Bert
from llm_jax.models.encdec import EncoderDecoder
from llm_jax.models.gpt import GPT
from llm_jax.models.mamba import MambaLM
from llm_jax.models.recurrent import RECURRENT_ARCHS, RecurrentLM


def model_vocab_size(cfg: Config, tokenizer_vocab: int) -> int:
    """`model.vocab_size`, or the tokenizer's vocabulary padded up to `model.vocab_multiple`."""
    if cfg.model.vocab_size is not None:
        if cfg.model.vocab_size < tokenizer_vocab:  # ids past the table would train to NaN
            raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                            f"{tokenizer_vocab} ids; raise it or leave it unset")
        return cfg.model.vocab_size
    m = cfg.model.vocab_multiple
    return -(-tokenizer_vocab // m) * m


def compute_dtype(cfg: Config) -> str:
    """`auto`: bfloat16 where the hardware has fast bf16 matmuls (GPU, TPU), float32 on CPU."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def build_model(cfg: Config, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.model.arch == "gpt":
        return GPT(cfg.model, vocab_size, cfg.max_seq_len, compute_dtype=compute_dtype(cfg),
                   attention_kernel=resolve_kernel(cfg.model.attention), rngs=rngs)
    if cfg.model.arch == "bert":
        classes = 0
        if cfg.objective == "classify":
            from llm_jax.data.tasks import num_classes  # the task's labels live with its examples

            classes = num_classes(cfg.data.task)
        return Bert(cfg.model, vocab_size, cfg.max_seq_len, compute_dtype=compute_dtype(cfg),
                    attention_kernel=resolve_kernel(cfg.model.attention), rngs=rngs, num_classes=classes,
                    nsp=cfg.train.nsp)
    if cfg.model.is_encoder_decoder:
        return EncoderDecoder(cfg.model, vocab_size, cfg.max_seq_len, compute_dtype=compute_dtype(cfg),
                              attention_kernel=resolve_kernel(cfg.model.attention), rngs=rngs)
    if cfg.model.arch == "mamba":
        return MambaLM(cfg.model, vocab_size, cfg.max_seq_len, compute_dtype=compute_dtype(cfg),
                       attention_kernel=resolve_kernel(cfg.model.attention), rngs=rngs)
    if cfg.model.arch in RECURRENT_ARCHS:
        return RecurrentLM(cfg.model, vocab_size, compute_dtype=compute_dtype(cfg), rngs=rngs)
    raise ValueError(f"unknown model.arch {cfg.model.arch!r}")  # config validation lists the choices
