"""What the config needs to know about each model family, declared by the family itself.

Validation of `model.arch` and of the keys that depend on it reads these declarations instead
of naming families: each family module in `llm_jax.models` registers an `ArchSpec` for every
`model.arch` value it builds (`models.base.register`), so adding a family edits no module here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["decoder", "encoder", "encoder-decoder"]
# Objectives that read a supervised or synthetic data.task rather than the raw corpus.
TASK_OBJECTIVES = ("seq2seq", "classify", "masked_causal")


@dataclass(frozen=True)
class ArchSpec:
    """The structural facts of one `model.arch` that config validation and the layers above use."""

    kind: Kind
    """decoder (causal LM), encoder (bidirectional, does not generate) or encoder-decoder."""
    objectives: tuple[str, ...]
    """Objectives it trains; the first is the default when no data.task is set."""
    positions: tuple[str, ...] = ()
    """model.position values it takes; empty: order comes from a recurrence, no table bounds the length."""
    moe: bool = False
    """Whether model.moe replaces the MLP of every model.moe.every-th block."""
    keys: tuple[str, ...] = ()
    """Family-specific model keys it reads (e.g. layer_pattern); other archs refuse them."""
    attends: Callable[[Any], bool] = lambda model: True
    """model section -> whether it has attention heads (then num_heads, num_kv_heads are checked)."""
    check: Callable[[Any], None] | None = field(default=None)
    """Family-specific validation of the model section: raises ValueError naming the keys."""


ARCHS: dict[str, ArchSpec] = {}


def register_arch(name: str, spec: ArchSpec) -> None:
    if name in ARCHS and ARCHS[name] != spec:
        raise ValueError(f"model.arch {name!r} is registered twice")
    ARCHS[name] = spec


def arch_spec(name: str) -> ArchSpec:
    if name not in ARCHS:
        raise ValueError(f"unknown model.arch {name!r}; registered: {', '.join(ARCHS)}")
    return ARCHS[name]


def archs_where(test: Callable[[ArchSpec], bool]) -> list[str]:
    """The registered archs whose spec passes `test`, in registration order (for messages)."""
    return [name for name, spec in ARCHS.items() if test(spec)]


def either(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
