"""From a sweep spec to the runs of its grid: for each arch, budget C and model size N, the
tokens D = C / flops_per_token (whole steps), the learning rate and warmup, and the exact
`llm-jax train` arguments.

FLOPs per token are the project's own count, the family's `flops_per_token` (the one MFU uses):
6 x the parameters that take part in a token's matmuls (the output layer included, tied or not;
embedding and position lookups excluded) plus the attention-score term. The CSV carries both
parameter counts: `params` (every parameter) and `params_nonembed` (without the token and
position tables and an untied output layer, Kaplan et al.'s N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm_jax.config import Config, load_config
from llm_jax.config.families import arch_spec
from llm_jax.config.schema import SUPERVISED_FORMATS
from llm_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from llm_jax.errors import UserError
from llm_jax.models.base import family_of, model_vocab_size
from llm_jax.models.definition import model_def
from llm_jax.paths import safe_child
from llm_jax.scaling.spec import SweepSpec

# Settings every sweep run starts from (a spec's overrides may change them): evaluate and save
# once, at the end, and skip the sample, since only the final held-out loss is wanted.
RUN_DEFAULTS = ("train.eval_every=0", "checkpoint.every=0", "train.sample_tokens=0", "train.progress=false")
# Tables that are looked up, not multiplied: Kaplan's N leaves them out.
EMBEDDING_TABLES = ("embed", "pos_embed", "segment_embed")


@dataclass(frozen=True)
class PlannedRun:
    name: str
    arch: str
    budget: float  # the requested C
    shape: dict  # model.* keys of this size
    params: int
    params_nonembed: int
    flops_per_token: float
    steps: int
    tokens: int  # steps * batch_size * seq_len: what the run trains on
    flops: float  # flops_per_token * tokens: the run's actual compute
    lr: float
    warmup_steps: int
    config: str  # the base config
    overrides: tuple[str, ...] = field(default=())  # run.dir first

    @property
    def run_dir(self) -> Path:
        return Path(self.overrides[0].removeprefix("run.dir="))

    def train_args(self) -> list[str]:
        """The arguments after `llm-jax train`."""
        return [self.config, *self.overrides]


@dataclass(frozen=True)
class SweepPlan:
    runs: list[PlannedRun]
    left_out: list[str]  # (budget, size) pairs below min_steps, described


def budget_label(c: float) -> str:
    """1e+12 -> '1e12', 3.2e+13 -> '3.2e13': short, file-name safe."""
    mantissa, exponent = f"{c:.3g}".split("e") if "e" in f"{c:.3g}" else (f"{c:.3g}", "0")
    return f"{mantissa}e{int(exponent)}"


def tokenizer_vocab(cfg: Config) -> int:
    """The tokenizer's vocabulary without building the data (a sweep plans before any run)."""
    spec = cfg.data.tokenizer
    if spec == "byte":
        return ByteTokenizer.vocab_size
    if spec == "sentencepiece":
        return cfg.data.sp_vocab_size
    if spec.startswith("hf:"):
        return HFTokenizer(Path(spec[3:])).vocab_size
    raise UserError(f"data.tokenizer={spec!r} is not byte, sentencepiece or hf:PATH")


def sizes_of(spec: SweepSpec) -> list[dict]:
    """The model.* keys of each size, smallest width first."""
    if spec.shapes:
        return sorted((dict(s) for s in spec.shapes), key=lambda s: int(s["d_model"]))
    rule = spec.sizes
    shapes = []
    for width in sorted(set(rule.widths)):
        if width % rule.head_dim:
            raise UserError(f"sizes: width {width} is not a multiple of head_dim={rule.head_dim}, "
                            "so the heads would not divide d_model")
        shapes.append({"d_model": width, "num_layers": max(1, round(width / rule.aspect)),
                       "num_heads": width // rule.head_dim, "d_ff": rule.ff_mult * width})
    return shapes


def _shape_overrides(shape: dict, attends: bool) -> list[str]:
    # Families without attention or MLP (LSTM, Mamba) would refuse or ignore heads and d_ff.
    skip = () if attends else ("num_heads", "num_kv_heads", "d_ff")
    return [f"model.{k}={v}" for k, v in shape.items() if k not in skip]


def _arch_args(spec: SweepSpec, label: str) -> list[str]:
    """The overrides that make the base config one entry of the arch axis: a registered model.arch
    by name, plus its arch_overrides; or a variant (moe, a hybrid, ...) that only its arch_overrides
    define, on top of the base config's model.arch."""
    extra = list(spec.arch_overrides.get(label, []))
    try:
        arch_spec(label)
    except ValueError as exc:
        if not extra:
            raise UserError(f"sweep archs: {exc}; a variant name needs arch_overrides that say what it is "
                            "(e.g. moe: [model.moe.num_experts=8])") from None
        return extra
    return [f"model.arch={label}", *extra]


def _counts(cfg: Config) -> tuple[int, int, float]:
    """(params, params_nonembed, flops_per_token) of the model `cfg` describes."""
    mdef = model_def(cfg, model_vocab_size(cfg, tokenizer_vocab(cfg)))
    total = mdef.num_params
    tables = sum(int(np.prod(leaf.shape)) for name in EMBEDDING_TABLES if name in mdef.shapes
                 for leaf in _leaves(mdef.shapes[name]))
    head = sum(int(np.prod(leaf.shape)) for leaf in _leaves(mdef.shapes.get("head", {})))
    return total, total - tables - head, float(family_of(cfg.model.arch).flops_per_token(cfg, mdef.shapes))


def _leaves(tree) -> list:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]


def plan_sweep(spec: SweepSpec, sweep_dir: Path) -> SweepPlan:
    base = load_config(spec.base, spec.overrides)
    archs = spec.archs or [base.model.arch]
    shapes = sizes_of(spec)
    smallest = int(shapes[0]["d_model"])
    peak_lr = spec.lr or base.optim.lr
    runs, left_out = [], []
    for arch in archs:
        arch_args = _arch_args(spec, arch)
        try:
            model = load_config(spec.base, [*spec.overrides, *arch_args]).model
        except UserError as exc:
            raise UserError(f"sweep arch {arch}: {exc}") from None
        attends = arch_spec(model.arch).attends(model)
        for i, shape in enumerate(shapes):
            shape_args = _shape_overrides(shape, attends)
            try:
                cfg = load_config(spec.base, [*RUN_DEFAULTS, *spec.overrides, *arch_args, *shape_args])
            except UserError as exc:
                raise UserError(f"sweep size {i} ({', '.join(shape_args)}) for {arch}: {exc}") from None
            if cfg.data.task:
                raise UserError(f"a sweep models a corpus; the base config sets data.task={cfg.data.task}")
            if cfg.data.format in SUPERVISED_FORMATS:  # (format=auto is resolved only when a run starts)
                raise UserError(f"a sweep models a corpus; the base config sets data.format={cfg.data.format}")
            params, nonembed, per_token = _counts(cfg)
            width = int(cfg.model.d_model)
            lr = peak_lr * (smallest / width if spec.lr_scaling == "inverse_width" else 1.0)
            tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
            for budget in sorted(spec.budgets):
                steps = round(budget / (per_token * tokens_per_step))
                label = f"{arch}_C{budget_label(budget)}_d{width}_L{cfg.model.num_layers}"
                if steps < spec.min_steps:
                    left_out.append(f"{label}: {steps} steps < min_steps={spec.min_steps}")
                    continue
                if spec.max_steps is not None and steps > spec.max_steps:
                    left_out.append(f"{label}: {steps} steps > max_steps={spec.max_steps}")
                    continue
                warmup = min(math.ceil(params / tokens_per_step), int(spec.warmup_max_fraction * steps))
                # The label holds the arch's name from the spec: it must stay one directory under runs/.
                run_dir = safe_child(sweep_dir / "runs", label, "sweep run name")
                overrides = (f"run.dir={run_dir}", *RUN_DEFAULTS, *spec.overrides, *arch_args, *shape_args,
                             f"train.steps={steps}", f"optim.lr={lr:.6g}", f"optim.min_lr={lr * spec.min_lr_ratio:.6g}",
                             f"optim.warmup_steps={warmup}", f"run.name={label}")
                tokens = steps * tokens_per_step
                runs.append(PlannedRun(label, arch, budget, shape, params, nonembed, per_token, steps, tokens,
                                       per_token * tokens, lr, warmup, spec.base, overrides))
    _check_budgets(spec, runs, archs)
    return SweepPlan(runs, left_out)


def _check_budgets(spec: SweepSpec, runs: list[PlannedRun], archs: list[str]) -> None:
    """Every budget needs at least its smallest model: else the budget is too small for the grid."""
    for arch in archs:
        for budget in spec.budgets:
            if not any(r.arch == arch and r.budget == budget for r in runs):
                raise UserError(f"budget {budget:.3g} FLOPs is too small for the smallest {arch} model: it would train "
                                f"fewer than min_steps={spec.min_steps} steps; raise the budget or add a smaller size")
