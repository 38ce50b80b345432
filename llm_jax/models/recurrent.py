"""Recurrent language models: Elman RNN, LSTM and GRU (`model.arch` rnn / lstm / gru).

The stack mirrors the GPT's so the trainer, the sharding rules and generation treat both alike:
token embedding, `num_layers` pre-norm residual layers x + dropout(Cell(Norm(x))), a final norm
and a tied or untied output layer. The hidden size of every cell is `d_model`, so a cell's
output adds straight onto the residual stream without a projection.

Speed: a cell's input projection x_t @ W_x does not depend on the state, so it is computed for
all T steps as one [B*T, D] x [D, G*D] matmul before the scan; only h @ W_h and the gate
nonlinearities run inside `lax.scan` over time. The recurrence runs in float32 whatever the
compute dtype: errors in h would otherwise compound over the sequence.

The "cache" of a recurrent model is its state after the last token: {"h": [layers, B, D]}
(plus "c" for the LSTM), float32; its size does not grow with the sequence. Layers ignore the
attention, position and MLP keys, scan_layers and remat.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.config import Config, ModelConfig
from llm_jax.config.families import ArchSpec
from llm_jax.models.base import Dims, Family, ModelOutput, register
from llm_jax.models.decoding import CausalDecoding
from llm_jax.models.layers import Dense, Embed, Norm, dropout
from llm_jax.models.stack import head_outputs, matmul_params, output_layer, score_layer, stack_layers, unstack
from llm_jax.parallel.rules import constrain

# Gate blocks per cell, in PyTorch's order: lstm (input, forget, cell, output), gru (reset,
# update, new); one weight holds all of a cell's gates so each projection is a single matmul.
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def cell_step(kind: str, state: dict, xp_BGH: jax.Array, w_HGH: jax.Array,
              b_GH: jax.Array | None) -> dict:
    """One time step of a cell, float32: `xp_BGH` = x_t @ W_x + b (precomputed), `w_HGH` = W_h.

    `b_GH` is the bias of the recurrent projection, used by the GRU only: its reset gate
    multiplies (W_hn h + b_hn), not just W_hn h (the Cho et al. 2014 / PyTorch form).
    """
    h_BH = state["h"]
    H = h_BH.shape[-1]
    G = w_HGH.shape[1]
    hp_BGH = (h_BH @ w_HGH.reshape(H, G * H)).reshape(-1, G, H)  # all gates in one matmul
    if b_GH is not None:
        hp_BGH = hp_BGH + b_GH
    if kind == "rnn":
        return {"h": jnp.tanh(xp_BGH[:, 0] + hp_BGH[:, 0])}
    if kind == "lstm":
        z_BGH = xp_BGH + hp_BGH
        i, f, o = (jax.nn.sigmoid(z_BGH[:, k]) for k in (0, 1, 3))
        g = jnp.tanh(z_BGH[:, 2])
        c_BH = f * state["c"] + i * g
        return {"h": o * jnp.tanh(c_BH), "c": c_BH}
    if kind == "gru":
        r = jax.nn.sigmoid(xp_BGH[:, 0] + hp_BGH[:, 0])
        z = jax.nn.sigmoid(xp_BGH[:, 1] + hp_BGH[:, 1])
        n = jnp.tanh(xp_BGH[:, 2] + r * hp_BGH[:, 2])
        return {"h": (1.0 - z) * n + z * h_BH}
    raise ValueError(f"unknown recurrent cell {kind!r}")


def run_cell(kind: str, xp_BTGH: jax.Array, w_HGH: jax.Array, b_GH: jax.Array | None,
             state: dict, valid_BT: jax.Array | None = None,
             reset_BT: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Scan `cell_step` over time: (outputs h_t [B, T, H], final state).

    Where `valid_BT` is False (left padding of a prompt) the state passes through unchanged, so
    a padded row ends in exactly the state it would reach alone. Where `reset_BT` is True (a
    packed segment's first token) the step starts from the zero state, as a new row would.
    """
    xs_TBGH = jnp.swapaxes(xp_BTGH.astype(jnp.float32), 0, 1)  # scan runs over the leading axis
    w_HGH = w_HGH.astype(jnp.float32)
    b_GH = None if b_GH is None else b_GH.astype(jnp.float32)
    valid_TB = None if valid_BT is None else jnp.swapaxes(valid_BT, 0, 1)
    reset_TB = None if reset_BT is None else jnp.swapaxes(reset_BT, 0, 1)

    def body(carry, inputs):
        xp_BGH, valid_B, reset_B = inputs
        if reset_B is not None:
            carry = jax.tree.map(lambda s: jnp.where(reset_B[:, None], 0.0, s), carry)
        new = cell_step(kind, carry, xp_BGH, w_HGH, b_GH)
        if valid_B is not None:
            new = jax.tree.map(lambda n, o: jnp.where(valid_B[:, None], n, o), new, carry)
        return new, new["h"]

    state = jax.tree.map(lambda s: s.astype(jnp.float32), state)
    state, hs_TBH = jax.lax.scan(body, state, (xs_TBGH, valid_TB, reset_TB))
    return jnp.swapaxes(hs_TBH, 0, 1), state


def real_tokens(mask_BTS: jax.Array | None, cache_index, B: int, T: int) -> jax.Array | None:
    """[B, T] False where a token may not attend to its own slot (the left padding `generate`
    adds), read off the diagonal of `mask_BTS`; None without a mask. State-carrying models (the
    recurrent cells, Mamba) leave their state untouched at those tokens."""
    if mask_BTS is None:
        return None
    start = 0 if cache_index is None else cache_index
    slot_BT1 = jnp.broadcast_to((start + jnp.arange(T))[None, :, None], (B, T, 1))
    return jnp.take_along_axis(jnp.broadcast_to(mask_BTS, (B, T, mask_BTS.shape[-1])), slot_BT1, axis=2)[..., 0]


def segment_starts(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, T] True at the first token of each segment after the row's first: where a packed row's
    next document begins and a state-carrying model (the recurrent cells, Mamba) drops its state."""
    change_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    return jnp.pad(change_BT, ((0, 0), (1, 0)))


def init_state(kind: str, num_layers: int, batch: int, width: int) -> dict:
    """The zero state every sequence starts from: h (and the LSTM's c), [layers, batch, width]."""
    names = ("h", "c") if kind == "lstm" else ("h",)
    return {n: jnp.zeros((num_layers, batch, width), jnp.float32) for n in names}


class RecurrentLayer(nnx.Module):
    """x + dropout(Cell(Norm(x))): a pre-norm residual layer, like a Transformer block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, G = cfg.d_model, GATES[cfg.arch]
        self.kind = cfg.arch
        self.dropout_rate = cfg.dropout
        # 1/sqrt(D) (PyTorch's scale) rather than init_std: the inputs are normalised, so the
        # gate pre-activations start at unit scale, and W_h starts near the edge of stability
        # instead of forgetting everything in a few steps.
        std = 1.0 / math.sqrt(D)
        self.norm = Norm(D, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)
        # Kernels [D, gates, H]: the hidden width H is `mlp` (split over `tensor`), so each
        # tensor shard holds every gate of its slice of hidden units and the gate arithmetic
        # stays local; the gates axis is never split.
        self.inp = Dense((D,), (G, D), ("embed", "gates", "mlp"), rngs=rngs, std=std, use_bias=True)
        # Only the GRU needs a recurrent bias (b_hn sits inside the reset gate's product); for
        # the others it would duplicate the input bias.
        self.rec = Dense((D,), (G, D), ("embed", "gates", "mlp"), rngs=rngs, std=std,
                         use_bias=cfg.arch == "gru")
        if cfg.arch == "lstm":
            # Forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015): remember by default.
            self.inp.bias[...] = self.inp.bias[...].at[1].set(1.0)

    def __call__(self, x_BTD: jax.Array, state: dict, valid_BT: jax.Array | None,
                 key: jax.Array | None, reset_BT: jax.Array | None = None) -> tuple[jax.Array, dict]:
        dtype = x_BTD.dtype
        xp_BTGH = self.inp(self.norm(x_BTD), dtype, out_dtype=jnp.float32)  # all T steps at once
        xp_BTGH = constrain(xp_BTGH, ("batch", "length", "gates", "mlp"))
        b = self.rec.bias[...] if self.rec.bias is not None else None
        # The recurrent weight is gathered over fsdp once, before the scan (FSDP gathers a weight
        # before use anyway). Left split over fsdp while the batch is split over data and fsdp,
        # XLA's partitioning of the scan's backward pass gave wrong gradients for the Elman RNN
        # (found by tests/test_families.py; reproduced with a bare lax.scan, jax 0.10.2).
        w_HGH = constrain(self.rec.kernel[...], (None, "gates", "mlp"))
        h_BTH, state = run_cell(self.kind, xp_BTGH, w_HGH, b, state, valid_BT, reset_BT)
        x_BTD = x_BTD + dropout(h_BTH.astype(dtype), self.dropout_rate, key)
        return constrain(x_BTD, ("batch", "length", "embed")), state


class RecurrentLM(nnx.Module):
    """A stack of recurrent layers as a causal LM, called like `GPT`.

    Keys that only concern attention or positions (num_heads, num_kv_heads, position,
    attention, d_ff, mlp, ...) are ignored; so are scan_layers and remat.
    """

    def __init__(self, cfg: ModelConfig, dims: Dims, rngs: nnx.Rngs):
        vocab_size = dims.vocab_size
        self.kind = cfg.arch
        self.num_layers = cfg.num_layers
        self.d_model = cfg.d_model
        self.dropout_rate = cfg.dropout
        self.compute_dtype = dims.compute_dtype

        self.embed = Embed(vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs, std=cfg.init_std)

        # Stacked along a leading `layers` axis like the GPT's blocks (same checkpoint layout).
        self.layers = stack_layers(cfg.num_layers, lambda layer_rngs: RecurrentLayer(cfg, rngs=layer_rngs))(rngs)
        self.final_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, rngs=rngs)
        self.head = output_layer(cfg, vocab_size, rngs)
        self.score_head = score_layer(cfg, rngs)

    def init_cache(self, batch: int, slots: int, dtype) -> dict:
        """The zero start state: no length axis (`slots` is unused), always float32."""
        del slots, dtype
        return init_state(self.kind, self.num_layers, batch, self.d_model)

    def __call__(self, tokens_BT: jax.Array, *, positions_BT: jax.Array | None = None,
                 mask_BTS: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | None = None,
                 dropout_key: jax.Array | None = None, segment_ids_BT: jax.Array | None = None) -> ModelOutput:
        """Logits [B, T, V] in float32, and the final state when `cache` (a start state) is given.
        `segment_ids_BT` (packed rows): every layer's state restarts from zero at each segment.

        `positions_BT` is ignored: order is implicit in the recurrence. `mask_BTS` is read only
        on its diagonal: a token that may not attend to its own slot (mask_BTS[b, t,
        cache_index + t] False, i.e. the left padding `generate` adds) leaves the state as it is.
        """
        del positions_BT
        dtype = jnp.dtype(self.compute_dtype)
        B, T = tokens_BT.shape
        valid_BT = real_tokens(mask_BTS, cache_index, B, T)
        reset_BT = None if segment_ids_BT is None else segment_starts(segment_ids_BT)
        state = cache if cache is not None else init_state(self.kind, self.num_layers, B, self.d_model)

        x_BTD = self.embed(tokens_BT, dtype)
        keys = None
        if dropout_key is not None:
            embed_key, *keys = jax.random.split(dropout_key, self.num_layers + 1)
            x_BTD = dropout(x_BTD, self.dropout_rate, embed_key)
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))

        # An unrolled loop over layers: each layer is already a scan over time, and a
        # recurrent stack is shallow.
        graphdef, stacked = nnx.split(self.layers)
        layer_states = unstack(stacked, self.num_layers)
        states = unstack(state, self.num_layers)
        new_states = []
        for i in range(self.num_layers):
            layer = nnx.merge(graphdef, layer_states[i])
            x_BTD, s = layer(x_BTD, states[i], valid_BT, keys[i] if keys is not None else None, reset_BT)
            new_states.append(s)

        logits_BTV, aux = head_outputs(self, self.final_norm(x_BTD), dtype, {})
        logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
        new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_states)
        return ModelOutput(logits_BTV, new_cache, aux)


def recurrent_flops_per_token(cfg: Config, shapes: dict) -> float:
    """6N: every FLOP of a step is a matmul against a parameter (input and recurrent projections,
    the output layer); no attention over the context."""
    return 6 * matmul_params(cfg, shapes)


RECURRENT_ARCH = ArchSpec(kind="decoder", objectives=("causal", "masked_causal"), attends=lambda model: False)
register(Family("recurrent", {kind: RECURRENT_ARCH for kind in GATES}, build=RecurrentLM,
                flops_per_token=recurrent_flops_per_token, decoding=CausalDecoding(),
                describe="recurrent LMs: Elman RNN, LSTM, GRU cells in pre-norm residual layers"))
