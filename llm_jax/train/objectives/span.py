"""T5's span corruption (Raffel et al. 2020): the first T tokens of a window are split into
alternating kept and noise spans (noise_density of the tokens in spans of mean length mean_span,
the counts fixed so every shape is static); the encoder reads the kept tokens with each noise span
replaced by a sentinel, the decoder predicts sentinel + span for each, then end-of-text."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llm_jax.config import Config
from llm_jax.config.schema import span_counts
from llm_jax.data.tokenizer import decoder_start_id
from llm_jax.errors import UserError
from llm_jax.train.objectives.base import Data, TokenObjective, Vocab, register_objective, step_key

SPAN_STREAM = 0x535041  # "SPA": folded into the seed's key, apart from dropout and other draws


@dataclass(frozen=True)
class SpanSpec:
    length: int  # raw tokens corrupted per row (train.seq_len)
    noise: int  # of which hidden
    spans: int  # in this many noise spans
    sentinels: tuple[int, ...]  # id of the sentinel of span k (k < spans)
    eos_id: int
    start_id: int  # the decoder's first input

    @property
    def source_len(self) -> int:
        return self.length - self.noise + self.spans + 1  # kept tokens, a sentinel per span, EOS

    @property
    def target_len(self) -> int:
        return self.noise + self.spans + 1  # each span after its sentinel, EOS


def span_spec(length: int, density: float, mean_span: float, vocab: Vocab) -> SpanSpec:
    """Sentinels are the tokenizer's `<extra_id_k>` tokens when it has them, else the padding rows
    after its vocabulary."""
    tokenizer_vocab, model_vocab = vocab.size, vocab.rows
    noise, spans = span_counts(length, density, mean_span)
    found = [vocab.special(f"<extra_id_{k}>") for k in range(spans)]
    if all(i is not None for i in found):
        sentinels = tuple(int(i) for i in found)
    else:
        if tokenizer_vocab + spans > model_vocab:
            raise UserError(
                f"span corruption needs {spans} sentinel ids: the tokenizer has no <extra_id_k> tokens and "
                f"model.vocab_size={model_vocab} leaves {model_vocab - tokenizer_vocab} padding rows after its "
                f"{tokenizer_vocab} ids; raise model.vocab_size or lower train.seq_len")
        sentinels = tuple(range(tokenizer_vocab, tokenizer_vocab + spans))
    return SpanSpec(length, noise, spans, sentinels, int(vocab.eos_id), decoder_start_id(vocab.eos_id, vocab.lookup))


def _segment_lengths(key: jax.Array, items: int, segments: int) -> jax.Array:
    """Random lengths (each >= 1) of `segments` consecutive pieces of `items` items."""
    dividers = (jnp.arange(items - 1) < segments - 1).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jax.random.permutation(key, dividers)])
    return jnp.zeros(segments, jnp.int32).at[jnp.cumsum(starts)].add(1)


def _emit(values_L: jax.Array, emitted_L: jax.Array, size: int) -> jax.Array:
    """The emitted values in order, packed into `size` slots (exactly `size` are emitted)."""
    slot = jnp.where(emitted_L, jnp.cumsum(emitted_L) - 1, size)
    return jnp.zeros(size, jnp.int32).at[slot].set(values_L, mode="drop")


def span_corrupt_row(key: jax.Array, tokens_L: jax.Array, spec: SpanSpec) -> tuple[jax.Array, jax.Array]:
    """(encoder input [source_len], decoder target [target_len]) of one row of raw tokens."""
    k_noise, k_keep = jax.random.split(key)
    noise_len = _segment_lengths(k_noise, spec.noise, spec.spans)
    keep_len = _segment_lengths(k_keep, spec.length - spec.noise, spec.spans)
    # Alternating kept, noise, kept, noise...: a row starts with kept tokens and ends in noise.
    ends = jnp.cumsum(jnp.stack([keep_len, noise_len], axis=1).reshape(-1))
    segment_L = jnp.searchsorted(ends, jnp.arange(spec.length), side="right")
    noise_L = segment_L % 2 == 1
    first_L = jnp.concatenate([jnp.ones(1, bool), segment_L[1:] != segment_L[:-1]])
    sentinel_L = jnp.asarray(spec.sentinels, jnp.int32)[segment_L // 2]
    tokens_L = tokens_L.astype(jnp.int32)
    eos = jnp.full(1, spec.eos_id, jnp.int32)
    # Encoder: kept tokens, and a noise span's sentinel in place of the span.
    source = _emit(jnp.where(noise_L, sentinel_L, tokens_L), ~noise_L | first_L, spec.source_len - 1)
    # Decoder: the mirror image, kept spans become the sentinels that introduce each noise span.
    target = _emit(jnp.where(noise_L, tokens_L, sentinel_L), noise_L | first_L, spec.target_len - 1)
    return jnp.concatenate([source, eos]), jnp.concatenate([target, eos])


def span_targets(tokens_BT1: jax.Array, key: jax.Array, spec: SpanSpec) -> tuple[dict, jax.Array, None]:
    rows = tokens_BT1[:, :spec.length]
    keys = jax.random.split(key, rows.shape[0])
    src_BS, tgt_BT = jax.vmap(lambda k, r: span_corrupt_row(k, r, spec))(keys, rows)
    dec_in_BT = jnp.concatenate([jnp.full((rows.shape[0], 1), spec.start_id, jnp.int32), tgt_BT[:, :-1]], axis=1)
    return {"src_BS": src_BS, "tgt_BT": dec_in_BT}, tgt_BT, None


@register_objective
@dataclass(frozen=True)
class SpanCorruption(TokenObjective):
    """t5 pretraining on the raw corpus."""

    name = "span"
    seed: int = 0
    span: SpanSpec | None = None

    @classmethod
    def from_config(cls, cfg: Config, vocab: Vocab) -> SpanCorruption:
        spec = span_spec(cfg.train.seq_len, cfg.train.noise_density, cfg.train.mean_span, vocab)
        return cls(smoothing=cfg.train.label_smoothing, smoothing_ids=vocab.size, seed=cfg.seed, span=spec)

    def data(self, rows: jax.Array, step) -> Data:
        return span_targets(rows, step_key(self.seed, step, SPAN_STREAM), self.span)
