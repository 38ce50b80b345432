"""One step of the sampling loop, lowered for a TPU mesh (`llm-jax compile`).

The inference API runs a model on one device (`inference.api`); for sizing a pod, this lowers the
loop's body on the training mesh instead: the family's `Decoding.step` (models/decoding: KV
cache, recurrent or SSM state) followed by `inference.generate.sample_logits`. Parameters are
laid out as in training (float32, sharded by the logical-axis rules); the decode state's batch
dimension is split over the batch-parallel axes (data, fsdp, expert) and its other dimensions
are whole on every chip; the state is donated, as the loop's carry is updated in place.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import Config
from llm_jax.inference.generate import sample_logits
from llm_jax.models.base import compute_dtype, family_of
from llm_jax.models.decoding import PROMPT_BUCKET
from llm_jax.models.definition import ModelDef, param_shardings
from llm_jax.parallel.rules import activation_mesh, named_sharding, sharded_shapes


def shard_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def _abstract_start(cfg: Config, mdef: ModelDef, batch: int, prompt: int, new_tokens: int) -> Any:
    """Shapes of the decode state after the prompt (nothing computed)."""
    decoding = family_of(cfg.model.arch).decoding
    arrays = decoding.prepare(cfg, [[1] * prompt] * batch, new_tokens, start_id=0, eos_id=None)
    dtype = compute_dtype(cfg)
    _, state = jax.eval_shape(lambda p, a: decoding.start(mdef.merge(p), a, new_tokens, dtype), mdef.shapes, arrays)
    return state


def _batch_dims(one: Any, other: Any) -> Any:
    """Per leaf, the dimension that changed with the batch size (None: the leaf has none)."""
    def dim(a, b):
        changed = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        return changed[0] if changed else None
    return jax.tree.map(dim, one, other)


def _state_sharding(mesh: Mesh, leaf: Any, batch_dim: int | None) -> NamedSharding:
    if batch_dim is None:
        return NamedSharding(mesh, P())
    names = [None] * len(leaf.shape)
    names[batch_dim] = "batch"  # split where the batch divides over the batch-parallel axes
    return named_sharding(mesh, names, leaf.shape)


def lower_decode_step(cfg: Config, mdef: ModelDef, mesh: Mesh) -> str | tuple[Callable[[], Any], dict, int]:
    """(a function that lowers the step, what it decodes, argument bytes per chip), or a sentence
    saying why the family has no decode step. Decodes train.batch_size rows with a cache of
    train.seq_len slots (a prompt of one bucket, then new tokens)."""
    decoding = family_of(cfg.model.arch).decoding
    if decoding is None:
        return f"none: model.arch={cfg.model.arch} is an encoder and does not generate"
    batch, slots = cfg.train.batch_size, cfg.train.seq_len
    if decoding.continues_prompt:  # prompt slots, then one per new token
        prompt, new_tokens = PROMPT_BUCKET, max(slots - PROMPT_BUCKET, 1)
    else:  # an encoder-decoder: a source of seq_len, a target cache of seq_len
        prompt, new_tokens = slots - 1, slots
    state = _abstract_start(cfg, mdef, batch, prompt, new_tokens)
    dims = _batch_dims(state, _abstract_start(cfg, mdef, batch + 1, prompt, new_tokens))
    state_shardings = jax.tree.map(lambda leaf, d: _state_sharding(mesh, leaf, d), state, dims)
    replicated = NamedSharding(mesh, P())
    rows = named_sharding(mesh, ("batch",), (batch,))
    pshard = param_shardings(mdef, mesh)

    def step(params, state, token_B, i, key_data, temperature, top_p):
        with activation_mesh(mesh):
            logits_BV, state = decoding.step(mdef.merge(params), state, token_B, i)
            key = jax.random.wrap_key_data(key_data)
            next_B = sample_logits(logits_BV, jax.random.fold_in(key, i), temperature, jnp.int32(0), top_p,
                                   vocab_limit=None)
        return next_B, state

    jitted = jax.jit(step, in_shardings=(pshard, state_shardings, rows, replicated, replicated, replicated, replicated),
                     out_shardings=(rows, state_shardings), donate_argnums=(1,))
    args = (
        sharded_shapes(mdef.shapes, pshard),
        sharded_shapes(state, state_shardings),
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
    )
    argument_bytes = shard_bytes(args)
    info = {"batch": batch, "cache_slots": prompt + new_tokens if decoding.continues_prompt else new_tokens}
    return (lambda: jitted.lower(*args)), info, argument_bytes
