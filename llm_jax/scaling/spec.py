"""A sweep spec: the YAML file that names a base config, compute budgets, model sizes and archs.

Specs ship as presets beside the configs (`llm_jax/sweeps/NAME.yaml`), or come as a path. The
fields and the rules they drive (tokens from the budget, learning rate, warmup) are documented
in docs/scaling.md; unknown keys and bad values are one-line user errors.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, model_validator

from llm_jax.config.loader import read_yaml_mapping
from llm_jax.errors import UserError

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"  # packaged with the configs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class SizeRule(_Strict):
    """One model per width; depth and heads follow from the width (Kaplan et al. keep the aspect
    ratio d_model / num_layers fixed across a sweep, which this rule does)."""

    widths: list[int] = pydantic.Field(min_length=1)
    """d_model of each size, smallest first or not: they are sorted."""
    aspect: float = pydantic.Field(32.0, gt=0)
    """num_layers = max(1, round(d_model / aspect))."""
    head_dim: int = pydantic.Field(16, ge=1)
    """num_heads = d_model / head_dim for families with attention; it must divide every width."""
    ff_mult: int = pydantic.Field(4, ge=1)
    """d_ff = ff_mult * d_model for families with an MLP."""

    @model_validator(mode="after")
    def _check(self) -> SizeRule:
        bad = [w for w in self.widths if w < 1]
        if bad:
            raise ValueError(f"sizes.widths must be positive, got {bad}")
        return self


class SweepSpec(_Strict):
    base: str
    """Config preset name or YAML path every run starts from."""
    overrides: list[str] = []
    """KEY=VALUE overrides applied to every run, after the base config."""
    budgets: list[float] = pydantic.Field(min_length=1)
    """Training compute budgets C in FLOPs (the project's count: flops_per_token * tokens)."""
    archs: list[str] = []
    """The arch axis: each sub-sweep's name, a registered model.arch (gpt, lstm, mamba, ...) or a
    variant that `arch_overrides` defines (e.g. moe); default: the base config's model.arch."""
    arch_overrides: dict[str, list[str]] = {}
    """Extra KEY=VALUE overrides per arch (e.g. an LSTM's learning rate), or a variant's definition
    (moe: [model.moe.num_experts=8, model.moe.top_k=2])."""
    sizes: SizeRule | None = None
    """The shape rule: one model per width. Give this or `shapes`."""
    shapes: list[dict[str, int | str | float]] = []
    """Explicit model shapes: mappings of model.* keys (d_model, num_layers, num_heads, ...)."""
    lr: float | None = pydantic.Field(None, gt=0)
    """Peak learning rate at the smallest width (default: the base config's optim.lr)."""
    lr_scaling: Literal["none", "inverse_width"] = "none"
    """none: the same lr for every size; inverse_width: lr * smallest width / d_model (muP-like)."""
    min_lr_ratio: float = pydantic.Field(0.1, ge=0, le=1)
    """optim.min_lr = min_lr_ratio * lr: the cosine decays to a tenth over each run (Chinchilla)."""
    warmup_max_fraction: float = pydantic.Field(0.1, ge=0, le=1)
    """Warmup steps = the steps that see as many tokens as the model has parameters (Porian et
    al. 2024), capped at this fraction of the run's steps."""
    min_steps: int = pydantic.Field(20, ge=1)
    """A (budget, size) pair whose run would be shorter than this is left out of the grid."""
    max_steps: int | None = pydantic.Field(None, ge=1)
    """A (budget, size) pair whose run would be longer than this is left out: a model far below
    the budget's optimum, whose many short steps would cost the most time on a host."""

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if (self.sizes is None) == (not self.shapes):
            raise ValueError("give either sizes (a shape rule) or shapes (explicit model shapes), not both or neither")
        bad = [c for c in self.budgets if not c > 0]
        if bad:
            raise ValueError(f"budgets must be positive FLOP counts, got {bad}")
        for i, shape in enumerate(self.shapes):
            if "d_model" not in shape:
                raise ValueError(f"shapes[{i}] has no d_model")
        unused = sorted(set(self.arch_overrides) - set(self.archs))
        if unused:
            raise ValueError(f"arch_overrides names {', '.join(unused)}, which archs does not list")
        return self


def spec_names() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def spec_path(name: str) -> Path:
    """A preset name (llm_jax/sweeps/NAME.yaml) or a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"sweep spec file not found: {path}")
        return path
    preset = SWEEPS_DIR / f"{name}.yaml"
    if not preset.is_file():
        hint = difflib.get_close_matches(name, spec_names(), n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else f"; presets: {', '.join(spec_names())}"
        raise UserError(f"no sweep preset or YAML file named '{name}'{extra}")
    return preset


def load_spec(name: str) -> SweepSpec:
    path = spec_path(name)
    data = read_yaml_mapping(path)
    try:
        return SweepSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise UserError(f"invalid sweep spec {path}: {_describe(exc)}") from None


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
