"""The adapter interface and the registry: one adapter per Hugging Face family.

An adapter knows one transformers class: how its config.json maps onto our `model` section and
back, when one of our configs is exactly that class, and how its weights map onto our parameter
tree and back. Each family module (`gpt2`, `llama`, ...) defines one and calls `register`;
`llm_jax.interop` imports them all. Everything else asks the registry, never names a family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from llm_jax.config import Config
from llm_jax.errors import UserError


class Adapter(ABC):
    """One Hugging Face model class <-> llm-jax."""

    name: ClassVar[str]
    """Our key for the family ("gpt2"), which import-hf and export-hf print."""
    model_type: ClassVar[str]
    """config.json's `model_type`."""
    hf_class: ClassVar[str]
    """The transformers class the weights load into ("GPT2LMHeadModel")."""
    arch: ClassVar[str]
    """The `model.arch` whose configs this adapter can export."""
    seq_len: ClassVar[int] = 1024
    """`train.seq_len` of an imported model, capped by its position table."""

    @abstractmethod
    def model_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The llm-jax `model` section of config.json's network (without vocab_size, which the
        caller adds), or a UserError naming what is not supported."""

    @abstractmethod
    def unsupported(self, cfg: Config) -> str | None:
        """None when this adapter exports `cfg` exactly, else one sentence saying why not."""

    @abstractmethod
    def hf_config(self, cfg: Config, eos_id: int | None, pad_id: int) -> dict[str, Any]:
        """config.json for `cfg` (which `unsupported` accepted)."""

    @abstractmethod
    def params_from_hf(self, tensors: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
        """Our parameter tree from the checkpoint's tensors (a KeyError names a missing tensor)."""

    @abstractmethod
    def params_to_hf(self, params: dict[str, Any], cfg: Config) -> dict[str, np.ndarray]:
        """The checkpoint's tensors from our parameter tree."""


_REGISTRY: dict[str, Adapter] = {}
_BY_ARCH: dict[str, list[Adapter]] = {}  # model.arch -> the adapters that write it


def register(adapter: Adapter) -> Adapter:
    """Add an adapter; its name and model_type must be new."""
    for other in _REGISTRY.values():
        if adapter.name == other.name or adapter.model_type == other.model_type:
            raise ValueError(f"adapter {adapter.name!r} (model_type {adapter.model_type!r}) is registered twice")
    _REGISTRY[adapter.name] = adapter
    _BY_ARCH.setdefault(adapter.arch, []).append(adapter)
    return adapter


def adapters() -> list[Adapter]:
    """Every adapter, in registration order."""
    return list(_REGISTRY.values())


def supported_model_types() -> str:
    """"gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM), ...": for messages and help texts."""
    return ", ".join(f"{a.model_type} ({a.hf_class})" for a in adapters())


def adapter_for_model_type(model_type: Any) -> Adapter:
    """The adapter reading config.json's `model_type`, or a UserError listing the supported ones."""
    for adapter in adapters():
        if adapter.model_type == model_type:
            return adapter
    raise UserError(f"model_type {model_type!r} is not supported (supported: {supported_model_types()})")


def adapter_for_config(cfg: Config) -> Adapter:
    """The adapter that exports `cfg` exactly, or one UserError saying why none does: the reasons
    of the adapters for its `model.arch`, or which architectures can be exported at all."""
    arch = cfg.model.arch
    same_arch = adapters_for_arch(arch)
    reasons = []
    for adapter in same_arch:
        reason = adapter.unsupported(cfg)
        if reason is None:
            return adapter
        reasons.append(reason)
    if not same_arch:
        writes = ", ".join(f"{a.hf_class} (model.arch={a.arch})" for a in adapters())
        raise UserError(f"model.arch={arch} has no Hugging Face equivalent here: export-hf writes {writes}")
    raise UserError(f"this {arch} model has no Hugging Face equivalent here: {'; '.join(reasons)}")


def adapters_for_arch(arch: str) -> list[Adapter]:
    """The adapters that write models of `model.arch` `arch` (in registration order)."""
    return list(_BY_ARCH.get(arch, ()))


def wrong_arch(adapter: Adapter, cfg: Config) -> str | None:
    """The reason when `cfg` is not of the adapter's `model.arch`."""
    if adapter not in adapters_for_arch(cfg.model.arch):
        return f"{adapter.hf_class} is model.arch={adapter.arch}, not {cfg.model.arch}"
    return None


def not_dense(adapter: Adapter, cfg: Config) -> str | None:
    """The reason a dense adapter cannot write `cfg`: another model.arch, or MoE layers."""
    if wrong := wrong_arch(adapter, cfg):
        return wrong
    if cfg.model.moe.enabled:
        return f"{adapter.hf_class} has dense MLPs, not MoE layers"
    return None


def needs(hf_class: str, checks: dict[str, tuple[Any, Any]]) -> str | None:
    """"HFClass needs model.x=want (not got), ..." for each `key: (got, want)` that differs."""
    wrong = [f"{key}={_show(want)} (not {_show(got)})" for key, (got, want) in checks.items() if got != want]
    return f"{hf_class} needs {', '.join(wrong)}" if wrong else None


def _show(value: Any) -> str:
    """A value as a KEY=VALUE override writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)
