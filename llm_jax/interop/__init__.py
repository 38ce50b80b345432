"""Hugging Face interop: one adapter per transformers class behind one interface (`base`).

`convert.read_hf_model` / `write_hf_model` turn a Hugging Face directory into an llm-jax config and
parameters and back; `pretrained` serves `export-hf` and `checkpoint.init_from` (import-hf, which
writes a train state, is `llm_jax.train.import_hf`).
"""

# The registry: importing a family module registers its adapter, in this order. A new Hugging
# Face family is one module here plus one line in this list.
from llm_jax.interop import gpt2, llama, mixtral, bert, t5, mamba  # noqa: F401, I001  (registers the adapters)
from llm_jax.interop.base import Adapter, adapter_for_config, adapter_for_model_type, adapters
from llm_jax.interop.convert import config_from_hf, read_hf_model, write_hf_model
from llm_jax.interop.files import is_hf_dir

__all__ = ["Adapter", "adapter_for_config", "adapter_for_model_type", "adapters", "config_from_hf", "is_hf_dir",
           "read_hf_model", "write_hf_model"]
