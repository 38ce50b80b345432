"""Autoregressive sampling with a KV cache: one jitted prefill plus a jitted decode loop.

Prompts of different lengths are left-padded to a common (bucketed) length so that every row's
next token lands in the same cache slot; each row's positions start at 0 at its first real
token and the attention mask hides the pad slots, so a padded row computes exactly what it
would alone. The whole generation (prefill, then a `lax.while_loop` over new tokens that stops
once every row has produced EOS) is a single compiled call: no Python dispatch per token.

Recurrent models (rnn, lstm, gru) and Mamba run the same program: their "cache" is the state
after the last token, they read the mask only to leave the state untouched at pad tokens, and
ignore positions (a Mamba hybrid's attention layers keep KV slots as usual).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.models.definition import (
    ModelDef,  # Prompt lengths are rounded up to a multiple of this (extra left padding is free: it is masked
)
from llm_jax.models.recurrent import RECURRENT_ARCHS, init_state
from llm_jax.models.registry import compute_dtype

# and shifts no positions), so prompts of similar length share one compiled program.
PROMPT_BUCKET = 16
# Sinusoidal tables are computed for max_seq_len rows too; only RoPE extrapolates past it.
BOUNDED_POSITIONS = ("learned", "sinusoidal")


@dataclass(frozen=True)
class CacheSpec:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    arch: str = "gpt"
    width: int = 0  # d_model: a recurrent model's state width


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


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "vocab_limit", "cache_spec"))
def _generate_jit(graphdef: Any, params: Any, tokens_BP: jax.Array, lengths_B: jax.Array,
                  key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  eos_id: jax.Array, *, max_new_tokens: int, vocab_limit: int | None,
                  cache_spec: CacheSpec) -> jax.Array:
    """New tokens [B, N] for left-padded prompts; slots after a row's EOS hold EOS (or 0)."""
    model = nnx.merge(graphdef, params)
    B, P = tokens_BP.shape
    N = max_new_tokens
    S = P + N  # cache slots: the prompt, then one per fed-back token
    c = cache_spec
    if c.arch in RECURRENT_ARCHS:
        cache = init_state(c.arch, c.layers, B, c.width)  # a fixed-size state, not S slots
    elif c.arch == "mamba":
        cache = model.init_cache(B, S, c.dtype)  # SSM and conv states; KV slots for attention layers
    else:
        cache = {name: jnp.zeros((c.layers, B, S, c.kv_heads, c.head_dim), c.dtype) for name in ("k", "v")}

    pad_B = P - lengths_B
    slot_S = jnp.arange(S)
    real_BS = slot_S[None, :] >= pad_B[:, None]  # pad slots are never attended to
    step_P = jnp.arange(P)
    positions_BP = jnp.maximum(step_P[None, :] - pad_B[:, None], 0)
    mask_BPS = real_BS[:, None, :] & (slot_S[None, None, :] <= step_P[None, :, None])
    logits_BPV, cache = model(tokens_BP, positions_BT=positions_BP, mask_BTS=mask_BPS,
                              cache=cache, cache_index=jnp.int32(0))
    sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p,
                     vocab_limit=vocab_limit)
    first_B = sample(logits_BPV[:, -1], jax.random.fold_in(key, 0))

    stop = eos_id >= 0  # eos_id < 0: no EOS, always run all N steps
    fill = jnp.where(stop, eos_id, 0).astype(jnp.int32)
    out_BN = jnp.full((B, N), fill, jnp.int32).at[:, 0].set(first_B)
    done_B = stop & (first_B == eos_id)

    def cond(carry):
        i, _, _, done_B = carry
        return (i < N) & ~jnp.all(done_B)

    def body(carry):
        i, cache, out_BN, done_B = carry
        # Feed token i-1 into slot P+i-1 at its row's own position; it sees its real prefix.
        slot = P + i - 1
        tok_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
        positions_B1 = (lengths_B + i - 1)[:, None]
        mask_B1S = (real_BS & (slot_S[None, :] <= slot))[:, None, :]
        logits_B1V, cache = model(tok_B1, positions_BT=positions_B1, mask_BTS=mask_B1S,
                                  cache=cache, cache_index=slot)
        next_B = sample(logits_B1V[:, 0], jax.random.fold_in(key, i))
        next_B = jnp.where(done_B, fill, next_B)
        out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], i, axis=1)
        return i + 1, cache, out_BN, done_B | (stop & (next_B == eos_id))

    _, _, out_BN, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out_BN, done_B))
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
             seed: int = 0, eos_id: int | None = None,
             vocab_limit: int | None = None, start_id: int | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns only the new tokens of each row.

    temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off. A row stops at its
    first `eos_id` (not included). `vocab_limit` (the tokenizer's vocabulary size) keeps the
    model's padding rows from ever being sampled. The same seed gives the same output.
    Encoder-decoders read each prompt as a source; their decoder starts from `start_id`
    (default: `eos_id`, else 0).
    """
    if cfg.model.arch == "bert":
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
    longest = max(len(r) for r in rows)
    m = cfg.model
    dtype = getattr(model, "compute_dtype", None) or compute_dtype(cfg)
    if m.is_encoder_decoder:
        from llm_jax.inference.generate_seq2seq import generate_seq2seq

        # Sources end with end-of-text, as every training source did (and as T5's tokenizer adds).
        sources = [r + [eos_id] if eos_id is not None and r[-1] != eos_id else r for r in rows]
        out_BN = generate_seq2seq(graphdef, params, cfg, sources, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=min(top_k, vocab), top_p=top_p, seed=seed,
                                  eos_id=eos_id, start_id=start_id, vocab_limit=vocab_limit, dtype=dtype)
        return [_cut_at_eos(row, eos_id) for row in out_BN.tolist()]
    bounded = not cfg.model.has_no_positions and cfg.model.position in BOUNDED_POSITIONS
    if bounded and longest + max_new_tokens > cfg.max_seq_len:
        raise UserError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_seq_len={cfg.max_seq_len} ({cfg.model.position} positions); shorten the prompt "
            "or ask for fewer tokens"
        )

    P = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens_BP = np.zeros((len(rows), P), np.int32)  # pad id 0: any valid id, it is masked out
    for b, ids in enumerate(rows):
        tokens_BP[b, P - len(ids):] = ids
    lengths_B = np.array([len(r) for r in rows], np.int32)
    out_BN = _generate_jit(
        graphdef, params, tokens_BP, lengths_B, jax.random.key(seed),
        np.float32(temperature), np.int32(min(top_k, vocab)), np.float32(top_p),
        np.int32(-1 if eos_id is None else eos_id),
        max_new_tokens=max_new_tokens, vocab_limit=vocab_limit,
        cache_spec=CacheSpec(m.num_layers, m.kv_heads, m.head_dim, str(dtype), m.arch, m.d_model),
    )
    return [_cut_at_eos(row, eos_id) for row in np.asarray(out_BN).tolist()]


def _cut_at_eos(row: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in row:
        return row[: row.index(eos_id)]
    return row
