"""How the generating families run inside the one jitted sampling loop (`inference.generate`).

`CausalDecoding` serves every decoder-only family (gpt, the recurrent cells, mamba): prompts of
different lengths are left-padded to a common (bucketed) length so that every row's next token
lands in the same cache slot; each row's positions start at 0 at its first real token and the
attention mask hides the pad slots, so a padded row computes exactly what it would alone.
State-carrying models read the mask only to leave their state untouched at pad tokens.

`Seq2SeqDecoding` serves the encoder-decoders: sources are right-padded and masked, encoded
once, and the decoder starts from the start id at position 0, feeding each new token back
through its self-attention KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.config import Config
from llm_jax.errors import UserError

# Prompt (and source) lengths are rounded up to a multiple of this: extra padding is free (it is
# masked and shifts no positions), and prompts of similar length share one compiled program.
PROMPT_BUCKET = 16
# Position tables with a fixed number of rows; only RoPE and relative positions extrapolate.
BOUNDED_POSITIONS = ("learned", "sinusoidal")


def bounded_length(cfg: Config) -> int | None:
    """The longest sequence the model's positions allow, or None when nothing bounds it."""
    if cfg.model.has_no_positions or cfg.model.position not in BOUNDED_POSITIONS:
        return None
    return cfg.max_seq_len


def _bucket(length: int) -> int:
    return -(-length // PROMPT_BUCKET) * PROMPT_BUCKET


@dataclass(frozen=True)
class CausalDecoding:
    """Prefill the left-padded prompts into the cache, then feed one token per step. The model
    provides `init_cache(batch, slots, dtype)`: KV slots, or a fixed-size recurrent state."""

    continues_prompt = True

    def prepare(self, cfg: Config, rows: list[list[int]], max_new_tokens: int, start_id: int,
                eos_id: int | None) -> dict:
        longest = max(len(r) for r in rows)
        limit = bounded_length(cfg)
        if limit is not None and longest + max_new_tokens > limit:
            raise UserError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                f"max_seq_len={limit} ({cfg.model.position} positions); shorten the prompt or ask for fewer tokens")
        P = _bucket(longest)
        tokens_BP = np.zeros((len(rows), P), np.int32)  # pad id 0: any valid id, it is masked out
        for b, ids in enumerate(rows):
            tokens_BP[b, P - len(ids):] = ids
        return {"tokens_BP": tokens_BP, "lengths_B": np.array([len(r) for r in rows], np.int32)}

    def start(self, model: nnx.Module, arrays: dict, max_new_tokens: int, cache_dtype: str) -> tuple:
        tokens_BP, lengths_B = arrays["tokens_BP"], arrays["lengths_B"]
        B, P = tokens_BP.shape
        S = P + max_new_tokens  # cache slots: the prompt, then one per fed-back token
        pad_B = P - lengths_B
        slot_S = jnp.arange(S)
        real_BS = slot_S[None, :] >= pad_B[:, None]  # pad slots are never attended to
        step_P = jnp.arange(P)
        positions_BP = jnp.maximum(step_P[None, :] - pad_B[:, None], 0)
        mask_BPS = real_BS[:, None, :] & (slot_S[None, None, :] <= step_P[None, :, None])
        out = model(tokens_BP, positions_BT=positions_BP, mask_BTS=mask_BPS,
                    cache=model.init_cache(B, S, cache_dtype), cache_index=jnp.int32(0))
        state = {"cache": out.cache, "real_BS": real_BS, "lengths_B": lengths_B, "prompt_len": jnp.int32(P)}
        return out.logits[:, -1], state

    def step(self, model: nnx.Module, state: dict, token_B: jax.Array, i: jax.Array) -> tuple:
        # Token i-1 goes into slot P+i-1 at its row's own position; it sees its real prefix.
        slot = state["prompt_len"] + i - 1
        real_BS = state["real_BS"]
        positions_B1 = (state["lengths_B"] + i - 1)[:, None]
        mask_B1S = (real_BS & (jnp.arange(real_BS.shape[1])[None, :] <= slot))[:, None, :]
        out = model(token_B[:, None], positions_BT=positions_B1, mask_BTS=mask_B1S, cache=state["cache"],
                    cache_index=slot)
        return out.logits[:, 0], {**state, "cache": out.cache}


@dataclass(frozen=True)
class Seq2SeqDecoding:
    """Encode the right-padded sources once; decode from the start id at position 0. The model
    provides `encode(src, mask)`, `decode(tgt, memory, mask, cache=, cache_index=)` and
    `init_cache(batch, slots, dtype)` (the decoder's self-attention KV cache)."""

    continues_prompt = False

    def prepare(self, cfg: Config, rows: list[list[int]], max_new_tokens: int, start_id: int,
                eos_id: int | None) -> dict:
        if eos_id is not None:  # sources end with end-of-text, as every training source did
            rows = [r + [eos_id] if r[-1] != eos_id else r for r in rows]
        longest = max(len(r) for r in rows)
        limit = bounded_length(cfg)
        if limit is not None and max(longest, max_new_tokens) > limit:
            raise UserError(f"source of {longest} tokens or max_new_tokens={max_new_tokens} exceeds the model's "
                            f"max_seq_len={limit} ({cfg.model.position} positions)")
        S = _bucket(longest)
        src_BS = np.zeros((len(rows), S), np.int32)  # pad id 0: masked out
        src_mask_BS = np.zeros((len(rows), S), bool)
        for b, ids in enumerate(rows):
            src_BS[b, :len(ids)] = ids
            src_mask_BS[b, :len(ids)] = True
        return {"src_BS": src_BS, "src_mask_BS": src_mask_BS, "start_B": np.full(len(rows), start_id, np.int32)}

    def start(self, model: nnx.Module, arrays: dict, max_new_tokens: int, cache_dtype: str) -> tuple:
        src_BS, src_mask_BS = arrays["src_BS"], arrays["src_mask_BS"]
        state = {"memory_BSD": model.encode(src_BS, src_mask_BS), "src_mask_BS": src_mask_BS,
                 "cache": model.init_cache(src_BS.shape[0], max_new_tokens, cache_dtype)}
        # Output 0 is predicted from the start id read at decoder position 0.
        return self.step(model, state, arrays["start_B"], jnp.int32(0))

    def step(self, model: nnx.Module, state: dict, token_B: jax.Array, i: jax.Array) -> tuple:
        out = model.decode(token_B[:, None], state["memory_BSD"], state["src_mask_BS"], cache=state["cache"],
                           cache_index=i)
        return out.logits[:, 0], {**state, "cache": out.cache}

