"""The fused Pallas selective scan (`model.ssm.scan=pallas`, run here in Pallas interpret mode)
equals the sequential reference with gradients of every input, with and without packed-row
restarts and a start state; in a Mamba model; split over a CPU mesh (data x tensor); and its
kernels (forward and backward) compile for a TPU through Mosaic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.config import load_config
from llm_jax.models.base import Dims
from llm_jax.models.mamba import MambaLM
from llm_jax.models.ssm import selective_scan
from llm_jax.train.aot import compile_lowered

# float32 throughout; the kernel sums in the same order as the reference except for dA (over
# batch rows and chunks) and dB, dC (over channel tiles). Interpret mode compiles slowly (about
# 3 s per kernel pair on CPU): one case runs in the quick loop, the others are marked slow.
RTOL, ATOL = 1e-5, 1e-5


def scan_args(T: int = 40, D: int = 16, N: int = 4, seed: int = 0, restarts: bool = True):
    """(x, delta, A, B, C, D, h0) and reset [B, T] (None without restarts)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    args = (normal(2, T, D), jax.nn.softplus(normal(2, T, D)), -jnp.exp(normal(D, N)), normal(2, T, N),
            normal(2, T, N), normal(D), normal(2, D, N) * 0.5)
    reset = jnp.asarray(rng.random((2, T)) < 0.1) if restarts else None
    return args, reset


def outputs_and_grads(mode: str, args: tuple, reset, h0: bool = True, chunk: int = 8):
    """y, the last state and the gradients of a random-weighted sum of both w.r.t. every input."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=args[0].shape), jnp.float32)
    inputs = args if h0 else args[:6]

    @jax.jit
    def run(*a):
        def loss(*a):
            y, h = selective_scan(*a, mode=mode, chunk=chunk, reset_BT=reset)
            return (y * weights).sum() + (h * jnp.cos(h)).sum()

        return selective_scan(*a, mode=mode, chunk=chunk, reset_BT=reset), jax.grad(loss, range(len(a)))(*a)

    return run(*inputs)


def assert_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * max(1.0, float(jnp.abs(w).max())))


@pytest.mark.parametrize("restarts,h0", [(True, True), pytest.param(False, False, marks=pytest.mark.slow)],
                         ids=["restarts-h0", "plain"])
def test_pallas_scan_equals_sequential_with_gradients(restarts, h0):
    args, reset = scan_args(restarts=restarts)  # T = 40: five chunks of 8 ...
    assert_close(outputs_and_grads("pallas", args, reset, h0), outputs_and_grads("sequential", args, reset, h0))


@pytest.mark.slow
def test_pallas_scan_pads_time_and_tiles_channels(monkeypatch):
    """T = 37 with chunk 12 (rounded up to 16 sublanes): the last chunk padded; D = 256 in tiles
    of at most 128 lanes: two tiles, whose dB, dC partial sums are added outside the kernel."""
    from llm_jax.models import ssm_pallas

    monkeypatch.setattr(ssm_pallas, "MAX_TILE", 128)
    assert ssm_pallas.d_tile(256, 16, 8) == 128
    args, reset = scan_args(T=37, D=256, N=8, seed=2)
    got = outputs_and_grads("pallas", args, reset, chunk=12)
    assert_close(got, outputs_and_grads("sequential", args, reset))


@pytest.mark.parametrize("kernel", ["pallas", "pallas_gpu"])
def test_the_s4_like_ablation_runs_the_chunked_scan(kernel):
    (x, delta, A, _, _, Dv, h0), _ = scan_args(T=12)
    shared = (jnp.ones_like(A), jnp.full_like(A, 0.5))  # B, C [D, N]: constant over time

    def program(mode):
        return str(jax.make_jaxpr(lambda *a: selective_scan(*a, mode=mode, chunk=8))(x, delta, A, *shared, Dv, h0))

    assert program(kernel) == program("chunked")


def tiny_mamba(scan: str) -> MambaLM:
    cfg = load_config("mamba_small", ["model.num_layers=1", "model.d_model=16", "model.ssm.d_state=4",
                                      f"model.ssm.scan={scan}", "model.ssm.chunk=8"])
    return MambaLM(cfg.model, Dims(32, cfg.max_seq_len, "float32", "xla"), nnx.Rngs(0))


def model_loss_and_grads(scan: str, tokens, segment_ids):
    model = tiny_mamba(scan)

    def loss(m):
        logits = m(tokens[:, :-1], segment_ids_BT=segment_ids[:, :-1]).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    assert ("pallas_call" in str(jax.make_jaxpr(lambda: loss(model))())) == scan.startswith("pallas")
    return nnx.jit(nnx.value_and_grad(loss))(model)


def assert_mamba_matches_sequential(scan: str) -> None:
    """A one-layer Mamba on a packed row: the loss and every gradient with `scan` equal the
    sequential scan's."""
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 32, size=(2, 25)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 10 + [2] * 15], 2, 0), jnp.int32)  # a packed row
    loss, grads = model_loss_and_grads(scan, tokens, segment_ids)
    want_loss, want_grads = model_loss_and_grads("sequential", tokens, segment_ids)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    assert_close(nnx.state(grads), nnx.state(want_grads))


@pytest.mark.slow
def test_a_mamba_model_trains_alike_with_the_pallas_scan():
    assert_mamba_matches_sequential("pallas")


@pytest.mark.slow
def test_a_data_and_tensor_split_scan_equals_one_device():
    """Batch over data (2), channels over tensor (4): each device runs the kernel on its [1, T, 8]
    block; the gradients of A (copied over data) and B, C (copied over tensor) are summed."""
    from jax.sharding import Mesh, NamedSharding

    from llm_jax.parallel.rules import MESH_AXES, activation_mesh, logical_to_spec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4, 1), MESH_AXES)
    args, reset = scan_args(D=32, seed=4)
    want = outputs_and_grads("pallas", args, reset)
    names = [("batch", "length", "mlp")] * 2 + [("mlp", "ssm_state"), ("batch", "length", None),
                                                 ("batch", "length", None), ("mlp",), ("batch", "mlp", "ssm_state")]
    placed = [jax.device_put(a, NamedSharding(mesh, logical_to_spec(n, a.shape, mesh))) for a, n in zip(args, names)]
    assert placed[0].addressable_shards[0].data.shape == (1, 40, 8)
    with activation_mesh(mesh):
        got = outputs_and_grads("pallas", tuple(placed), reset)
    assert_close(got, want)


def test_channel_tiles_fit_the_tpu_layout_and_vmem():
    from llm_jax.models.ssm_pallas import VMEM_BUDGET, backward_vmem_bytes, d_tile, time_chunk

    assert [time_chunk(c) for c in (1, 8, 12, 64)] == [8, 8, 16, 64]
    assert d_tile(1536, 64, 16) == 512  # the widest multiple of 128 lanes up to 512
    assert d_tile(1536, 256, 16) == 384  # 512 channels of a 256-step chunk would overflow VMEM
    assert backward_vmem_bytes(256, 512, 16) > VMEM_BUDGET >= backward_vmem_bytes(256, 384, 16)
    assert d_tile(200, 64, 16) == 200  # not a multiple of 128: one block of the whole dimension


def test_choices_the_kernel_cannot_run_are_user_errors():
    from llm_jax.errors import UserError
    from llm_jax.parallel.platform import targeting

    args, _ = scan_args(T=16)
    with targeting("gpu"), pytest.raises(UserError, match="model.ssm.scan=pallas is a Pallas kernel for TPU only"):
        jax.eval_shape(lambda *a: selective_scan(*a, mode="pallas"), *args)
    with targeting("tpu"), pytest.raises(UserError, match="VMEM .* lower model.ssm.chunk"):
        jax.eval_shape(lambda *a: selective_scan(*a, mode="pallas", chunk=4096), *args)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1, 1), (2, 1, 2, 1)], ids=["one-chip", "data2-tensor2"])
def test_the_kernels_compile_for_a_tpu(mesh_shape):
    """Mosaic's layout rules hold for real Mamba shapes: d_inner 512 (tiles of 512 lanes, or of
    256 per device when tensor splits it), N 16, a 64-step chunk, L 1000 padded to 1024; the
    forward and the backward kernel are both in the compiled gradient, and on a v5e-4 mesh the
    gradients of A, B, C are summed across devices."""
    from jax.sharding import Mesh, NamedSharding

    from llm_jax.parallel.platform import targeting
    from llm_jax.parallel.rules import MESH_AXES, activation_mesh, logical_to_spec
    from llm_jax.parallel.topology import parse_topology

    devices = parse_topology("v5e-4").devices()[:int(np.prod(mesh_shape))]
    mesh = Mesh(np.array(devices).reshape(mesh_shape), MESH_AXES)
    B, T, D, N = 2, 1000, 512, 16

    def loss(x, delta, A, Bm, C, h0, reset):
        y, h = selective_scan(x, delta, A, Bm, C, jnp.ones((D,)), h0, mode="pallas", reset_BT=reset)
        return y.sum() + h.sum()

    inputs = [((B, T, D), ("batch", "length", "mlp")), ((B, T, D), ("batch", "length", "mlp")),
              ((D, N), ("mlp", "ssm_state")), ((B, T, N), ("batch", "length", None)),
              ((B, T, N), ("batch", "length", None)), ((B, D, N), ("batch", "mlp", "ssm_state"))]
    specs = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, logical_to_spec(n, shape, mesh)))
             for shape, n in inputs]
    specs.append(jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=NamedSharding(
        mesh, logical_to_spec(("batch", "length"), (B, T), mesh))))
    with targeting("tpu"), activation_mesh(mesh):
        hlo = compile_lowered(lambda: jax.jit(jax.grad(loss, range(6))).lower(*specs), 0).compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 2, hlo.count("tpu_custom_call")
    assert ("all-reduce" in hlo) == (mesh.size > 1)
