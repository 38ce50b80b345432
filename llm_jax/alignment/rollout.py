"""Rollouts: the prompts of a step, completions from the jitted KV-cache sampler, and the one
sequence layout every later forward pass reads.

Layout of a rollout row (T = P + N): the prompt left-padded to P (a fixed width for the whole
run, so shapes never change), then the N sampled tokens. Pad slots are masked out and each row's
positions start at 0 at its first real token: exactly what the sampler computed, so the policy's
log-probabilities here are those it sampled with. The logits at position P-1+i predict response
token i; the value head's score there is the value of the state before that token.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from llm_jax.inference.generate import _generate_jit
from llm_jax.models.base import ModelOutput
from llm_jax.models.decoding import CausalDecoding
from llm_jax.models.definition import ModelDef
from llm_jax.parallel.distributed import is_multiprocess
from llm_jax.parallel.rules import activation_mesh, logical_to_spec


def prompt_width(rows: Sequence[Sequence[int]]) -> int:
    """P: the longest prompt. Fixed for the whole run (so nothing recompiles), and not rounded up
    as the sampler's own padding is: a learned position table holds prompt + completion exactly."""
    return max(len(r) for r in rows)


def step_prompts(n_prompts: int, per_step: int, group: int, seed: int, step: int) -> np.ndarray:
    """Indices [per_step * group] of the prompts of `step`, each repeated `group` times in a row:
    a pure function of (seed, step), so a resumed run asks the same questions."""
    rng = np.random.default_rng([seed, step])
    picked = rng.choice(n_prompts, per_step, replace=per_step > n_prompts)
    return np.repeat(picked, group)


def left_pad(rows: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P] left-padded with 0, lengths [B])."""
    tokens = np.zeros((len(rows), width), np.int32)  # pad id 0: masked out everywhere
    for b, ids in enumerate(rows):
        tokens[b, width - len(ids):] = ids
    return tokens, np.asarray([len(r) for r in rows], np.int32)


def rows_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rollout arrays [B, ...]: rows over the batch axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def on_mesh(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, as a global array with `sharding`."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: jax.Array) -> np.ndarray:
    """A global array, whole, on every process."""
    if is_multiprocess():
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def sample(mdef: ModelDef, params: dict, mesh: Mesh, tokens_BP: jax.Array, lengths_B: jax.Array, key: jax.Array,
           *, temperature: float, max_new_tokens: int, eos_id: int, vocab_limit: int, cache_dtype: str) -> jax.Array:
    """Sampled tokens [B, N]: after a row's EOS every slot holds EOS (temperature 0: greedy)."""
    with activation_mesh(mesh):
        return _generate_jit(mdef.graphdef, params, {"tokens_BP": tokens_BP, "lengths_B": lengths_B}, key,
                             np.float32(temperature), np.int32(0), np.float32(1.0), np.asarray([eos_id], np.int32),
                             decoding=CausalDecoding(), max_new_tokens=max_new_tokens, vocab_limit=vocab_limit,
                             cache_dtype=cache_dtype)


def response_mask(resp_BN: jax.Array, eos_id: int) -> jax.Array:
    """float32 [B, N]: 1 on the completion's tokens and the EOS that ends it, 0 after (a row
    without EOS is all completion)."""
    N = resp_BN.shape[1]
    is_eos_BN = resp_BN == eos_id
    first_B = jnp.where(is_eos_BN.any(axis=1), jnp.argmax(is_eos_BN, axis=1), N - 1)
    return (jnp.arange(N)[None, :] <= first_B[:, None]).astype(jnp.float32)


def completion_ids(resp: np.ndarray, eos_id: int) -> list[list[int]]:
    """Each row's completion without its EOS and what follows."""
    out = []
    for row in resp.tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def forward(mdef: ModelDef, params: dict, tokens_BT: jax.Array, lengths_B: jax.Array, prompt_width: int,
            temperature: float, vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """(logits [B, N, V] / temperature that predict the N response tokens, values [B, N] or None
    without a score head), through the rollout layout. Ids from `vocab_limit` on (the model's
    padding rows, which the sampler never draws) get -inf, so log-probabilities are those of the
    distribution sampled from. (A large finite negative, not -inf: entropy's 0 * log 0 stays 0.)"""
    B, T = tokens_BT.shape
    pad_B = prompt_width - lengths_B
    t_T = jnp.arange(T)
    real_BT = t_T[None, :] >= pad_B[:, None]
    positions_BT = jnp.maximum(t_T[None, :] - pad_B[:, None], 0)
    mask_BTT = real_BT[:, None, :] & (t_T[None, None, :] <= t_T[None, :, None])
    out: ModelOutput = mdef.merge(params)(tokens_BT, positions_BT=positions_BT, mask_BTS=mask_BTT)
    logits_BNV = out.logits[:, prompt_width - 1:-1].astype(jnp.float32) / temperature
    V = logits_BNV.shape[-1]
    if vocab_limit is not None and vocab_limit < V:
        logits_BNV = jnp.where(jnp.arange(V) < vocab_limit, logits_BNV, -1e9)
    score = out.aux.get("score")
    values_BN = None if score is None else score[:, prompt_width - 1:-1].astype(jnp.float32)
    return logits_BNV, values_BN
