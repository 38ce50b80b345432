"""GPT (`model.arch=gpt`): the decoder-only Transformer, pre-norm blocks over a stacked layer axis.

Learned, sinusoidal or rotary positions; LayerNorm or RMSNorm; GELU, ReLU or SwiGLU; grouped-query
attention; optionally an MoE feed-forward in every `model.moe.every`-th block. The `gpt2`, `llama`
and `mixtral` presets are configurations of it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.config import ModelConfig
from llm_jax.config.families import ArchSpec
from llm_jax.models.attention import Attention
from llm_jax.models.base import Dims, Family, ModelOutput, register
from llm_jax.models.decoding import CausalDecoding
from llm_jax.models.layers import Embed, Norm, dropout
from llm_jax.models.stack import (
    add_feed_forward,
    add_positions,
    decoder_flops_per_token,
    feed_forward,
    group_cache,
    head_outputs,
    keep_settings,
    layer_unit,
    moe_aux,
    output_layer,
    run_layers,
    score_layer,
    stack_layers,
    ungroup_cache,
)
from llm_jax.parallel.rules import constrain


class Block(nnx.Module):
    """x + Attn(Norm(x)), then x + FFN(Norm(x)); residual dropout on both branches.

    The FFN is the MLP, or with `moe=True` a Mixture of Experts (`models.moe`). Returns the new
    x, the new KV cache and the MoE routing statistics (None for an MLP block).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.num_layers)  # GPT-2: scale residual projections by depth
        self.dropout_rate = cfg.dropout
        self.norm1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, rngs=rngs,
                              std=std, out_std=out_std, use_bias=cfg.use_bias)
        self.norm2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)
        add_feed_forward(self, cfg, rngs, moe=moe, std=std, out_std=out_std)

    def __call__(self, x_BTD, *, rope, kernel, block, mask_BTS, cache, cache_index, key, compute_dtype=None,
                 segment_ids_BT=None):
        """`compute_dtype` (default x's dtype): the branches' dtype under a residual stream kept in
        another one (a Mamba hybrid's float32 stream). `segment_ids_BT`: packed rows' documents,
        which attention keeps apart."""
        dtype = compute_dtype or x_BTD.dtype
        k_attn, k_mlp, k_router = jax.random.split(key, 3) if key is not None else (None, None, None)
        h_BTD, new_cache = self.attn(self.norm1(x_BTD).astype(dtype), rope=rope, kernel=kernel, block=block,
                                     mask_BTS=mask_BTS, cache=cache, cache_index=cache_index,
                                     segment_ids_BT=segment_ids_BT)
        x_BTD = x_BTD + dropout(h_BTD, self.dropout_rate, k_attn).astype(x_BTD.dtype)
        # A cached decode step must not drop a token to a full expert.
        h_BTD, stats = feed_forward(self, self.norm2(x_BTD).astype(dtype), k_router, dropless=cache is not None)
        x_BTD = x_BTD + dropout(h_BTD, self.dropout_rate, k_mlp).astype(x_BTD.dtype)
        return constrain(x_BTD, ("batch", "length", "embed")), new_cache, stats


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, dims: Dims, rngs: nnx.Rngs):
        keep_settings(self, cfg, dims)
        self.kv_shape = (cfg.num_layers, cfg.kv_heads, cfg.head_dim)
        self.embed = Embed(dims.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs, std=cfg.init_std)
        self.pos_embed = (Embed(dims.max_seq_len, cfg.d_model, ("position", "embed"), rngs=rngs, std=cfg.init_std)
                          if cfg.position == "learned" else None)

        self.group = cfg.moe.every if cfg.moe.enabled else 1
        self.blocks = stack_layers(cfg.num_layers // self.group, layer_unit(cfg, Block))(rngs)
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)
        self.head = output_layer(cfg, dims.vocab_size, rngs)
        self.score_head = score_layer(cfg, rngs)

    def init_cache(self, batch: int, slots: int, dtype) -> dict:
        """An empty KV cache: k and v of shape [layers, batch, slots, kv_heads, head_dim]."""
        layers, kv_heads, head_dim = self.kv_shape
        shape = (layers, batch, slots, kv_heads, head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 mask_BTS: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> ModelOutput:
        """Logits [B, T, V] in float32, the updated KV cache when `cache` is given, and the MoE
        layers' routing statistics (`aux["moe"]`, stacked over MoE layers) when there are any.

        `positions_BT` default to 0..T-1; `mask_BTS` (True = may attend) replaces the causal
        mask for padded prompts and for attention over a cache of length S. `segment_ids_BT`
        (packed rows, `train.packing`): a token attends only within its own segment; the
        positions of a packed row restart at each segment (the objective passes them).
        """
        dtype = jnp.dtype(self.compute_dtype)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        x_BTD, rope = add_positions(self, self.embed(tokens_BT, dtype), positions_BT)
        if dropout_key is not None:
            dropout_key, embed_key = jax.random.split(dropout_key)
            x_BTD = dropout(x_BTD, self.dropout_rate, embed_key)
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))

        x_BTD, (new_cache, moe_stats) = self._run_blocks(x_BTD, rope, mask_BTS, group_cache(cache, self.group),
                                                         cache_index, dropout_key, segment_ids_BT)
        new_cache = ungroup_cache(new_cache, self.group)
        logits_BTV, aux = head_outputs(self, self.final_norm(x_BTD), dtype, moe_aux(moe_stats))
        return ModelOutput(constrain(logits_BTV, ("batch", "length", "vocab")), new_cache, aux)

    def _run_blocks(self, x_BTD, rope, mask_BTS, cache, cache_index, dropout_key, segment_ids_BT):
        kernel, block = self.attention_kernel, self.attention_block

        def call(layer, x, layer_cache, key):
            x, new_layer_cache, stats = layer(x, rope=rope, kernel=kernel, block=block, mask_BTS=mask_BTS,
                                              cache=layer_cache, cache_index=cache_index, key=key,
                                              segment_ids_BT=segment_ids_BT)
            return x, (new_layer_cache, stats)

        return run_layers(self, call, x_BTD, cache, dropout_key)




GPT_ARCH = ArchSpec(kind="decoder", objectives=("causal", "masked_causal"), positions=("learned", "sinusoidal", "rope"),
                    moe=True)
register(Family("gpt", {"gpt": GPT_ARCH}, build=GPT, flops_per_token=decoder_flops_per_token,
                decoding=CausalDecoding(), describe="decoder-only Transformer (GPT-2, Llama, Mixtral shapes)"))
