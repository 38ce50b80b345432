"""BERT (`model.arch=bert`): an encoder-only Transformer with a masked-LM head.

Devlin et al. (2019), laid out as Hugging Face's BertForMaskedLM so checkpoints map one to one:
token + position + segment (token type) embeddings summed and LayerNorm-ed, then post-norm
blocks x = LN(x + Attn(x)); x = LN(x + MLP(x)) with bidirectional attention and exact (erf)
GELU, then the MLM head: dense D->D, GELU, LayerNorm, and a decoder tied to the token
embedding plus an output bias.

With `num_classes` > 0 it is a sequence classifier instead (Hugging Face's
BertForSequenceClassification): the MLM head is replaced by the pooler (dense + tanh on the first,
[CLS], position) and a classifier whose logits [B, C] come back as `aux["class_logits"]` (and no
token logits). With `nsp` it keeps the MLM head and adds the pooler and a two-way next-sentence
head (BertForPreTraining's `cls.seq_relationship`): `aux["nsp_logits"]` [B, 2].

Blocks are stacked on a leading `layers` axis (`nnx.vmap`) exactly like the GPT's, so the
sharding rules, scan/unrolled execution and remat work the same way. It has no KV cache: an
encoder does not generate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.config import Config, ModelConfig
from llm_jax.config.families import ArchSpec
from llm_jax.models.attention import Attention
from llm_jax.models.base import Dims, Family, ModelOutput, register
from llm_jax.models.layers import Dense, Embed, Norm, dropout, param
from llm_jax.models.stack import (
    add_feed_forward,
    add_positions,
    attention_flops,
    feed_forward,
    keep_settings,
    layer_unit,
    matmul_params,
    moe_aux,
    output_layer,
    output_logits,
    run_layers,
    stack_layers,
)
from llm_jax.parallel.rules import constrain

# Segment (token type) ids: sentence A and sentence B, as in BERT and BertConfig's default.
NUM_SEGMENTS = 2
# The config's `gelu` means the erf GELU here: BERT was trained with it, and the tanh form that
# GPT-2 uses would miss transformers' logits by ~1e-3.
MLP_KIND = {"gelu": "gelu_exact", "relu": "relu", "swiglu": "swiglu"}


class BertBlock(nnx.Module):
    """Post-norm: x = LN(x + drop(Attn(x))), x = LN(x + drop(FFN(x))); the FFN is the MLP or,
    with `moe=True`, a Mixture of Experts. Returns x, None (no cache) and the MoE statistics."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
        # BERT initialises every matrix with the same std (no depth scaling: post-norm blocks
        # renormalise the residual stream after each branch anyway).
        std = cfg.init_std
        self.dropout_rate = cfg.dropout
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, rngs=rngs,
                              std=std, out_std=std, use_bias=cfg.use_bias)
        self.norm1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)
        add_feed_forward(self, cfg, rngs, moe=moe, std=std, out_std=std, kind=MLP_KIND[cfg.mlp])
        self.norm2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)

    def __call__(self, x_BTD, *, rope, kernel, block, mask_BTS, key, cache=None):
        k_attn, k_mlp, k_router = jax.random.split(key, 3) if key is not None else (None, None, None)
        h_BTD, _ = self.attn(x_BTD, rope=rope, kernel=kernel, block=block, mask_BTS=mask_BTS, causal=False)
        x_BTD = self.norm1(x_BTD + dropout(h_BTD, self.dropout_rate, k_attn))
        h_BTD, stats = feed_forward(self, x_BTD, k_router)
        x_BTD = self.norm2(x_BTD + dropout(h_BTD, self.dropout_rate, k_mlp))
        return constrain(x_BTD, ("batch", "length", "embed")), None, stats


class Bert(nnx.Module):
    def __init__(self, cfg: ModelConfig, dims: Dims, rngs: nnx.Rngs):
        std = cfg.init_std
        vocab_size, num_classes, nsp = dims.vocab_size, dims.num_classes, dims.nsp
        self.num_classes = num_classes
        keep_settings(self, cfg, dims)

        self.embed = Embed(vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs, std=std)
        self.pos_embed = (Embed(dims.max_seq_len, cfg.d_model, ("position", "embed"), rngs=rngs, std=std)
                          if cfg.position == "learned" else None)
        self.segment_embed = Embed(NUM_SEGMENTS, cfg.d_model, ("segment", "embed"), rngs=rngs, std=std)
        self.embed_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)

        self.group = cfg.moe.every if cfg.moe.enabled else 1
        self.blocks = stack_layers(cfg.num_layers // self.group, layer_unit(cfg, BertBlock))(rngs)
        if num_classes or nsp:
            self.pooler = Dense((cfg.d_model,), (cfg.d_model,), ("embed", "embed"), rngs=rngs, std=std,
                                use_bias=cfg.use_bias)
        if num_classes:
            self.classifier = Dense((cfg.d_model,), (num_classes,), ("embed", "classes"), rngs=rngs, std=std,
                                    use_bias=cfg.use_bias)
            return
        # The MLM head's transform maps the residual stream onto itself; its output axis is
        # `embed` too (the fsdp axis can split only one of the two, the input one).
        self.head_dense = Dense((cfg.d_model,), (cfg.d_model,), ("embed", "embed"), rngs=rngs, std=std,
                                use_bias=cfg.use_bias)
        self.head_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)
        self.head = output_layer(cfg, vocab_size, rngs)
        # Next-sentence prediction: IsNext / NotNext from the pooled [CLS] (train.nsp).
        self.nsp_head = (Dense((cfg.d_model,), (2,), ("embed", "classes"), rngs=rngs, std=std, use_bias=cfg.use_bias)
                         if nsp else None)
        # A bias per output token, kept apart from the (possibly tied) decoder matrix as in BERT.
        self.out_bias = (param(rngs, nnx.initializers.zeros, (vocab_size,), ("vocab",))
                         if cfg.use_bias else None)

    def __call__(self, tokens_BT: jax.Array, *, segments_BT: jax.Array | None = None,
                 attention_mask_BT: jax.Array | None = None, positions_BT: jax.Array | None = None,
                 mask_BTS: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | None = None, dropout_key: jax.Array | None = None) -> ModelOutput:
        """MLM logits [B, T, V] in float32 (None for a classifier), no cache, and in `aux`: the
        classifier's `class_logits` [B, C], the `nsp_logits` [B, 2], the MoE statistics `moe`.

        `segments_BT`: token type ids (0 or 1), default all 0. `attention_mask_BT` (1 = real
        token, 0 = padding, as Hugging Face's `attention_mask`) hides padded keys from every
        query; `mask_BTS` (True = may attend) gives the whole pattern instead. Without either,
        every token attends to every token. `positions_BT` default to 0..T-1.
        """
        if cache is not None or cache_index is not None:
            raise ValueError("BERT is an encoder: it has no KV cache and does not generate")
        dtype = jnp.dtype(self.compute_dtype)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        if segments_BT is None:
            segments_BT = jnp.zeros((B, T), jnp.int32)
        if attention_mask_BT is not None:
            keys_BS = jnp.asarray(attention_mask_BT).astype(bool)
            pad_BTS = jnp.broadcast_to(keys_BS[:, None, :], (B, T, T))
            mask_BTS = pad_BTS if mask_BTS is None else (mask_BTS & pad_BTS)

        x_BTD, rope = add_positions(self, self.embed(tokens_BT, dtype) + self.segment_embed(segments_BT, dtype),
                                    positions_BT)
        x_BTD = self.embed_norm(x_BTD)
        if dropout_key is not None:
            dropout_key, embed_key = jax.random.split(dropout_key)
            x_BTD = dropout(x_BTD, self.dropout_rate, embed_key)
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))

        x_BTD, moe_stats = self._run_blocks(x_BTD, rope, mask_BTS, dropout_key)
        aux = moe_aux(moe_stats)
        if self.num_classes:
            aux["class_logits"] = self.classifier(self._pooled(x_BTD, dropout_key), dtype, out_dtype=jnp.float32)
            return ModelOutput(None, None, aux)

        # The head's activation is BERT's erf GELU whatever model.mlp says (as in BertConfig,
        # where one hidden_act serves both; only gelu is exportable anyway).
        h_BTD = jax.nn.gelu(self.head_dense(x_BTD, dtype), approximate=False)
        h_BTD = self.head_norm(h_BTD)
        logits_BTV = output_logits(self.embed, self.head, h_BTD, dtype)
        if self.out_bias is not None:
            logits_BTV = logits_BTV + self.out_bias[...]
        if self.nsp_head is not None:
            aux["nsp_logits"] = self.nsp_head(self._pooled(x_BTD, dropout_key), dtype, out_dtype=jnp.float32)
        return ModelOutput(constrain(logits_BTV, ("batch", "length", "vocab")), None, aux)

    def _pooled(self, x_BTD, dropout_key) -> jax.Array:
        """BERT's pooler: dense + tanh on the first ([CLS]) position, then dropout."""
        pooled_BD = jnp.tanh(self.pooler(x_BTD[:, 0], x_BTD.dtype))
        if dropout_key is not None:
            pooled_BD = dropout(pooled_BD, self.dropout_rate, jax.random.fold_in(dropout_key, 1))
        return pooled_BD

    def _run_blocks(self, x_BTD, rope, mask_BTS, dropout_key):
        """The GPT's execution modes over the same stacked parameters: scan or unrolled, remat."""
        kernel, block = self.attention_kernel, self.attention_block

        def call(layer, x, _cache, key):
            x, _, stats = layer(x, rope=rope, kernel=kernel, block=block, mask_BTS=mask_BTS, key=key, cache=None)
            return x, stats

        return run_layers(self, call, x_BTD, None, dropout_key)


def bert_flops_per_token(cfg: Config, shapes: dict) -> float:
    """6N + attention over the whole T x T score matrix (every token attends both ways)."""
    return 6 * matmul_params(cfg, shapes) + attention_flops(cfg, cfg.model.num_layers, causal=False)


BERT_ARCH = ArchSpec(kind="encoder", objectives=("mlm", "classify"), positions=("learned", "sinusoidal", "rope"),
                     moe=True)
register(Family("bert", {"bert": BERT_ARCH}, build=Bert, flops_per_token=bert_flops_per_token,
                describe="encoder-only Transformer: masked LM, next-sentence prediction, sequence classification"))
