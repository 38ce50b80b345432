"""The fused Pallas Triton selective scan (`model.ssm.scan=pallas_gpu`, run here in Pallas
interpret mode) equals the sequential reference with gradients of every input, with packed-row
restarts and a start state, a length, a width and a state size that all need padding; in a Mamba
model, on one device and split over 8 CPU devices; it is refused where it cannot run; and its
gradient lowers for CUDA through Triton (two kernels), at a real Mamba layer's size too."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_ssm_pallas import RTOL, assert_close, assert_mamba_matches_sequential, outputs_and_grads, scan_args

from llm_jax.errors import UserError
from llm_jax.models.ssm import selective_scan
from llm_jax.models.ssm_pallas_gpu import d_tile, time_chunk
from llm_jax.parallel.platform import targeting


@pytest.mark.parametrize("restarts,h0,chunk", [(True, True, 4), pytest.param(False, False, 12, marks=pytest.mark.slow)],
                         ids=["restarts-h0-chunk4", "plain-chunk16"])
def test_pallas_gpu_scan_equals_sequential_with_gradients(restarts, h0, chunk):
    """L 37 (the last chunk padded), d_inner 48 (two tiles of 32, the second half padding), N 6
    (padded to 8): y, the last state and the gradients of x, delta, A, B, C, D and h0."""
    assert (d_tile(48), time_chunk(chunk)) == (32, 4 if chunk == 4 else 16)
    args, reset = scan_args(T=37, D=48, N=6, seed=2, restarts=restarts)
    got = outputs_and_grads("pallas_gpu", args, reset, h0, chunk=chunk)
    assert_close(got, outputs_and_grads("sequential", args, reset, h0))


def test_tiles_and_chunks_are_powers_of_two_within_bounds():
    assert [time_chunk(c) for c in (1, 3, 4, 12, 16, 64)] == [1, 4, 4, 16, 16, 16]
    assert [d_tile(d) for d in (1, 6, 32, 48, 1536)] == [1, 8, 32, 32, 32]


# The S4-like ablation runs the chunked scan under pallas_gpu too: tests/test_ssm_pallas.py.


def test_auto_picks_neither_fused_scan_until_one_is_measured():
    from llm_jax.models.ssm import resolve_scan

    assert resolve_scan("auto") == "sequential"  # this CPU
    for platform in ("tpu", "gpu"):
        with targeting(platform):
            assert resolve_scan("auto") == "chunked"
            assert resolve_scan("pallas_gpu") == "pallas_gpu"  # an explicit choice is kept


def test_each_fused_scan_is_refused_on_the_other_accelerator():
    args, _ = scan_args(T=16)
    with targeting("tpu"), pytest.raises(UserError, match="model.ssm.scan=pallas_gpu is a Pallas kernel for GPU only"):
        jax.eval_shape(lambda *a: selective_scan(*a, mode="pallas_gpu"), *args)
    with targeting("gpu"), pytest.raises(UserError, match="for TPU only .* use model.ssm.scan=pallas_gpu"):
        jax.eval_shape(lambda *a: selective_scan(*a, mode="pallas"), *args)


@pytest.mark.parametrize("B,T,D,N,chunk", [(2, 37, 48, 6, 12), (2, 4096, 1536, 16, 64)], ids=["tiny", "mamba-layer"])
def test_the_gradient_lowers_for_cuda(B, T, D, N, chunk):
    """The compiled (not interpreted) kernels: the gradient program lowered for CUDA on this CPU
    holds the forward and the backward Triton kernel (Triton's power-of-two shapes hold; compiling
    needs a GPU), and no [B, L, d_inner, N] array."""

    def loss(x, delta, A, Bm, C, h0, reset):
        y, h = selective_scan(x, delta, A, Bm, C, jnp.ones((D,)), h0, mode="pallas_gpu", chunk=chunk, reset_BT=reset)
        return y.sum() + h.sum()

    f32 = jnp.float32
    shapes = [(B, T, D), (B, T, D), (D, N), (B, T, N), (B, T, N), (B, D, N)]
    specs = [jax.ShapeDtypeStruct(s, f32) for s in shapes] + [jax.ShapeDtypeStruct((B, T), jnp.bool_)]
    with targeting("gpu"):
        text = jax.jit(jax.grad(loss, range(6))).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
    padded_t = -(-T // time_chunk(chunk)) * time_chunk(chunk)
    assert not re.search(rf"tensor<{B}x({T}|{padded_t})x\d+x\d+x", text)  # [B, L, D, N], padded or not


@pytest.mark.slow
def test_a_mamba_model_trains_alike_with_the_pallas_gpu_scan():
    assert_mamba_matches_sequential("pallas_gpu")


@pytest.mark.slow
def test_a_mamba_model_split_over_8_devices_equals_one_device(monkeypatch):
    """A two-layer Mamba on packed rows, data 2 x fsdp 2 x tensor 2: each device runs the kernels
    on its 2 rows and 32 of the 64 channels inside `shard_map`; the loss and every gradient equal
    the sequential scan's on one device."""
    from llm_jax.models import ssm_pallas_gpu

    local_shapes = set()

    def recorded(x, *args):
        local_shapes.add(x.shape)
        return scan(x, *args)

    scan = ssm_pallas_gpu.pallas_gpu_scan
    monkeypatch.setattr(ssm_pallas_gpu, "pallas_gpu_scan", recorded)
    from jax.sharding import NamedSharding
    from test_packing import SMALL, documents, draw_params, pack

    from llm_jax.config import load_config
    from llm_jax.models.definition import model_def, param_shardings
    from llm_jax.parallel.mesh import make_mesh
    from llm_jax.parallel.rules import activation_mesh, logical_to_spec
    from llm_jax.train.objectives.causal import Causal

    def run(scan: str, mesh_axes: list[str], devices: int):
        cfg = load_config(None, [*SMALL, "model.arch=mamba", "model.norm=rmsnorm", f"model.ssm.scan={scan}",
                                 "model.ssm.chunk=4", *mesh_axes])
        mdef = model_def(cfg, 64)
        mesh = make_mesh(cfg, jax.devices()[:devices])
        params = jax.device_put(draw_params(cfg, mdef, 5), param_shardings(mdef, mesh))
        rows = jax.device_put(pack(documents(), 8)[0], NamedSharding(mesh, logical_to_spec(("batch", None))))
        inputs, targets, weights = Causal(packing=True, eos_id=63).data(rows, 0)

        def loss(p):
            logits = nnx.merge(mdef.graphdef, p)(**inputs).logits
            token_losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
            return (token_losses * weights).sum() / weights.sum()

        with activation_mesh(mesh):
            return jax.tree.map(np.asarray, jax.jit(jax.value_and_grad(loss))(params))

    got = run("pallas_gpu", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8)
    want = run("sequential", ["mesh.data=1"], 1)
    assert local_shapes == {(2, 16, 32)}  # [rows, tokens, channels] per device
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    assert_close(got[1], want[1])
