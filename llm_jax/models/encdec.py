"""Encoder-decoder Transformers: the original (`model.arch=transformer`) and T5 (`model.arch=t5`).

One module, two configurations of the shared blocks (one `Attention` for bidirectional, causal
and cross attention; one `MLP`; shared norms and positions):

- `transformer` (Vaswani et al. 2017): post-LayerNorm blocks x = LN(x + drop(F(x))) with
  biases, ReLU MLP, source and target share one embedding scaled by sqrt(d_model) and tied to
  the output layer, sinusoidal (or learned) positions added to the embeddings.
- `t5` (Raffel et al. 2020, the v1.0 layout Hugging Face's T5ForConditionalGeneration uses):
  pre-RMSNorm blocks without biases and a final norm per stack, attention scores without the
  1/sqrt(d) factor, a learned bias per head and relative-position bucket (computed once per
  stack and shared by its layers; the decoder's buckets look only backwards), embeddings not
  scaled, the tied output scaled by d_model^-0.5.

Encoder and decoder blocks are stacked on a leading `layers` axis like the GPT's, so scan or
unrolled execution, remat and the sharding rules work unchanged. With `model.moe.num_experts > 0`
the MLP of every `model.moe.every`-th block of both stacks is a Mixture of Experts (the Switch
Transformer's layout); the two stacks' routing statistics are reported together. Generation
encodes the source once (`encode`) and runs the decoder a token at a time against that cached
encoder output with a KV cache for the decoder's self-attention (`decode`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.config import Config, ModelConfig
from llm_jax.config.families import ArchSpec
from llm_jax.config.schema import span_counts
from llm_jax.models.attention import Attention
from llm_jax.models.base import Dims, Family, ModelOutput, register
from llm_jax.models.decoding import Seq2SeqDecoding
from llm_jax.models.layers import Embed, Norm, dropout, param
from llm_jax.models.stack import (
    add_feed_forward,
    add_positions,
    feed_forward,
    group_cache,
    keep_settings,
    layer_unit,
    matmul_params,
    moe_aux,
    output_layer,
    output_logits,
    run_layers,
    stack_layers,
    ungroup_cache,
)
from llm_jax.parallel.rules import constrain


def relative_buckets(relative_TS: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """T5's bucket of each (key position - query position): exact for small distances, then
    logarithmic up to `max_distance`, beyond which all share the last bucket. A bidirectional
    (encoder) table gives half its buckets to keys after the query."""
    buckets = jnp.zeros(relative_TS.shape, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_TS > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_TS)
    else:
        distance = jnp.maximum(-relative_TS, 0)  # keys after the query are masked anyway
    exact = num_buckets // 2
    # max(distance, 1) keeps log() finite where the exact branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return buckets + jnp.where(distance < exact, distance, far)


class RelativeBias(nnx.Module):
    """A learned scalar per (bucket, head), added to the attention scores."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool, *, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        self.table = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.relative_buckets, cfg.num_heads),
                           ("relpos_buckets", "heads"))

    def __call__(self, query_pos_T: jax.Array, key_pos_S: jax.Array) -> jax.Array:
        """Bias [1, N, T, S] float32 for queries at `query_pos_T` against keys at `key_pos_S`."""
        buckets_TS = relative_buckets(key_pos_S[None, :] - query_pos_T[:, None], self.bidirectional,
                                      self.num_buckets, self.max_distance)
        bias_TSN = jnp.take(self.table[...], buckets_TS, axis=0)
        return bias_TSN.transpose(2, 0, 1)[None]


def _sublayer(x_BTD, norm: Norm, prenorm: bool, rate: float, key, fn):
    """One residual branch, pre-norm x + drop(f(norm(x))) or post-norm norm(x + drop(f(x))),
    where fn(h) returns (f(h), extra): the new x and the branch's extra output (a KV cache, MoE
    statistics or None)."""
    out, extra = fn(norm(x_BTD) if prenorm else x_BTD)
    x_BTD = x_BTD + dropout(out, rate, key)
    return (x_BTD if prenorm else norm(x_BTD)), extra


# The two configurations of this family: T5's layout or the original Transformer's.
T5_LAYOUT = {"t5": True, "transformer": False}


def _attention(cfg: ModelConfig, rngs: nnx.Rngs) -> Attention:
    return Attention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, rngs=rngs, std=cfg.init_std,
                     out_std=cfg.init_std, use_bias=cfg.use_bias, scale=1.0 if T5_LAYOUT[cfg.arch] else None)


def _add_ffn(block: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool) -> None:
    add_feed_forward(block, cfg, rngs, moe=moe, std=cfg.init_std, out_std=cfg.init_std)


def _feed_forward(block: nnx.Module, h, key: jax.Array | None, dropless: bool) -> tuple:
    """The block's MLP or MoE on h, and the MoE's routing statistics (None for an MLP). The
    router's key is drawn from the branch's dropout key, so dense models keep their masks."""
    return feed_forward(block, h, jax.random.fold_in(key, 1) if key is not None else None, dropless)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> Norm:
    return Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)


class EncoderBlock(nnx.Module):
    """Self-attention and FFN sublayers; returns x, None (no cache) and the MoE statistics
    (None for an MLP block), the signature `transformer.BlockGroup` stacks."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
        self.prenorm = T5_LAYOUT[cfg.arch]
        self.dropout_rate = cfg.dropout
        self.norm1, self.attn = _norm(cfg, rngs), _attention(cfg, rngs)
        self.norm2 = _norm(cfg, rngs)
        _add_ffn(self, cfg, rngs, moe)

    def __call__(self, x_BSD, *, mask_BSS, bias_BNSS, kernel, block, key, dropless=False, cache=None):
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        attend = lambda h: self.attn(h, kernel=kernel, block=block, mask_BTS=mask_BSS, causal=False,  # noqa: E731
                                     bias_BNTS=bias_BNSS)
        x_BSD, _ = _sublayer(x_BSD, self.norm1, self.prenorm, self.dropout_rate, k1, attend)
        x_BSD, stats = _sublayer(x_BSD, self.norm2, self.prenorm, self.dropout_rate, k2,
                                 lambda h: _feed_forward(self, h, k2, dropless))
        return constrain(x_BSD, ("batch", "length", "embed")), None, stats


class DecoderBlock(nnx.Module):
    """Causal self-attention, cross-attention and FFN sublayers; returns x, the new KV cache and
    the MoE statistics (None for an MLP block)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
        self.prenorm = T5_LAYOUT[cfg.arch]
        self.dropout_rate = cfg.dropout
        self.norm1, self.self_attn = _norm(cfg, rngs), _attention(cfg, rngs)
        self.norm2, self.cross_attn = _norm(cfg, rngs), _attention(cfg, rngs)
        self.norm3 = _norm(cfg, rngs)
        _add_ffn(self, cfg, rngs, moe)

    def __call__(self, x_BTD, *, memory_BSD, cross_mask_BTS, self_mask_BTS, bias_BNTS, cache, cache_index, kernel,
                 block, key):
        k1, k2, k3 = jax.random.split(key, 3) if key is not None else (None, None, None)
        attend_self = lambda h: self.self_attn(h, kernel=kernel, block=block, mask_BTS=self_mask_BTS,  # noqa: E731
                                               cache=cache, cache_index=cache_index, causal=True, bias_BNTS=bias_BNTS)
        attend_source = lambda h: self.cross_attn(h, kv_BSD=memory_BSD, mask_BTS=cross_mask_BTS)  # noqa: E731
        x_BTD, new_cache = _sublayer(x_BTD, self.norm1, self.prenorm, self.dropout_rate, k1, attend_self)
        x_BTD, _ = _sublayer(x_BTD, self.norm2, self.prenorm, self.dropout_rate, k2, attend_source)
        # A cached decode step must not drop a token to a full expert.
        x_BTD, stats = _sublayer(x_BTD, self.norm3, self.prenorm, self.dropout_rate, k3,
                                 lambda h: _feed_forward(self, h, k3, dropless=cache is not None))
        return constrain(x_BTD, ("batch", "length", "embed")), new_cache, stats


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, dims: Dims, rngs: nnx.Rngs):
        self.t5 = T5_LAYOUT[cfg.arch]
        self.d_model = cfg.d_model
        self.kv_shape = (cfg.decoder_layers, cfg.kv_heads, cfg.head_dim)
        keep_settings(self, cfg, dims)

        self.embed = Embed(dims.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs, std=cfg.init_std)
        self.pos_embed = (Embed(dims.max_seq_len, cfg.d_model, ("position", "embed"), rngs=rngs, std=cfg.init_std)
                          if cfg.position == "learned" else None)
        relative = cfg.position == "relative"
        self.encoder_bias = RelativeBias(cfg, bidirectional=True, rngs=rngs) if relative else None
        self.decoder_bias = RelativeBias(cfg, bidirectional=False, rngs=rngs) if relative else None
        self.group = cfg.moe.every if cfg.moe.enabled else 1
        self.encoder = stack_layers(cfg.num_layers // self.group, layer_unit(cfg, EncoderBlock))(rngs)
        self.decoder = stack_layers(cfg.decoder_layers // self.group, layer_unit(cfg, DecoderBlock))(rngs)
        # Pre-norm stacks end with a norm; post-norm blocks already end normalised.
        self.encoder_norm = _norm(cfg, rngs) if self.t5 else None
        self.decoder_norm = _norm(cfg, rngs) if self.t5 else None
        self.head = output_layer(cfg, dims.vocab_size, rngs)

    def init_cache(self, batch: int, slots: int, dtype) -> dict:
        """An empty decoder KV cache: k and v of shape [decoder layers, batch, slots, kv_heads, head_dim]."""
        layers, kv_heads, head_dim = self.kv_shape
        shape = (layers, batch, slots, kv_heads, head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def _embed(self, tokens_BT: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.compute_dtype)
        x_BTD = self.embed(tokens_BT, dtype)
        if not self.t5:  # Vaswani et al. 3.4: embeddings multiplied by sqrt(d_model)
            x_BTD = x_BTD * jnp.asarray(math.sqrt(self.d_model), dtype)
        return x_BTD

    def encode(self, src_BS: jax.Array, src_mask_BS: jax.Array | None = None) -> jax.Array:
        """The encoder's output [B, S, D] for source ids, as generation uses it (MoE layers
        route dropless); `src_mask_BS` (True = real token) hides padded source positions from
        every query."""
        return self._encode(src_BS, src_mask_BS, None, dropless=True)[0]

    def _encode(self, src_BS: jax.Array, src_mask_BS: jax.Array | None, dropout_key: jax.Array | None,
                dropless: bool = False) -> tuple[jax.Array, dict | None]:
        """The encoder's output and its MoE statistics stacked over MoE layers (None if dense)."""
        B, S = src_BS.shape
        x_BSD = self._embed(src_BS)
        x_BSD, _ = add_positions(self, x_BSD, jnp.broadcast_to(jnp.arange(S), (B, S)))
        if dropout_key is not None:
            dropout_key, embed_key = jax.random.split(dropout_key)
            x_BSD = dropout(x_BSD, self.dropout_rate, embed_key)
        x_BSD = constrain(x_BSD, ("batch", "length", "embed"))
        mask_BSS = None if src_mask_BS is None else jnp.broadcast_to(src_mask_BS[:, None, :], (B, S, S))
        bias = self.encoder_bias(jnp.arange(S), jnp.arange(S)) if self.encoder_bias is not None else None

        def call(layer, x, _cache, key):
            x, _, stats = layer(x, mask_BSS=mask_BSS, bias_BNSS=bias, kernel=self.attention_kernel,
                                block=self.attention_block, key=key, dropless=dropless, cache=None)
            return x, stats

        x_BSD, stats = run_layers(self, call, x_BSD, None, dropout_key, blocks=self.encoder)
        if self.encoder_norm is not None:
            x_BSD = self.encoder_norm(x_BSD)
            if dropout_key is not None:
                x_BSD = dropout(x_BSD, self.dropout_rate, jax.random.fold_in(dropout_key, 1))
        return x_BSD, stats

    def decode(self, tgt_BT: jax.Array, memory_BSD: jax.Array, src_mask_BS: jax.Array | None = None, *,
               cache: dict | None = None, cache_index: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> ModelOutput:
        """Logits [B, T, V] float32 of the decoder over target ids, attending to `memory_BSD`,
        the new cache (None without one) and the decoder's MoE statistics (`aux["moe"]`).

        With `cache` (from `init_cache`), the T new tokens sit at positions
        cache_index..cache_index+T-1 and attend to the cache up to themselves.
        """
        dtype = jnp.dtype(self.compute_dtype)
        B, T = tgt_BT.shape
        start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        positions_T = start + jnp.arange(T)
        x_BTD = self._embed(tgt_BT)
        x_BTD, _ = add_positions(self, x_BTD, jnp.broadcast_to(positions_T, (B, T)))
        if dropout_key is not None:
            dropout_key, embed_key = jax.random.split(dropout_key)
            x_BTD = dropout(x_BTD, self.dropout_rate, embed_key)
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
        S = memory_BSD.shape[1]
        cross_mask_BTS = None if src_mask_BS is None else jnp.broadcast_to(src_mask_BS[:, None, :], (B, T, S))
        if cache is not None:
            key_pos = jnp.arange(cache["k"].shape[2])
            self_mask_BTS = jnp.broadcast_to(key_pos[None, :] <= positions_T[:, None], (B, T, key_pos.shape[0]))
        else:
            key_pos, self_mask_BTS = jnp.arange(T), None  # None: causal
        bias = self.decoder_bias(positions_T, key_pos) if self.decoder_bias is not None else None

        def call(layer, x, layer_cache, key):
            x, new_layer_cache, stats = layer(
                x, memory_BSD=memory_BSD, cross_mask_BTS=cross_mask_BTS, self_mask_BTS=self_mask_BTS,
                bias_BNTS=bias, cache=layer_cache, cache_index=cache_index, kernel=self.attention_kernel,
                block=self.attention_block, key=key)
            return x, (new_layer_cache, stats)

        x_BTD, (new_cache, stats) = run_layers(self, call, x_BTD, group_cache(cache, self.group), dropout_key,
                                               blocks=self.decoder)
        new_cache = ungroup_cache(new_cache, self.group)
        if self.decoder_norm is not None:
            x_BTD = self.decoder_norm(x_BTD)
            if dropout_key is not None:
                x_BTD = dropout(x_BTD, self.dropout_rate, jax.random.fold_in(dropout_key, 1))
        if self.t5 and self.head is None:  # T5 v1.0 rescales before its tied output layer
            x_BTD = x_BTD * jnp.asarray(self.d_model ** -0.5, x_BTD.dtype)
        logits_BTV = constrain(output_logits(self.embed, self.head, x_BTD, dtype), ("batch", "length", "vocab"))
        return ModelOutput(logits_BTV, new_cache, moe_aux(stats))

    def __call__(self, src_BS: jax.Array, tgt_BT: jax.Array, *, src_mask_BS: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> ModelOutput:
        """Teacher-forced logits [B, T, V] float32 of the targets given the sources, no cache, and
        the encoder's then the decoder's MoE statistics stacked over all MoE layers (`aux["moe"]`)."""
        enc_key, dec_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        memory_BSD, enc_stats = self._encode(src_BS, src_mask_BS, enc_key)
        decoded = self.decode(tgt_BT, memory_BSD, src_mask_BS, dropout_key=dec_key)
        if enc_stats is None:
            return ModelOutput(decoded.logits, None, {})
        stats = jax.tree.map(lambda e, d: jnp.concatenate([e, d]), enc_stats, decoded.aux["moe"])
        return ModelOutput(decoded.logits, None, {"moe": stats})


def encoder_decoder_flops_per_token(cfg: Config, shapes: dict) -> float:
    """Training FLOPs per counted token (train.seq_len per row): the encoder's 6N and full
    attention over the S source tokens, the decoder's 6N, causal self-attention and
    cross-attention over its T tokens, divided by train.seq_len. (The cross-attention's key/value
    projections, which run on S rather than T tokens, are counted on T.)"""
    m = cfg.model
    n_matmul = matmul_params(cfg, shapes)
    n_encoder = sum(int(x.size) for x in jax.tree.leaves(shapes["encoder"]))
    n_decoder = n_matmul - n_encoder
    if cfg.objective == "span":
        noise, spans = span_counts(cfg.train.seq_len, cfg.train.noise_density, cfg.train.mean_span)
        s, t = cfg.train.seq_len - noise + spans + 1, noise + spans + 1
    else:
        s, t = cfg.train.src_len, cfg.train.seq_len
    width = m.num_heads * m.head_dim
    encoder = 6 * n_encoder * s + 12 * m.num_layers * width * s * s
    decoder = 6 * n_decoder * t + 12 * m.decoder_layers * width * (t * t / 2 + t * s)
    return (encoder + decoder) / cfg.train.seq_len


# Both configurations generate; t5 also pretrains on the raw corpus by span corruption.
ENCDEC_POSITIONS = ("learned", "sinusoidal", "relative")
register(Family("encdec", {
    "transformer": ArchSpec(kind="encoder-decoder", objectives=("seq2seq",), positions=ENCDEC_POSITIONS, moe=True),
    "t5": ArchSpec(kind="encoder-decoder", objectives=("span", "seq2seq"), positions=ENCDEC_POSITIONS, moe=True),
}, build=EncoderDecoder, flops_per_token=encoder_decoder_flops_per_token, decoding=Seq2SeqDecoding(),
    describe="encoder-decoder Transformer: the original (post-LN) and T5 (pre-RMSNorm, relative positions)"))
