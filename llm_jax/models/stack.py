"""What every family's network shares: the layer stack (stacked parameters run by scan or an
unrolled loop, remat, MoE groups), the embedding and position inputs, the output logits, and the
parameter and FLOP counts the MFU formula uses.

Block parameters are always stacked along a leading `layers` axis (created with `nnx.vmap`), so
the same checkpoint serves both execution modes: `lax.scan` over layers (compile time flat in
depth) or an unrolled Python loop over slices (sometimes faster on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.config import Config, ModelConfig
from llm_jax.models.base import Dims
from llm_jax.models.layers import MLP, Dense, Embed, rope_angles, sinusoidal_table
from llm_jax.models.moe import MoE

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_layers(num_layers: int, build) -> nnx.Module:
    """`num_layers` copies of `build(rngs)` with their parameters stacked on a leading `layers`
    axis: one checkpoint layout for scanned and unrolled execution, one sharding rule per weight."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs: nnx.Rngs) -> nnx.Module:
        return build(layer_rngs)

    return make


def output_layer(cfg, vocab_size: int, rngs: nnx.Rngs) -> Dense | None:
    """The untied output matrix [D, V], or None when the token embedding serves as it (tied)."""
    if cfg.tie_embeddings:
        return None
    return Dense((cfg.d_model,), (vocab_size,), ("embed", "vocab"), rngs=rngs, std=cfg.init_std, use_bias=False)


def score_layer(cfg: ModelConfig, rngs: nnx.Rngs) -> Dense | None:
    """`model.score_head`: a scalar per position [D, 1] read from the final-normed hidden state
    (a reward model's score, PPO's value), or None. Zero-initialised, as Hugging Face's reward
    and value heads start near zero, so a fresh head scores every text alike."""
    if not cfg.score_head:
        return None
    return Dense((cfg.d_model,), (1,), ("embed", None), rngs=rngs, std=0.0, use_bias=True,
                 init=nnx.initializers.zeros)


def head_outputs(model: nnx.Module, h_BTD: jax.Array, dtype, aux: dict) -> tuple[jax.Array, dict]:
    """(logits [B, T, V] float32, `aux` plus `score` [B, T] float32 when the model has a score
    head) from the final-normed hidden state `h_BTD`: every decoder family's outputs."""
    logits_BTV = output_logits(model.embed, model.head, h_BTD, dtype)
    if getattr(model, "score_head", None) is not None:
        aux = {**aux, "score": model.score_head(h_BTD, dtype, out_dtype=jnp.float32)[..., 0].astype(jnp.float32)}
    return logits_BTV, aux


def output_logits(embed: Embed, head: Dense | None, x_BTD: jax.Array, dtype) -> jax.Array:
    """Logits [B, T, V] in float32 through the tied embedding or the output matrix."""
    if head is None:
        return embed.attend(x_BTD, dtype)
    return head(x_BTD, dtype, out_dtype=jnp.float32)


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


def keep_settings(model: nnx.Module, cfg: ModelConfig, dims: Dims) -> None:
    """Store on `model` the static settings `add_positions`, `run_layers` and the attention
    calls read (every Transformer-like family)."""
    model.position = cfg.position
    model.rope_theta = cfg.rope_theta
    model.head_dim = cfg.head_dim
    model.max_seq_len = dims.max_seq_len
    model.dropout_rate = cfg.dropout
    model.scan_layers = cfg.scan_layers
    model.remat = cfg.remat
    model.compute_dtype = dims.compute_dtype
    model.attention_kernel = dims.attention_kernel
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
    layer_states = unstack(stacked, num_layers)
    layer_caches = unstack(cache, num_layers) if cache is not None else [None] * num_layers
    outs = []
    for i in range(num_layers):
        x_BTD, out = one_layer(x_BTD, layer_states[i], layer_caches[i], keys[i] if keys is not None else None)
        outs.append(out)
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def unstack(tree, n: int) -> list:
    """[tree of arrays with leading axis n] -> n trees of the slices."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [[x[0] for x in jnp.split(leaf, n, axis=0)] for leaf in leaves]
    return [jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(n)]




def add_feed_forward(block: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs, *, moe: bool, std: float,
                     out_std: float, kind: str | None = None) -> None:
    """The block's feed-forward: an MLP named `mlp`, or with `moe` a Mixture of Experts named
    `moe` (the names are the checkpoint layout). `kind` overrides `model.mlp` (BERT's exact GELU)."""
    block.is_moe = moe
    if moe:
        block.moe = MoE(cfg, rngs=rngs, std=std, out_std=out_std, kind=kind)
    else:
        block.mlp = MLP(cfg.d_model, cfg.ff_dim, kind or cfg.mlp, rngs=rngs, std=std, out_std=out_std,
                        use_bias=cfg.use_bias)


def feed_forward(block: nnx.Module, h: jax.Array, router_key: jax.Array | None, dropless: bool = False) -> tuple:
    """(the block's MLP or MoE on h, the MoE's routing statistics or None)."""
    if block.is_moe:
        return block.moe(h, router_key, dropless=dropless)
    return block.mlp(h), None


def moe_aux(stats: dict | None) -> dict:
    """The `aux` entry of a model's MoE statistics (none for a dense model)."""
    return {} if stats is None else {"moe": stats}


# ---------------------------------------------------------------- counts for MFU


def matmul_params(cfg: Config, shapes: dict) -> int:
    """Parameters that take part in a token's matmuls: all of them but the gathered tables (positions,
    segments; the input embedding when the output layer is untied) and the experts a token skips."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    for gathered in ("pos_embed", "segment_embed"):  # table lookups, not matmuls
        if gathered in shapes:
            total -= int(np.prod(shapes[gathered]["embedding"].shape))
    if not cfg.model.tie_embeddings:
        total -= int(np.prod(shapes["embed"]["embedding"].shape))
    return total - inactive_expert_params(cfg, shapes)


def inactive_expert_params(cfg: Config, shapes: dict) -> int:
    """Expert weights a token does not pass through: (E - k) / E of every MoE layer's experts.
    MFU counts active parameters only (a sparse model gets no credit for idle experts)."""
    moe = cfg.model.moe
    if not moe.enabled:
        return 0
    experts = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        if any(getattr(k, "key", None) == "experts" for k in path):
            experts += int(np.prod(leaf.shape))
    return experts * (moe.num_experts - moe.top_k) // moe.num_experts


def attention_flops(cfg: Config, layers: int, causal: bool, seq_len: int | None = None) -> float:
    """12 * L * H * Q * T per token for attention's two score matmuls (forward and backward),
    halved when causal (Kaplan et al.; PaLM)."""
    m = cfg.model
    flops = 12 * layers * m.num_heads * m.head_dim * (seq_len or cfg.train.seq_len)
    return flops / 2 if causal else flops


def decoder_flops_per_token(cfg: Config, shapes: dict) -> float:
    """6N + the causal attention term: a decoder-only Transformer's training FLOPs per token."""
    return 6 * matmul_params(cfg, shapes) + attention_flops(cfg, cfg.model.num_layers, causal=True)
