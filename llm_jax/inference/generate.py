"""Autoregressive sampling: one jitted call per generation, driven by the model family's decoding.

The family (`models.base.Family.decoding`) pads the prompts, runs the model over them and feeds
each new token back (`models.decoding`: KV cache, recurrent or SSM state, or an encoder-decoder's
cached source); this module samples. The whole generation (the start, then a `lax.while_loop`
over new tokens that stops once every row has produced EOS) is a single compiled call: no Python
dispatch per token.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.models.base import Decoding, compute_dtype, family_of
from llm_jax.models.definition import ModelDef


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, vocab_limit: int | None) -> jax.Array:
    """Next-token ids [B] (int32): argmax when temperature is 0, else a draw after temperature,
    top-k (0: off) and top-p (1: off) filtering, in that order (as Hugging Face does).

    Every setting is a traced value, so changing them never recompiles; the one sort per step
    costs little next to a forward pass. Ties at the top-k / top-p cut-off value are all kept.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    V = logits_BV.shape[-1]
    if vocab_limit is not None and vocab_limit < V:
        logits_BV = jnp.where(jnp.arange(V) < vocab_limit, logits_BV, -jnp.inf)
    greedy_B = jnp.argmax(logits_BV, axis=-1)

    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    sorted_BV = jnp.flip(jnp.sort(scaled_BV, axis=-1), axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_k_V = jnp.arange(V) < k
    # Nucleus over the top-k survivors: keep a token when the mass strictly before it is below
    # top_p, so the most likely token always stays; top_p >= 1 keeps all (no rounding losses).
    probs_BV = jax.nn.softmax(jnp.where(in_k_V, sorted_BV, -jnp.inf), axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = in_k_V & ((before_BV < top_p) | (top_p >= 1.0))
    cutoff_B1 = jnp.where(keep_BV, sorted_BV, jnp.inf).min(axis=-1, keepdims=True)
    filtered_BV = jnp.where(scaled_BV < cutoff_B1, -jnp.inf, scaled_BV)
    sampled_B = jax.random.categorical(key, filtered_BV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "decoding", "max_new_tokens", "vocab_limit", "cache_dtype"))
def _generate_jit(graphdef: Any, params: Any, arrays: dict, key: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array, stops_S: jax.Array, *, decoding: Decoding,
                  max_new_tokens: int, vocab_limit: int | None, cache_dtype: str) -> jax.Array:
    """New tokens [B, N]; a row is done at its first stop id (EOS first, then e.g. a chat's end of
    turn; none: all N steps), and the slots after it hold the first stop id (0 without one)."""
    model = nnx.merge(graphdef, params)
    N = max_new_tokens
    sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    logits_BV, state = decoding.start(model, arrays, N, cache_dtype)
    first_B = sample(logits_BV, jax.random.fold_in(key, 0))

    fill = stops_S[0] if stops_S.shape[0] else jnp.int32(0)
    out_BN = jnp.full((first_B.shape[0], N), fill, jnp.int32).at[:, 0].set(first_B)
    done_B = jnp.isin(first_B, stops_S)

    def cond(carry):
        i, _, _, done_B = carry
        return (i < N) & ~jnp.all(done_B)

    def body(carry):
        i, state, out_BN, done_B = carry
        logits_BV, state = decoding.step(model, state, out_BN[:, i - 1], i)
        next_B = jnp.where(done_B, fill, sample(logits_BV, jax.random.fold_in(key, i)))
        out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], i, axis=1)
        return i + 1, state, out_BN, done_B | jnp.isin(next_B, stops_S)

    _, _, out_BN, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, out_BN, done_B))
    return out_BN


def split_model(model: nnx.Module | tuple[ModelDef, Any]) -> tuple[Any, Any]:
    """(graphdef, params) of a live NNX model or of a (ModelDef, params) pair."""
    if isinstance(model, tuple):
        mdef, params = model
        return mdef.graphdef, params
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def _check_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if top_k < 0:
        raise UserError(f"top_k={top_k} must be >= 0 (0: off)")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} must be in (0, 1] (1: off)")


def _prepare_prompts(prompts: Sequence[Sequence[int]], vocab: int,
                     eos_id: int | None) -> list[list[int]]:
    rows = []
    for r, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        if not ids:
            # A model trained on EOS-separated documents reads EOS as "a new document starts".
            if eos_id is None:
                raise UserError(f"prompt {r} is empty; give at least one token (or an eos_id)")
            ids = [eos_id]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UserError(f"prompt {r} has token id {bad[0]} outside the vocabulary [0, {vocab})")
        rows.append(ids)
    return rows


def generate(model: nnx.Module | tuple[ModelDef, Any], cfg: Config, prompts: Sequence[Sequence[int]],
             *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, vocab_limit: int | None = None,
             start_id: int | None = None, stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns only the new tokens of each row.

    temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off. A row stops at its
    first `eos_id` or other `stop_ids` (a chat's end of turn), not included. `vocab_limit` (the
    tokenizer's vocabulary size) keeps the model's padding rows from ever being sampled. The same
    seed gives the same output. Encoder-decoders read each prompt as a source (ending with
    `eos_id`, as every training source did); their decoder starts from `start_id` (default:
    `eos_id`, else 0).
    """
    decoding = family_of(cfg.model.arch).decoding
    if decoding is None:
        raise UserError(f"model.arch={cfg.model.arch} is an encoder trained to fill in masked tokens; it does "
                        "not generate text (use .logits() for its masked-LM predictions)")
    _check_args(max_new_tokens, temperature, top_k, top_p)
    if not prompts:
        return []
    graphdef, params = split_model(model)
    vocab = params["embed"]["embedding"].shape[0]  # rows of the token table = model vocabulary
    rows = _prepare_prompts(prompts, vocab, eos_id)
    if max_new_tokens == 0:
        return [[] for _ in rows]
    if start_id is None:
        start_id = 0 if eos_id is None else eos_id
    arrays = decoding.prepare(cfg, rows, max_new_tokens, start_id, eos_id)
    dtype = getattr(model, "compute_dtype", None) or compute_dtype(cfg)
    stops = ([] if eos_id is None else [int(eos_id)]) + [int(i) for i in stop_ids if i != eos_id]
    out_BN = _generate_jit(
        graphdef, params, arrays, jax.random.key(seed), np.float32(temperature), np.int32(min(top_k, vocab)),
        np.float32(top_p), np.asarray(stops, np.int32).reshape(-1),
        decoding=decoding, max_new_tokens=max_new_tokens, vocab_limit=vocab_limit, cache_dtype=str(dtype))
    return [_cut_at_stop(row, stops) for row in np.asarray(out_BN).tolist()]


def _cut_at_stop(row: list[int], stops: list[int]) -> list[int]:
    ends = [row.index(stop) for stop in stops if stop in row]
    return row[: min(ends)] if ends else row
