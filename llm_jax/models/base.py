"""The model-family protocol and registry, and the one output type every model returns.

A family module (gpt, bert, encdec, recurrent, mamba) describes itself once with `register(Family(...))`:
which `model.arch` values it builds and what they are (`config.families.ArchSpec`: decoder,
encoder or encoder-decoder, objectives, positions, MoE), how to build the network, how to run
generation (its empty decode cache and decode steps, or none), and its training FLOPs per token.
Everything above the models asks the registry (`family_of`) instead of naming families, so a new
family is one module plus its line in `models/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from flax import nnx

from llm_jax.config import Config, ModelConfig
from llm_jax.config.families import ArchSpec, register_arch
from llm_jax.errors import UserError
from llm_jax.models.attention import resolve_kernel
from llm_jax.parallel.platform import target_platform


class ModelOutput(NamedTuple):
    """What every model returns: a pytree, so jitted functions can return it whole.

    `logits` [B, T, V] float32 over the vocabulary (None for a model without an LM head, such as
    a sequence classifier); `cache` the updated decode cache or recurrent state (None when the
    call had none); `aux` the other outputs by name: `moe` (routing statistics stacked over MoE
    layers, `models.moe.MoE`), `nsp_logits` [B, 2], `class_logits` [B, C].
    """

    logits: jax.Array | None
    cache: Any
    aux: dict[str, Any]


@dataclass(frozen=True)
class Dims:
    """The values a network's shape takes from outside `model.*`: the tokenizer, the run's
    lengths, the devices, the task."""

    vocab_size: int
    max_seq_len: int
    compute_dtype: str
    attention_kernel: str
    num_classes: int = 0  # a classification head with this many labels (a labelled data.task)
    nsp: bool = False  # a next-sentence prediction head (train.nsp)


class Decoding(Protocol):
    """How a generating family runs one jitted sampling loop (`inference.generate`).

    `prepare` pads the prompts on the host (and checks them against the model's limits);
    `start` runs the model over the prepared prompts and returns the logits [B, V] of the first
    new token with the loop's state; `step` feeds token i-1 ([B] int32) and returns the logits of
    token i and the new state. `continues_prompt`: the output continues the prompt's text (a
    decoder) rather than being a text of its own (an encoder-decoder's target).
    """

    continues_prompt: bool

    def prepare(self, cfg: Config, rows: list[list[int]], max_new_tokens: int, start_id: int,
                eos_id: int | None) -> dict[str, np.ndarray]: ...

    def start(self, model: nnx.Module, arrays: dict[str, jax.Array], max_new_tokens: int,
              cache_dtype: str) -> tuple[jax.Array, Any]: ...

    def step(self, model: nnx.Module, state: Any, token_B: jax.Array, i: jax.Array) -> tuple[jax.Array, Any]: ...


@dataclass(frozen=True)
class Family:
    """One model family: the archs it builds and what the layers above need from it."""

    name: str
    archs: dict[str, ArchSpec]  # model.arch -> its declaration (kind, objectives, positions, ...)
    build: Callable[[ModelConfig, Dims, nnx.Rngs], nnx.Module]
    flops_per_token: Callable[[Config, dict], float]  # training FLOPs per counted token, from param shapes
    decoding: Decoding | None = None  # None: the family does not generate (an encoder)
    describe: str = ""  # one line for the docs' family matrix


_FAMILIES: dict[str, Family] = {}
_BY_ARCH: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; its archs become valid `model.arch` values."""
    for arch, spec in family.archs.items():
        if arch in _BY_ARCH and _BY_ARCH[arch] is not family:
            raise ValueError(f"model.arch {arch!r} is already built by family {_BY_ARCH[arch].name!r}")
        register_arch(arch, spec)
        _BY_ARCH[arch] = family
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    return list(_FAMILIES.values())


def family_of(arch: str) -> Family:
    if arch not in _BY_ARCH:
        raise UserError(f"unknown model.arch {arch!r}; registered: {', '.join(_BY_ARCH)}")
    return _BY_ARCH[arch]


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
    return "float32" if target_platform() == "cpu" else "bfloat16"


def dims_of(cfg: Config, vocab_size: int, num_classes: int = 0) -> Dims:
    return Dims(vocab_size=vocab_size, max_seq_len=cfg.max_seq_len, compute_dtype=compute_dtype(cfg),
                attention_kernel=resolve_kernel(cfg.model.attention), num_classes=num_classes,
                nsp=cfg.train.nsp)


def build(cfg: Config, dims: Dims, rngs: nnx.Rngs) -> nnx.Module:
    """The network of `cfg` with the outside values `dims`, by its family's builder."""
    return family_of(cfg.model.arch).build(cfg.model, dims, rngs)


def build_model(cfg: Config, vocab_size: int, rngs: nnx.Rngs, num_classes: int = 0) -> nnx.Module:
    """The network of `cfg` for a vocabulary of `vocab_size` rows (a live NNX module)."""
    return build(cfg, dims_of(cfg, vocab_size, num_classes), rngs)
