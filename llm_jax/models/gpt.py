"""Decoder-only Transformer (GPT family): pre-norm blocks over a stacked layer axis.

Block parameters are always stacked along a leading `layers` axis (created with `nnx.vmap`),
so the same checkpoint serves both execution modes: `lax.scan` over layers (compile time flat
in depth) or an unrolled Python loop over slices (sometimes faster on CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.config.model import ModelConfig
from llm_jax.models.attention import Attention
from llm_jax.models.layers import (
    MLP,
    Embed,
    Norm,
    dropout,
    output_layer,
    output_logits,
    rope_angles,
    sinusoidal_table,
    stack_layers,
)
from llm_jax.models.moe import MoE
from llm_jax.parallel.rules import constrain

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
        if moe:
            self.moe = MoE(cfg, rngs=rngs, std=std, out_std=out_std)
        else:
            self.mlp = MLP(cfg.d_model, cfg.ff_dim, cfg.mlp, rngs=rngs, std=std, out_std=out_std,
                           use_bias=cfg.use_bias)

    def __call__(self, x_BTD, *, rope, kernel, block, mask_BTS, cache, cache_index, key, compute_dtype=None):
        """`compute_dtype` (default x's dtype): the branches' dtype under a residual stream kept in
        another one (a Mamba hybrid's float32 stream)."""
        dtype = compute_dtype or x_BTD.dtype
        k_attn, k_mlp, k_router = jax.random.split(key, 3) if key is not None else (None, None, None)
        h_BTD, new_cache = self.attn(self.norm1(x_BTD).astype(dtype), rope=rope, kernel=kernel, block=block,
                                     mask_BTS=mask_BTS, cache=cache, cache_index=cache_index)
        x_BTD = x_BTD + dropout(h_BTD, self.dropout_rate, k_attn).astype(x_BTD.dtype)
        stats = None
        if hasattr(self, "moe"):
            h_BTD, stats = self.moe(self.norm2(x_BTD).astype(dtype), k_router, dropless=cache is not None)
        else:
            h_BTD = self.mlp(self.norm2(x_BTD).astype(dtype))
        x_BTD = x_BTD + dropout(h_BTD, self.dropout_rate, k_mlp).astype(x_BTD.dtype)
        return constrain(x_BTD, ("batch", "length", "embed")), new_cache, stats


class BlockGroup(nnx.Module):
    """`model.moe.every` blocks whose last has the MoE FFN: the repeating unit (stacked over
    layers) of a model with an MoE layer every k-th block. Its cache slice is [k, ...].
    `block_cls` is the family's block (GPT's `Block`, BERT's `BertBlock`, the encoder-decoders'
    `EncoderBlock` and `DecoderBlock`)."""

    def __init__(self, cfg: ModelConfig, block_cls: type, *, rngs: nnx.Rngs):
        self.size = cfg.moe.every
        for i in range(self.size - 1):
            setattr(self, f"dense{i}", block_cls(cfg, rngs=rngs))
        self.moe_block = block_cls(cfg, rngs=rngs, moe=True)

    def __call__(self, x_BTD, *, cache, key, **kwargs):
        blocks = [getattr(self, f"dense{i}") for i in range(self.size - 1)] + [self.moe_block]
        keys = jax.random.split(key, self.size) if key is not None else [None] * self.size
        new_caches = []
        for i, layer in enumerate(blocks):
            layer_cache = jax.tree.map(lambda a: a[i], cache) if cache is not None else None
            x_BTD, c, stats = layer(x_BTD, cache=layer_cache, key=keys[i], **kwargs)
            new_caches.append(c)
        new_cache = jax.tree.map(lambda *a: jnp.stack(a), *new_caches) if cache is not None else None
        return x_BTD, new_cache, stats


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int, *, compute_dtype: str,
                 attention_kernel: str, rngs: nnx.Rngs):
        keep_settings(self, cfg, max_seq_len, compute_dtype, attention_kernel)

        self.embed = Embed(vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs, std=cfg.init_std)
        self.pos_embed = (Embed(max_seq_len, cfg.d_model, ("position", "embed"), rngs=rngs, std=cfg.init_std)
                          if cfg.position == "learned" else None)

        self.group = cfg.moe.every if cfg.moe.enabled else 1
        self.blocks = stack_layers(cfg.num_layers // self.group, layer_unit(cfg, Block))(rngs)
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)
        self.head = output_layer(cfg, vocab_size, rngs)

    def __call__(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 mask_BTS: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 with_moe_stats: bool = False) -> tuple:
        """Logits [B, T, V] in float32 (and the updated KV cache when `cache` is given).

        `positions_BT` default to 0..T-1; `mask_BTS` (True = may attend) replaces the causal
        mask for padded prompts and for attention over a cache of length S. With
        `with_moe_stats`, a third value: the MoE layers' routing statistics (`models.moe.MoE`),
        each stacked over MoE layers, or None for a dense model.
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
                                                         cache_index, dropout_key)
        new_cache = ungroup_cache(new_cache, self.group)
        logits_BTV = constrain(output_logits(self.embed, self.head, self.final_norm(x_BTD), dtype),
                               ("batch", "length", "vocab"))
        if with_moe_stats:
            return logits_BTV, new_cache, moe_stats
        return logits_BTV, new_cache

    def _run_blocks(self, x_BTD, rope, mask_BTS, cache, cache_index, dropout_key):
        kernel, block = self.attention_kernel, self.attention_block

        def call(layer, x, layer_cache, key):
            x, new_layer_cache, stats = layer(x, rope=rope, kernel=kernel, block=block, mask_BTS=mask_BTS,
                                              cache=layer_cache, cache_index=cache_index, key=key)
            return x, (new_layer_cache, stats)

        return run_layers(self, call, x_BTD, cache, dropout_key)


def group_cache(cache: dict | None, group: int) -> dict | None:
    """A KV cache [L, ...] as [L/k, k, ...], matching layers stacked in groups of k (`BlockGroup`)."""
    if cache is None or group == 1:
        return cache
    return jax.tree.map(lambda a: a.reshape(-1, group, *a.shape[1:]), cache)


def ungroup_cache(cache: dict | None, group: int) -> dict | None:
    """`group_cache` undone: [L/k, k, ...] -> [L, ...]."""
    if cache is None or group == 1:
        return cache
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), cache)


def layer_unit(cfg: ModelConfig, block_cls: type):
    """rngs -> the stacked unit of a layer stack: a block, or with MoE a group of
    `model.moe.every` blocks ending in an MoE one (every = 1: an MoE block)."""
    if not cfg.moe.enabled:
        return lambda rngs: block_cls(cfg, rngs=rngs)
    if cfg.moe.every == 1:
        return lambda rngs: block_cls(cfg, rngs=rngs, moe=True)
    return lambda rngs: BlockGroup(cfg, block_cls, rngs=rngs)


def keep_settings(model: nnx.Module, cfg: ModelConfig, max_seq_len: int, compute_dtype: str,
                  attention_kernel: str | None = None) -> None:
    """Store on `model` the static settings `add_positions`, `run_layers` and the attention
    calls read (GPT, BERT, the encoder-decoders)."""
    model.position = cfg.position
    model.rope_theta = cfg.rope_theta
    model.head_dim = cfg.head_dim
    model.max_seq_len = max_seq_len
    model.dropout_rate = cfg.dropout
    model.scan_layers = cfg.scan_layers
    model.remat = cfg.remat
    model.compute_dtype = compute_dtype
    model.attention_kernel = attention_kernel
    model.attention_block = cfg.attention_block


def add_positions(model: nnx.Module, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, tuple | None]:
    """Add learned or sinusoidal positions to the embedded tokens, or return RoPE's angles.

    `model` carries `position`, `pos_embed`, `max_seq_len`, `head_dim` and `rope_theta` (GPT, BERT).
    """
    dtype = x_BTD.dtype
    if model.position == "learned":
        x_BTD = x_BTD + jnp.take(model.pos_embed.embedding[...], positions_BT, axis=0).astype(dtype)
    elif model.position == "sinusoidal":
        table = sinusoidal_table(model.max_seq_len, x_BTD.shape[-1])
        x_BTD = x_BTD + jnp.take(table, positions_BT, axis=0).astype(dtype)
    rope = rope_angles(positions_BT, model.head_dim, model.rope_theta) if model.position == "rope" else None
    return x_BTD, rope


def run_layers(model: nnx.Module, call, x_BTD: jax.Array, cache, dropout_key, blocks: nnx.Module | None = None):
    """Run `blocks` (stacked; default `model.blocks`) over x by `lax.scan` or an unrolled loop,
    with remat.

    `call(layer, x, layer_cache, key) -> (x, out)`, where `out` is the new layer cache (or any
    pytree of per-layer outputs); returns x and the outputs stacked over layers. `cache` is
    stacked per layer or None. `model` carries `scan_layers` and `remat` (GPT, BERT, the
    encoder-decoders).
    """
    graphdef, stacked = nnx.split(model.blocks if blocks is None else blocks)
    num_layers = jax.tree.leaves(stacked)[0].shape[0]

    def one_layer(x, layer_state, layer_cache, key):
        return call(nnx.merge(graphdef, layer_state), x, layer_cache, key)

    if model.remat != "none":
        one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[model.remat])
    keys = jax.random.split(dropout_key, num_layers) if dropout_key is not None else None

    if model.scan_layers:
        def body(x, xs):
            layer_state, layer_cache, key = xs
            return one_layer(x, layer_state, layer_cache, key)

        return jax.lax.scan(body, x_BTD, (stacked, cache, keys))

    # Unstack with one split per array: its gradient is a single concatenate, where
    # per-layer indexing would pad every layer's gradient to the full stacked shape.
    layer_states = _unstack(stacked, num_layers)
    layer_caches = _unstack(cache, num_layers) if cache is not None else [None] * num_layers
    outs = []
    for i in range(num_layers):
        x_BTD, out = one_layer(x_BTD, layer_states[i], layer_caches[i], keys[i] if keys is not None else None)
        outs.append(out)
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _unstack(tree, n: int) -> list:
    """[tree of arrays with leading axis n] -> n trees of the slices."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [[x[0] for x in jnp.split(leaf, n, axis=0)] for leaf in leaves]
    return [jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(n)]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> dict:
    """An empty KV cache: k and v of shape [layers, batch, length, kv_heads, head_dim]."""
    shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
