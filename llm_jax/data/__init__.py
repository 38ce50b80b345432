"""Data: corpus sources, tokenizers, the token store (cache) and the Grain pipeline.

    bundle = build_data(cfg, run_dir)            # tokenizer + cached token streams (TokenStore)
    ds = train_dataset(bundle.train_tokens, ...)  # ds[step] -> this process's rows of the batch
    it = BatchIterator(ds, start, end, prefetch, to_global)

A data.mixture's bundle keeps its sources apart (`bundle.mixture`); `mixture.mixture_dataset`
interleaves them by weight with the same contract as `train_dataset`.

Grain and TFDS are imported where they are used, so a machine that only runs `bench` or a
synthetic task (the GPU image has neither) imports this package.
"""

from llm_jax.data.build import DataBundle, build_data, load_tokenizer
from llm_jax.data.iterator import BatchIterator
from llm_jax.data.pipeline import eval_batches, train_dataset
from llm_jax.data.sft_rows import resolve_format
from llm_jax.data.tokenizer import Tokenizer

__all__ = ["BatchIterator", "DataBundle", "Tokenizer", "build_data", "eval_batches", "load_tokenizer",
           "resolve_format", "train_dataset"]
