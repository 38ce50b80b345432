"""llm-jax: a JAX/Flax NNX training stack for language models.

    model = llm_jax.load("runs/gpt_small")   # a run directory or a Hugging Face checkpoint
    model.generate("def ", max_new_tokens=100)
"""

from llm_jax import models  # noqa: F401  (registers every model family before any config is read)
from llm_jax.errors import UserError
from llm_jax.inference.api import load

__all__ = ["UserError", "load"]
