"""The selective scan of Mamba (Gu and Dao 2023), in float32, three ways.

With per-step decay a_t = exp(delta_t * A) and input b_t = delta_t * B_t * x_t (all [B, D, N]),
the state runs h_t = a_t * h_{t-1} + b_t and the output is y_t = sum_n h_t[..., n] C_t[n] + D x_t.
The recurrence is a composition of affine maps h -> a h + b, which is associative:
(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2). Hence:

- `sequential`: `lax.scan` one step at a time (the reference; memory of its backward: T states).
- `associative`: `lax.associative_scan` over the whole sequence: O(log T) depth, parallel like a
  Transformer's layers, but a, b and every state [B, T, D, N] live at once.
- `chunked`: a `lax.scan` over chunks of `chunk` steps carrying the state, the associative scan
  inside each chunk, and the chunk rematerialised in the backward pass, so only [B, T, D]-sized
  inputs and outputs plus one chunk's [B, chunk, D, N] are ever held: memory does not grow with
  T * D * N.
- `pallas`: the fused kernels of `models.ssm_pallas` (the state held in VMEM, nothing of
  [B, T, D, N] in HBM, the backward pass recomputing each chunk's states); Mosaic on TPU, Pallas
  interpret mode on CPU. The S4-like ablation's constant B, C ([D, N]) run `chunked` instead.
- `pallas_gpu`: the same fused scan as Triton kernels (`models.ssm_pallas_gpu`: each program walks
  the sequence with its state in registers); Triton on GPU, interpret mode on CPU; the ablation
  runs `chunked` here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_jax.parallel.platform import target_platform

SCANS = ("associative", "chunked", "pallas", "pallas_gpu", "sequential")


def _combine(left: tuple, right: tuple) -> tuple:
    """(a1, b1) followed by (a2, b2): h -> a2 (a1 h + b1) + b2."""
    a1, b1 = left
    a2, b2 = right
    return a2 * a1, a2 * b1 + b2


def _discretise(x_BTD, delta_BTD, A_DN, B_BTN, C_BTN, keep_BT):
    """a = exp(delta A) and b = delta B x, [B, T, D, N]; B and C are [B, T, N] (selective) or
    [D, N] (the S4-like ablation: the same for every step). `keep_BT` (None: always) is 0 where the
    state restarts (a packed segment's first token): a = 0 there, so h_t = b_t."""
    a = jnp.exp(delta_BTD[..., None] * A_DN)
    if keep_BT is not None:
        a = a * keep_BT[:, :, None, None]
    Bx = B_BTN[:, :, None, :] if B_BTN.ndim == 3 else B_BTN
    return a, (delta_BTD * x_BTD)[..., None] * Bx


def _read(h_BTDN, C_BTN):
    Cx = C_BTN[:, :, None, :] if C_BTN.ndim == 3 else C_BTN
    return jnp.sum(h_BTDN * Cx, axis=-1)


def _associative(x, delta, A, B, C, h0, keep=None):
    a, b = _discretise(x, delta, A, B, C, keep)
    a_cum, h = jax.lax.associative_scan(_combine, (a, b), axis=1)
    h = h + a_cum * h0[:, None]  # the start state, carried through every step's decay
    return _read(h, C), h[:, -1]


def _sequential(x, delta, A, B, C, h0, keep=None):
    shared = B.ndim == 2  # the ablation's constant B, C

    def step(h, inputs):
        x_t, delta_t, B_t, C_t, keep_t = inputs
        a_t = jnp.exp(delta_t[..., None] * A)
        if keep_t is not None:
            a_t = a_t * keep_t[:, None, None]
        b_t = (delta_t * x_t)[..., None] * (B if shared else B_t[:, None, :])
        h = a_t * h + b_t
        return h, jnp.sum(h * (C if shared else C_t[:, None, :]), axis=-1)

    def time_major(v):  # the ablation's constant B, C ([D, N]) are not per step
        return None if v.ndim == 2 else jnp.swapaxes(v, 0, 1)

    keep_TB = None if keep is None else jnp.swapaxes(keep, 0, 1)
    h, y_TBD = jax.lax.scan(step, h0, (time_major(x), time_major(delta), time_major(B), time_major(C), keep_TB))
    return jnp.swapaxes(y_TBD, 0, 1), h


def _chunked(x, delta, A, B, C, h0, chunk: int, keep=None):
    Bsz, T, D = x.shape
    pad = -T % chunk
    if pad:  # delta = 0 gives a = 1, b = 0: padded steps leave the state as it is
        x, delta = (jnp.pad(v, ((0, 0), (0, pad), (0, 0))) for v in (x, delta))
        if B.ndim == 3:
            B, C = (jnp.pad(v, ((0, 0), (0, pad), (0, 0))) for v in (B, C))
        if keep is not None:
            keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1)
    n = (T + pad) // chunk

    def split(v):  # [B, T, ...] -> [n, B, chunk, ...]; None stays None
        return None if v is None else jnp.swapaxes(v.reshape(Bsz, n, chunk, *v.shape[2:]), 0, 1)

    def split_steps(v):  # the ablation's constant B, C ([D, N]) are not split
        return None if v.ndim == 2 else split(v)

    @jax.checkpoint
    def body(h, inputs):
        x_c, delta_c, B_c, C_c, keep_c = inputs
        y_c, h = _associative(x_c, delta_c, A, B if B_c is None else B_c, C if C_c is None else C_c, h, keep_c)
        return h, y_c

    h, y = jax.lax.scan(body, h0, (split(x), split(delta), split_steps(B), split_steps(C), split(keep)))
    y = jnp.swapaxes(y, 0, 1).reshape(Bsz, n * chunk, D)
    return y[:, :T], h


def resolve_scan(mode: str) -> str:
    """`auto`: `sequential` on CPU, where the parallel forms only add work (measured on the
    mamba_small mixer, L = 256, forward + backward: sequential 37 ms, associative 71 ms,
    chunked 66-106 ms), `chunked` on accelerators. It never picks `pallas` or `pallas_gpu`: the
    kernels have not been timed on a TPU or a GPU yet."""
    if mode != "auto":
        return mode
    return "sequential" if target_platform() == "cpu" else "chunked"


def selective_scan(x_BTD: jax.Array, delta_BTD: jax.Array, A_DN: jax.Array, B_BTN: jax.Array,
                   C_BTN: jax.Array, D_D: jax.Array, h0_BDN: jax.Array | None = None, *,
                   mode: str = "chunked", chunk: int = 64,
                   reset_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """y [B, T, D] = sum_n h_t C_t + D x_t and the last state [B, D, N], all in float32.

    `B_BTN`, `C_BTN`: [B, T, N] per step (selective), or [D, N] constants (the ablation).
    `h0_BDN`: the state before the first step (default zeros). `reset_BT` (bool, packed rows):
    the state is dropped before these steps (decay a_t = 0), as if a new sequence started there.
    """
    f32 = jnp.float32
    x, delta, A, B, C = (v.astype(f32) for v in (x_BTD, delta_BTD, A_DN, B_BTN, C_BTN))
    h0 = jnp.zeros((x.shape[0], *A.shape), f32) if h0_BDN is None else h0_BDN.astype(f32)
    keep = None if reset_BT is None else jnp.where(reset_BT, 0.0, 1.0).astype(f32)
    mode = resolve_scan(mode)
    if mode == "associative":
        y, h = _associative(x, delta, A, B, C, h0, keep)
    elif mode == "sequential":
        y, h = _sequential(x, delta, A, B, C, h0, keep)
    elif mode == "chunked" or (mode in ("pallas", "pallas_gpu") and B.ndim == 2):  # kernels: per-step B, C only
        y, h = _chunked(x, delta, A, B, C, h0, chunk, keep)
    elif mode == "pallas":
        from llm_jax.models.ssm_pallas import sharded_pallas_scan  # Pallas loads only when chosen

        y, h = sharded_pallas_scan(x, delta, A, B, C, h0, chunk, keep)
    elif mode == "pallas_gpu":
        from llm_jax.models.ssm_pallas import sharded_pallas_scan
        from llm_jax.models.ssm_pallas_gpu import pallas_gpu_scan

        y, h = sharded_pallas_scan(x, delta, A, B, C, h0, chunk, keep, scan=pallas_gpu_scan)
    else:
        raise ValueError(f"unknown scan {mode!r}; choose from {SCANS}")
    return y + x * D_D.astype(f32), h
