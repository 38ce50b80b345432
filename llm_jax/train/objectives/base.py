"""The objective protocol and registry, and the token loss the objectives share.

An objective turns a batch of int32 rows into (model inputs, targets, weights) and scores the
model's `ModelOutput` against them: a summed loss, the number of scored targets, and how many the
argmax gets right. Heads other than the LM head (next-sentence, class labels) are scored from the
output's `aux`, by the objective that owns them. Random draws (masks, spans) come from a key that
depends only on (seed, step), so a resumed run and any mesh see the same ones; evaluation uses the
fixed step EVAL_STEP, so every evaluation scores the same corruption.

An objective may declare `needs_reference`: the train state then also holds `ref_params`, a
frozen copy of the parameters at step 0, and the steps run that reference model on the same
inputs (no gradient, no dropout) and hand its output to `add_reference`, which folds what the
loss needs of it (per-sequence log-probabilities, say) into the targets. An objective may also
report `metrics`: sums over the batch that the train step divides by the count of scored targets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.models.base import ModelOutput

# The held-out loss uses the draws of this (never trained) step number for every evaluation: the
# same positions are scored each time, so evaluations along a run compare like with like.
EVAL_STEP = 2**31 - 1
# (model inputs, targets, weights): targets and weights are arrays or dicts of arrays with the
# batch on their leading axis; weights None: every target counts.
Data = tuple[dict[str, jax.Array], Any, Any]


@dataclass(frozen=True)
class Vocab:
    """What an objective needs to know of the tokenizer and the model's token table."""

    size: int  # the tokenizer's ids: [0, size)
    rows: int  # rows of the model's token table (size plus padding rows)
    eos_id: int
    lookup: Callable[[str], int | None] | None = None  # the tokenizer's special tokens, by name

    def special(self, name: str) -> int | None:
        return self.lookup(name) if self.lookup is not None else None


def step_key(seed: int, step: jax.Array | int, stream: int) -> jax.Array:
    """The key of one step's draws for an objective's `stream`: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)


def extra_id(name: str, index: int, vocab: Vocab) -> int:
    """The tokenizer's own `name` token, else padding row `vocab.size + index` (the rows after
    the tokenizer's ids: [MASK] is index 0, [CLS] 1, [SEP] 2)."""
    found = vocab.special(name)
    if found is not None:
        return int(found)
    if vocab.size + index >= vocab.rows:
        raise UserError(f"the tokenizer has no {name} token and model.vocab_size={vocab.rows} leaves no padding "
                        f"row for it after its {vocab.size} ids; raise model.vocab_size (or model.vocab_multiple)")
    return vocab.size + index


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array, smoothing: float = 0.0,
                 smoothing_ids: int = 0) -> jax.Array:
    """Cross entropy per target, float32. With `smoothing` > 0 each target keeps 1 - smoothing of
    its probability and the rest is spread evenly over ids [0, smoothing_ids) (Szegedy et al.
    2016): the loss adds smoothing * mean(-log p) over them."""
    if smoothing > 0:
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
        return (1 - smoothing) * nll_BT - smoothing * logp_BTV[..., :smoothing_ids].mean(-1)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)


def scored(targets: jax.Array, weights: jax.Array | None) -> jax.Array:
    """How many of `targets` the weights select (all of them when weights is None)."""
    return jnp.asarray(targets.size, jnp.float32) if weights is None else weights.sum()


def weighted_sum(values: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(sum of values where weights select, their count); weights None: all count."""
    total = values.sum() if weights is None else (values * weights).sum()
    return total, scored(values, weights)


def argmax_hits(logits: jax.Array, targets: jax.Array, weights: jax.Array | None) -> jax.Array:
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return hits.sum() if weights is None else (hits * weights).sum()


class Objective(ABC):
    """What the train and eval steps need: rows -> (inputs, targets, weights), and the scores."""

    name: ClassVar[str]
    # True: the steps run a frozen reference model (the parameters at step 0) and pass its
    # output through `add_reference` before the loss (DPO).
    needs_reference: ClassVar[bool] = False
    # Sequences of train.seq_len tokens the model reads per batch row (2: a preference pair),
    # for tokens/s and MFU.
    sequences_per_row: ClassVar[int] = 1

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> Objective:
        """The objective `cfg` asks for, with the special ids of `vocab`."""

    @staticmethod
    def row_width(cfg: Config) -> int:
        """Tokens per batch row: a window of train.seq_len + 1 unless the objective says otherwise."""
        return cfg.train.seq_len + 1

    @abstractmethod
    def data(self, rows: jax.Array, step: jax.Array | int) -> Data:
        """Model inputs, targets and weights of a batch of rows at training step `step`
        (the key of random draws; EVAL_STEP for evaluation)."""

    @abstractmethod
    def loss(self, out: ModelOutput, targets: Any, weights: Any, train: bool) -> tuple[jax.Array, jax.Array]:
        """(summed loss, count of scored targets), float32; `train` adds label smoothing."""

    @abstractmethod
    def hits(self, out: ModelOutput, targets: Any, weights: Any) -> jax.Array:
        """How many scored targets the argmax predicts."""

    @abstractmethod
    def count(self, targets: Any, weights: Any) -> jax.Array:
        """How many targets the loss scores (float32); the train step divides by it."""

    def add_reference(self, ref_out: ModelOutput, targets: Any, weights: Any) -> Any:
        """`needs_reference` objectives: the targets with what the loss needs of the reference
        model's output on the same inputs (the steps wrap it in stop_gradient)."""
        raise NotImplementedError(f"objective {self.name} does not use a reference model")

    def metrics(self, out: ModelOutput, targets: Any, weights: Any) -> dict[str, jax.Array]:
        """Further training metrics by name, each summed over the batch's scored targets (the
        train step reports sum / count, like the loss); none by default."""
        return {}


@dataclass(frozen=True)
class TokenObjective(Objective, ABC):
    """Objectives scored by cross entropy of the LM logits against target tokens."""

    smoothing: float = 0.0  # label smoothing of the training loss
    smoothing_ids: int = 0  # spread over ids [0, smoothing_ids): the tokenizer's, not padding rows

    def loss(self, out: ModelOutput, targets: Any, weights: Any, train: bool) -> tuple[jax.Array, jax.Array]:
        smoothing = self.smoothing if train else 0.0
        return weighted_sum(token_losses(out.logits, targets, smoothing, self.smoothing_ids), weights)

    def hits(self, out: ModelOutput, targets: Any, weights: Any) -> jax.Array:
        return argmax_hits(out.logits, targets, weights)

    def count(self, targets: Any, weights: Any) -> jax.Array:
        return scored(targets, weights)


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: `cls.name` becomes a value of `Config.objective`."""
    OBJECTIVES[cls.name] = cls
    return cls


def build_objective(cfg: Config, vocab: Vocab) -> Objective:
    if cfg.objective not in OBJECTIVES:
        raise UserError(f"no objective named {cfg.objective!r}; registered: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective].from_config(cfg, vocab)


def row_width(cfg: Config) -> int:
    """Tokens per batch row of `cfg`'s objective."""
    return OBJECTIVES[cfg.objective].row_width(cfg)
