"""JAX's Pallas flash-attention kernels (`llm_jax/models/pallas_attention.py`): `splash` (TPU) and
`pallas_gpu` (GPU), run here in Pallas interpret mode, equal the einsum reference under
causal-and-same-segment masks (values and q/k/v gradients), in a tiny GPT on packed rows, and on
an 8-device mesh; splash compiles for TPU topologies (alone, and in a GPT on a 4-chip mesh) and
pallas_gpu lowers for CUDA; each is refused on the other accelerator and `auto` picks neither."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.models.attention import masked_attention, resolve_kernel, same_segment
from llm_jax.models.definition import model_def, param_shardings
from llm_jax.models.pallas_attention import gpu_padded_length, pallas_gpu_attention, splash_attention, splash_blocks
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.platform import targeting
from llm_jax.parallel.rules import activation_mesh, logical_to_spec
from llm_jax.parallel.topology import parse_topology
from llm_jax.train.aot import compile_lowered
from llm_jax.train.objectives.base import token_losses
from llm_jax.train.objectives.causal import Causal

B, N, K, H = 2, 4, 2, 16  # grouped KV heads: two query heads per KV head
# Interpret mode runs the kernels' fp32 arithmetic in another order than the einsum: measured
# differences are below 1e-6 of the largest value (outputs) and 2e-6 (gradients).
RTOL = 2e-5
KERNELS = {"splash": splash_attention, "pallas_gpu": pallas_gpu_attention}


def qkv(T: int, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(ks[0], (B, T, N, H)), *(jax.random.normal(key, (B, T, K, H)) for key in ks[1:])


def packed_segments(T: int) -> jax.Array:
    """Several documents per row, their boundaries inside the kernel's blocks (and T not a
    multiple of 128, so the padding's own segment is exercised too)."""
    cuts = [[0, 5, 21, T], [0, T - 9, T]]
    return jnp.asarray([np.repeat(np.arange(len(c) - 1), np.diff(c)) for c in cuts], jnp.int32)


def assert_close_to_scale(got, want, rtol=RTOL):
    """Equal within rtol of the largest value in `want` (fp32 sums in another order)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


def value_and_grads(f, *args):
    return jax.jit(jax.value_and_grad(lambda q, k, v: (f(q, k, v) ** 2).sum(), argnums=(0, 1, 2)))(*args)


def reference(causal: bool, seg_BT):
    def attend(q, k, v):
        T = q.shape[1]
        mask = jnp.ones((1, T, T), bool)
        if causal:
            mask = mask & jnp.tril(mask)
        if seg_BT is not None:
            mask = mask & same_segment(seg_BT)
        return masked_attention(q, k, v, mask)
    return attend


def test_blocks_and_padded_lengths():
    assert [splash_blocks(t) for t in (32, 128, 200, 384, 640, 1024, 4096)] == [
        (128, 128), (128, 128), (256, 256), (128, 384), (128, 640), (512, 1024), (512, 4096)]
    assert [gpu_padded_length(t) for t in (8, 32, 40, 100, 128, 200, 1024)] == [32, 32, 64, 128, 128, 256, 1024]


CASES = {  # name: (T, causal, packed)
    "causal-packed-padded": (40, True, True),
    "causal-unpadded": (128, True, False),
    "bidirectional-padded": (24, False, False),
}
# Each case compiles the kernel's three interpreted passes (3-5 s of CPU): the packed causal
# case runs in the quick loop, the others are slow.
PARAMS = [pytest.param(kernel, name, marks=[] if name == "causal-packed-padded" else [pytest.mark.slow])
          for kernel in KERNELS for name in CASES]


@pytest.mark.parametrize(("kernel", "name"), PARAMS)
def test_kernel_equals_the_einsum_reference_values_and_gradients(kernel, name):
    T, causal, packed = CASES[name]
    seg = packed_segments(T) if packed else None
    q, k, v = qkv(T)
    attend = partial(KERNELS[kernel], causal=causal, segment_ids_BT=seg)
    want, want_grads = value_and_grads(reference(causal, seg), q, k, v)
    got, got_grads = value_and_grads(attend, q, k, v)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert_close_to_scale(got_grads, want_grads)
    if packed:  # the check has teeth: attention across the documents gives another value
        leaky = (reference(True, None)(q, k, v) ** 2).sum()
        assert abs(float(leaky) - float(got)) > 1e-2 * abs(float(got))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_on_8_devices_equals_1_device(kernel):
    """data=2 x tensor=4: the batch and the 4 query heads are split, the 2 KV heads are not
    divisible by 4 and are repeated per query head (the other branch, KV heads split with their
    query heads, runs in the GPT test below)."""
    T = 40
    q, k, v = qkv(T, seed=1)
    seg = packed_segments(T)
    f = partial(KERNELS[kernel], causal=True, segment_ids_BT=seg)
    want, want_grads = value_and_grads(f, q, k, v)
    cfg = load_config(None, ["mesh.data=2", "mesh.tensor=4"])
    mesh = make_mesh(cfg, jax.devices()[:8])
    put = lambda x, names: jax.device_put(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))  # noqa: E731
    q = put(q, ("batch", None, "heads", None))
    k, v = (put(x, ("batch", None, "kv_heads", None)) for x in (k, v))
    with activation_mesh(mesh):
        got, got_grads = value_and_grads(f, q, k, v)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert_close_to_scale(got_grads, want_grads)


VOCAB, EOS, SEQ = 64, 63, 48
GPT = ["model.num_layers=2", "model.d_model=64", f"model.num_heads={N}", f"model.num_kv_heads={K}", "model.d_ff=64",
       "model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.use_bias=false",
       f"train.seq_len={SEQ}", "train.batch_size=4", "train.packing=true"]


def draw_params(mdef, seed: int = 0):
    """Normal draws of std 0.3 (sharp attention, so a leak across documents would show)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), mdef.shapes)


@partial(jax.jit, static_argnames=("graphdef",))
def loss_and_grads(graphdef, params, rows):
    inputs, targets_BT, weights_BT = Causal(packing=True, eos_id=EOS).data(rows, 0)

    def total(p):
        return (token_losses(nnx.merge(graphdef, p)(**inputs).logits, targets_BT) * weights_BT).sum()

    return jax.value_and_grad(total)(params)


def gpt_loss_and_grads(kernel: str, mesh_overrides: list[str], devices: int):
    cfg = load_config(None, [*GPT, f"model.attention={kernel}", *mesh_overrides])
    mdef = model_def(cfg, VOCAB)
    mesh = make_mesh(cfg, jax.devices()[:devices])
    rng = np.random.default_rng(5)
    rows = rng.integers(0, EOS, (4, SEQ + 1))
    rows[rng.random(rows.shape) < 0.12] = EOS  # a few documents per row
    params = jax.device_put(draw_params(mdef), param_shardings(mdef, mesh))
    rows = jax.device_put(jnp.asarray(rows, jnp.int32), NamedSharding(mesh, logical_to_spec(("batch", None))))
    with activation_mesh(mesh):
        program = str(jax.make_jaxpr(loss_and_grads, static_argnums=0)(mdef.graphdef, params, rows))
        assert ("pallas_call" in program) == (kernel != "xla")  # the Pallas kernel really runs
        return jax.tree.map(np.asarray, loss_and_grads(mdef.graphdef, params, rows))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpt_on_packed_rows_equals_xla_on_1_and_8_devices(kernel):
    """A GQA Llama-style GPT on packed rows: loss and parameter gradients with the kernel equal
    those with xla, on one device and on data=2 x fsdp=2 x tensor=2 (the 2 KV heads split with
    their query heads)."""
    want = gpt_loss_and_grads("xla", ["mesh.data=1"], 1)
    assert_close_to_scale(gpt_loss_and_grads(kernel, ["mesh.data=1"], 1), want)
    assert_close_to_scale(gpt_loss_and_grads(kernel, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], 8), want)


def test_each_kernel_is_refused_on_the_other_accelerator_and_never_picked_by_auto():
    for kernel, home, other in (("splash", "tpu", "gpu"), ("pallas_gpu", "gpu", "tpu")):
        with targeting(other), pytest.raises(UserError, match=f"model.attention={kernel} is a Pallas kernel for "
                                                              f"{home.upper()} only"):
            resolve_kernel(kernel)
        for platform in (home, "cpu"):
            with targeting(platform):
                assert resolve_kernel(kernel) == kernel
    for platform, kernel in (("cpu", "blockwise"), ("gpu", "cudnn"), ("tpu", "xla")):
        with targeting(platform):
            assert resolve_kernel("auto") == kernel


def test_splash_gradient_compiles_for_tpu():
    """The compiled (not interpreted) kernel: forward, dq and dkv Mosaic kernels in the gradient
    program for one v5e chip, bf16, T=512 (blocks of 512), head_dim 128, packed segment ids."""
    T, Hd = 512, 128
    with targeting("tpu"):
        devices = parse_topology("v5e-4").devices()[:1]
        s = NamedSharding(jax.sharding.Mesh(np.array(devices), ("x",)), P())
        shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.bfloat16, sharding=s)  # noqa: E731

        def loss(q, k, v, seg):
            return (splash_attention(q, k, v, segment_ids_BT=seg).astype(jnp.float32) ** 2).sum()

        compiled = compile_lowered(lambda: jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(s,) * 4).lower(
            shape(B, T, N, Hd), shape(B, T, K, Hd), shape(B, T, K, Hd),
            jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=s)), 0).compiled
    assert compiled.as_text().count("tpu_custom_call") == 3


def test_pallas_gpu_gradient_lowers_for_cuda():
    """The compiled (not interpreted) GPU kernel: the gradient program lowered for CUDA holds the
    forward and both backward Triton kernels (compiling needs a GPU, absent here)."""
    T, Hd = 256, 64

    def loss(q, k, v, seg):
        return (pallas_gpu_attention(q, k, v, segment_ids_BT=seg).astype(jnp.float32) ** 2).sum()

    with targeting("gpu"):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
            jax.ShapeDtypeStruct((B, T, N, Hd), jnp.bfloat16), *[jax.ShapeDtypeStruct((B, T, K, Hd), jnp.bfloat16)] * 2,
            jax.ShapeDtypeStruct((B, T), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3


@pytest.mark.slow
def test_gpt_gradient_with_splash_compiles_for_a_v5e_4_mesh():
    """The GQA GPT's loss gradient on packed rows of 512 tokens (head_dim 128, scanned layers)
    for 4 v5e chips as data=2 x tensor=2: the kernels compile inside the shard_map (a Mosaic
    kernel left to GSPMD does not compile at all under a sharded mesh), and the program gathers
    nothing: each chip attends over its own examples and heads."""
    seq = 512
    cfg = load_config(None, [*GPT, "model.d_model=512", f"train.seq_len={seq}", "model.attention=splash",
                             "model.scan_layers=true", "mesh.data=2", "mesh.tensor=2"])
    with targeting("tpu"):
        mdef = model_def(cfg, VOCAB)
        mesh = make_mesh(cfg, parse_topology("v5e-4").devices())
        params = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                              mdef.shapes, param_shardings(mdef, mesh))
        rows = jax.ShapeDtypeStruct((4, seq + 1), jnp.int32,
                                    sharding=NamedSharding(mesh, logical_to_spec(("batch", None))))
        with activation_mesh(mesh):
            program = compile_lowered(lambda: loss_and_grads.lower(mdef.graphdef, params, rows), 0).compiled.as_text()
    assert program.count("tpu_custom_call") == 3  # forward, dq, dkv in the scanned block
    assert "all-gather" not in program
