"""llm-jax: a JAX/Flax NNX training stack for language models."""

from llm_jax import models  # noqa: F401  (registers every model family before any config is read)
from llm_jax.errors import UserError

__all__ = ["UserError", "load"]


def load(path, **kwargs):
    """Load a run directory; see `llm_jax.inference.api.load`."""
    from llm_jax.inference.api import load as _load
    return _load(path, **kwargs)
