"""Data: corpus sources, tokenizers, the token cache and the Grain pipeline.

    bundle = build_data(cfg, run_dir)            # tokenizer + cached token streams
    ds = train_dataset(bundle.train_tokens, ...)  # ds[step] -> this process's rows of the batch
    it = BatchIterator(ds, start, end, prefetch, to_global)

The names below load on first use: importing a light submodule (`llm_jax.data.synthetic`, say)
must not import Grain and TFDS, which a machine that only runs `bench` or a synthetic task may lack.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"DataBundle": "build", "build_data": "build", "load_tokenizer": "build",
            "BatchIterator": "iterator", "eval_batches": "pipeline", "train_dataset": "pipeline",
            "Tokenizer": "tokenizer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llm_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llm_jax.data.{_EXPORTS[name]}"), name)
