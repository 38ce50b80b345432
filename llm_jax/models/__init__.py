"""Model families. Importing this package registers every family (`models.base.register`): the
list below is the registry; a new family is one module plus one line here."""

from llm_jax.models import bert, encdec, gpt, mamba, recurrent  # noqa: F401  (each registers its family)
