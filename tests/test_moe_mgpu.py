"""The Pallas Mosaic GPU grouped matmul (`model.moe.grouped_matmul=ragged_dot_mgpu`): in Pallas
GPU interpret mode on CPU its expert MLP, a tiny MoE model and the expert-parallel layer on 8
devices against the XLA forms (outputs and gradients), the gradient lowered for CUDA (the
compiled kernels), and the refusals (TPU, float32).

JAX's interpreter cannot run the two backward kernels by itself (models/mgpu_mlp.py); the tests
lend it what they need (tests/mgpu_interpret.py, the `backward_kernels` fixture), so all three
kernels are simulated here, and the stand-ins that a CPU run uses without it are checked once.

Tolerance (bfloat16 against float32 XLA of the same rounded inputs): rtol 2e-2 with an absolute
floor of 2e-2 x the reference's largest magnitude, about 5 roundings of bfloat16's 8-bit
mantissa (the hidden activations are rounded to bfloat16 between the matmuls)."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mgpu_interpret import lend_sm_count, simulate_backward_kernels
from test_moe_megablox import abstract_moe_layer, assert_close, moe_config, moe_layer_loss

from llm_jax.errors import UserError
from llm_jax.models import mgpu_mlp as mgpu
from llm_jax.models import moe as moe_lib
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.platform import targeting
from llm_jax.parallel.rules import activation_mesh

TOL = (2e-2, 2e-2)


@pytest.fixture
def backward_kernels(monkeypatch):
    """Interpret mode runs the rows' gradient (forward kernel, weights transposed in shared
    memory) and the weights' gradient (transposed kernel) themselves, not their stand-ins."""
    simulate_backward_kernels(monkeypatch)


def test_blocks_follow_the_shapes():
    assert [mgpu.dim_block(d) for d in (4096, 14336, 192, 64)] == [128, 128, 64, 64]
    assert mgpu.row_block(8 * 128, 8) == 128 and mgpu.row_block(8 * 127, 8) == 64


def test_refused_on_tpu_and_megablox_points_here_on_gpu():
    with targeting("tpu"):
        with pytest.raises(UserError, match="grouped_matmul=ragged_dot_mgpu is a Pallas kernel for GPU only"):
            moe_lib.grouped_matmul("ragged_dot_mgpu")
    with targeting("gpu"):
        assert moe_lib.grouped_matmul("ragged_dot_mgpu") == "ragged_dot_mgpu"
        assert moe_lib.grouped_matmul("auto") == "blocked"  # auto never picks it (not measured)
        with pytest.raises(UserError, match="use ragged_dot_mgpu"):
            moe_lib.grouped_matmul("megablox")


def test_refused_on_a_gpu_without_wgmma(monkeypatch):
    """On a GPU of this process the compute capability decides: 9.x (Hopper) only."""
    import types

    def gpu(kind, capability):
        device = types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability)
        monkeypatch.setattr(jax, "devices", lambda *a: [device])

    with targeting("gpu"):
        gpu("NVIDIA H200", "9.0")
        assert moe_lib.grouped_matmul("ragged_dot_mgpu") == "ragged_dot_mgpu"
        for kind, capability in (("NVIDIA A100-SXM4-80GB", "8.0"), ("NVIDIA B200", "10.0")):
            gpu(kind, capability)
            with pytest.raises(UserError, match=f"needs a Hopper GPU .*not {kind} \\({capability}\\); use blocked"):
                moe_lib.grouped_matmul("ragged_dot_mgpu")


def test_float32_is_refused():
    w = {"up": jnp.zeros((2, 64, 64)), "down": jnp.zeros((2, 64, 64))}
    with pytest.raises(UserError, match="ragged_dot_mgpu multiplies bfloat16 .* set model.dtype=bfloat16"):
        mgpu.mgpu_mlp("relu", w, jnp.zeros((8, 64)), jnp.array([4, 4]))


def test_kernel_drift_is_named(monkeypatch):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    monkeypatch.setattr(ragged_dot_mgpu, "ragged_dot", lambda lhs, rhs, *, group_sizes, block_m: None)
    with pytest.raises(UserError, match=r"changed its Mosaic GPU ragged dot kernels \(missing arguments "
                                        r"\['block_k', 'block_n', 'grid_block_n'"):
        mgpu.kernels()


def expert_weights(kind: str, E: int, D: int, F: int, rng) -> dict:
    w = {"up": rng.normal(size=(E, D, F)), "down": rng.normal(size=(E, F, D)) / 4}
    if kind == "swiglu":
        w["gate"] = rng.normal(size=(E, D, F))
    return {k: jnp.asarray(v, jnp.bfloat16) for k, v in w.items()}


@pytest.mark.parametrize("kind,backward", [("relu", "kernels"), ("swiglu", "kernels"), ("swiglu", "stand-ins")])
def test_mgpu_mlp_equals_ragged_dot(kind, backward, monkeypatch):
    """The backward pass through the simulated kernels, or through the stand-ins of a plain CPU
    run. 43 rows (padded to a row block of 64), d_model 48 and width 80 (padded to 64 and 128):
    experts that are empty (first, middle, last) or hold every row, and rows past every expert
    that hold NaN (they must come out 0, get gradient 0 and not reach the weights' gradient);
    output and the gradients of the rows and of every weight against autodiff of float32
    lax.ragged_dot on the same bfloat16 inputs."""
    if backward == "kernels":
        simulate_backward_kernels(monkeypatch)
    rng = np.random.default_rng(3)
    E, D, F, M = 4, 48, 80, 43
    w = expert_weights(kind, E, D, F, rng)
    x = jnp.asarray(rng.normal(size=(M, D)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(M, D)), jnp.bfloat16)

    def vjp(fn, x, sizes, dtype):
        cast = partial(jax.tree.map, lambda a: a.astype(dtype))
        y, pull = jax.vjp(lambda w, x: fn(kind, w, x, sizes), cast(w), cast(x))
        return y, pull(cast(dy))

    @jax.jit
    def reference(sizes):
        return vjp(lambda k, w, x, s: moe_lib._expert_mlp(k, w, x, s, "ragged_dot"), x, sizes, jnp.float32)

    @jax.jit
    def kernel(sizes):
        past = (jnp.arange(M) >= sizes.sum())[:, None]
        return vjp(mgpu.mgpu_mlp, jnp.where(past, jnp.nan, x), sizes, jnp.bfloat16)

    for sizes in ([9, 0, 17, 10], [0, 43, 0, 0], [0, 0, 0, 0]):
        sizes = jnp.array(sizes, jnp.int32)
        (want, (want_dw, want_dx)), (got, (got_dw, got_dx)) = reference(sizes), kernel(sizes)
        used = int(sizes.sum())
        assert got.shape == (M, D) and got.dtype == got_dx.dtype == got_dw["up"].dtype == jnp.bfloat16
        assert_close(got[:used], want[:used], f"y {sizes}", TOL)
        np.testing.assert_array_equal(got[used:], 0)
        assert_close(got_dx[:used], want_dx[:used], f"dx {sizes}", TOL)
        np.testing.assert_array_equal(got_dx[used:], 0)
        for k in w:
            assert got_dw[k].shape == w[k].shape
            assert_close(got_dw[k], want_dw[k], f"d{k} {sizes}", TOL)


def test_kernels_have_no_race(monkeypatch, backward_kernels):
    """JAX's happens-before race detector over the simulated TMA copies, barriers and wgmma of
    each kernel of one grouped matmul and its gradient (two groups sharing a row block, an empty
    one, rows past every group): the forward kernel, with the weights transposed in shared
    memory, and the transposed kernel; each equals lax.ragged_dot."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret  # private: tests only

    monkeypatch.setattr(mgpu, "DETECT_RACES", True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 64, 128)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(128, 128)), jnp.bfloat16)
    sizes = jnp.array([40, 0, 70], jnp.int32)
    used = (jnp.arange(128) < 110)[:, None]
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    # name: (kernel, reference, rows compared; the rest must be zero). The weights' gradient has a
    # row per group, all of them compared.
    kernels = {
        "forward": (lambda: mgpu._forward(x, w, sizes, 64, True),
                    jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32), 110),
        "rows' gradient": (lambda: mgpu._forward(dy, w, sizes, 64, True, transpose_rhs=True),
                           jax.lax.ragged_dot(dy, w.swapaxes(1, 2), sizes, preferred_element_type=jnp.float32), 110),
        "weights' gradient": (lambda: mgpu._weight_grad(jnp.where(used, x, 0), jnp.where(used, dy, 0), sizes, True),
                              jax.lax.ragged_dot_general(x, dy, sizes, dims, preferred_element_type=jnp.float32), 3),
    }
    for name, (kernel, want, rows) in kernels.items():
        gpu_interpret.reset_gpu_interpret_mode_state()
        got = kernel()
        races = gpu_interpret.get_races()
        assert races.reads and races.writes, name  # the detector saw the kernel's memory traffic
        assert not races.races_found, name
        assert_close(got[:rows], want[:rows], name, TOL)
        np.testing.assert_array_equal(got[rows:], 0)


def test_the_interpreter_stand_in_reads_transposes_after_the_index_only():
    """What tests/mgpu_interpret.py reads: the indexing, then the composed permutation of the
    transposes after it (two transposes of a tile are none, three of a cube compose); a
    transpose before an index is refused, not read wrongly. (Plain ints stand in for indexers.)"""
    from jax._src.state.types import TransposeTransform as T
    from mgpu_interpret import _split_transposes

    assert _split_transposes((7,)) == ((7,), None)
    assert _split_transposes((7, T((1, 0)), T((1, 0)))) == ((7,), (0, 1))
    cube = np.arange(24).reshape(2, 3, 4)
    _, permutation = _split_transposes((T((1, 2, 0)), T((2, 0, 1)), T((0, 2, 1))))
    np.testing.assert_array_equal(np.transpose(cube, permutation),
                                  cube.transpose(1, 2, 0).transpose(2, 0, 1).transpose(0, 2, 1))
    with pytest.raises(ValueError, match="reads a transpose only after the indexing"):
        _split_transposes((T((1, 0)), 7))


@pytest.mark.slow
def test_tiny_moe_model_equals_looped(backward_kernels):
    """A 2-layer bfloat16 MoE GPT (top-2 of 4 SwiGLU experts, d_model 32 and width 48: both
    padded to 64): the same loss, balancing losses and gradients of every parameter as with the
    looped grouped matmul."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 17)), jnp.int32)

    def loss_and_grads(grouped):
        model = moe_lib_model(grouped)
        graphdef, params = nnx.split(model)

        def loss(params):
            out = nnx.merge(graphdef, params)(tokens[:, :-1])
            logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
            ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
            return ce + out.aux["moe"]["aux_loss"].mean() + out.aux["moe"]["z_loss"].mean(), ce

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (want_loss, want_ce), want_grads = loss_and_grads("looped")
    (got_loss, got_ce), got_grads = loss_and_grads("ragged_dot_mgpu")
    assert_close(got_loss, want_loss, tol=TOL)
    assert_close(got_ce, want_ce, tol=TOL)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(got_grads)),
                            jax.tree.leaves(nnx.to_pure_dict(want_grads))):
        assert_close(g, w, jax.tree_util.keystr(path), TOL)


def moe_lib_model(grouped: str):
    from llm_jax.models.base import build_model

    return build_model(moe_config(grouped, "model.dtype=bfloat16"), 64, nnx.Rngs(0))


def layer_loss_and_grads(grouped: str, mesh: list[str]):
    """Loss and gradients (parameters and input) of one bfloat16 dropless MoE layer on the mesh
    the overrides describe (none: one device)."""
    cfg = moe_config(grouped, "train.batch_size=8", "model.dtype=bfloat16", *mesh)
    graphdef, params = nnx.split(moe_lib.MoE(cfg.model, rngs=nnx.Rngs(1), std=0.3, out_std=0.3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 32)), jnp.bfloat16)

    def loss(params, x):
        y, stats = nnx.merge(graphdef, params)(x)
        y = y.astype(jnp.float32)
        return jnp.sum(y * jnp.cos(y)) + stats["aux_loss"]

    with activation_mesh(make_mesh(cfg) if mesh else None):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.slow
def test_expert_parallel_mgpu_equals_one_device(monkeypatch, backward_kernels):
    """8 CPU devices as data=2 x expert=4: each runs the kernels on its local experts' weights
    and the group sizes of the rows it received (the rest of its receive buffer past every
    group), inside shard_map; loss and gradients as the looped form on one device."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # private: tests only

    # A JAX interpreter bug (0.10.2, still in Aug 2026): at the end of a kernel each device
    # asserts that no device holds a barrier, without waiting for the others to finish, so
    # with several devices one fails (then hangs). The check is internal to the interpreter.
    monkeypatch.setattr(gpu_callbacks, "_assert_no_barriers_allocated", lambda token: token)
    want_loss, (want_dp, want_dx) = layer_loss_and_grads("looped", [])
    got_loss, (got_dp, got_dx) = layer_loss_and_grads("ragged_dot_mgpu", ["mesh.data=2", "mesh.expert=4"])
    assert_close(got_loss, want_loss, tol=TOL)
    assert_close(got_dx, want_dx, tol=TOL)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(got_dp)),
                            jax.tree.leaves(nnx.to_pure_dict(want_dp))):
        assert_close(g, w, jax.tree_util.keystr(path), TOL)


H100_SMS = 132  # streaming multiprocessors of an H100/H200 SXM


@pytest.fixture
def sm_count_of_an_h100(monkeypatch):
    """The transposed kernel sizes its grid by `jax.devices()[0].core_count`, which a CPU device
    lacks: lowering it for CUDA from this CPU host, its module sees an H100's SM count instead."""
    lend_sm_count(monkeypatch, H100_SMS)


def test_gradient_lowers_for_cuda(sm_count_of_an_h100):
    """The compiled (not interpreted) kernels: the gradient of a SwiGLU expert MLP (rows and
    weights) lowered for CUDA from this CPU holds 9 Mosaic GPU kernels: the forward kernel for
    the three matmuls and for their rows' gradients (3 operands: sizes, rows, weights) and the
    transposed kernel for the three weights' gradients (7 operands: sizes and the four group
    offset tables, rows, output gradient). Compiling needs a GPU, absent here."""
    E, D, F, M = 4, 128, 256, 512
    shape = jax.ShapeDtypeStruct
    w = {"up": shape((E, D, F), jnp.bfloat16), "gate": shape((E, D, F), jnp.bfloat16),
         "down": shape((E, F, D), jnp.bfloat16)}

    def loss(w, x, sizes):
        return (mgpu.mgpu_mlp("swiglu", w, x, sizes).astype(jnp.float32) ** 2).sum()

    with targeting("gpu"):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
            w, shape((M, D), jnp.bfloat16), shape((E,), jnp.int32)).lower(lowering_platforms=("cuda",))
    calls = re.findall(r"custom_call @mosaic_gpu_v2\(([^)]*)\)", lowered.as_text())
    assert sorted(len(c.split(",")) for c in calls) == [3] * 6 + [7] * 3


def test_expert_parallel_gradient_lowers_for_cuda(sm_count_of_an_h100):
    """The bfloat16 MoE layer's gradient on 8 devices (data=2 x expert=4, one expert each)
    lowered for CUDA: the same 9 kernels inside the shard_map (which runs unchecked: the compiled
    transposed kernel's output carries no mesh-axis variance), and the all-to-all exchange."""
    with targeting("gpu"):
        cfg = moe_config("ragged_dot_mgpu", "train.batch_size=8", "model.dtype=bfloat16", "mesh.data=2",
                         "mesh.expert=4", "model.d_model=128", "model.moe.expert_d_ff=256")
        mesh = make_mesh(cfg)
        graphdef, params, x = abstract_moe_layer(cfg, mesh)
        with activation_mesh(mesh):
            lowered = jax.jit(jax.grad(partial(moe_layer_loss, graphdef), argnums=(0, 1))).trace(params, x).lower(
                lowering_platforms=("cuda",))
    text = lowered.as_text()
    calls = re.findall(r"custom_call @mosaic_gpu_v2\(([^)]*)\)", text)
    assert sorted(len(c.split(",")) for c in calls) == [3] * 6 + [7] * 3
    assert "all_to_all" in text
