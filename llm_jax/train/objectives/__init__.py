"""Training objectives: a registry of small classes (`base.Objective`), one per `Config.objective`.

    causal         next token (gpt, recurrent, mamba)             objectives/causal.py
    masked_causal  next token where the rows' weights are 1        objectives/causal.py
                   (synthetic answers; prompt/completion, chat)
    mlm            masked LM, optionally + next sentence (bert)   objectives/masked_lm.py
    span           span corruption (t5 pretraining)               objectives/span.py
    seq2seq        a task's target given its source               objectives/tasks.py
    classify       a task's label from the classifier head        objectives/tasks.py
    reward         a reward model on preference pairs             objectives/preference.py
    dpo            DPO and its variants on preference pairs       objectives/preference.py
"""

from __future__ import annotations

from typing import Any

from llm_jax.config import Config
from llm_jax.train.objectives import causal, masked_lm, preference, span, tasks  # noqa: F401  (each registers its objectives)
from llm_jax.train.objectives.base import (
    EVAL_STEP,
    OBJECTIVES,
    Objective,
    Vocab,
    build_objective,
    row_width,
    token_losses,
)

__all__ = ["EVAL_STEP", "OBJECTIVES", "Objective", "Vocab", "build_objective", "row_width", "token_losses",
           "tokenizer_objective", "tokenizer_vocab"]


def tokenizer_vocab(tokenizer: Any, model_vocab: int) -> Vocab:
    """The `Vocab` of a tokenizer object (`vocab_size`, `eos_id`, optional `token_id`)."""
    return Vocab(tokenizer.vocab_size, model_vocab, tokenizer.eos_id, getattr(tokenizer, "token_id", None))


def tokenizer_objective(cfg: Config, tokenizer: Any, model_vocab: int) -> Objective:
    return build_objective(cfg, tokenizer_vocab(tokenizer, model_vocab))
