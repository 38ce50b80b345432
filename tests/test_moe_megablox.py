"""The Pallas megablox grouped matmul (`model.moe.grouped_matmul=megablox`): in Pallas interpret
mode on CPU its expert MLP, a tiny MoE model and the expert-parallel layer on 8 devices against
the XLA forms (outputs and gradients), and the kernel compiled by Mosaic for a TPU topology.

Tolerance: in float32 rtol 1e-5 with an absolute floor of 1e-4 x the reference's largest
magnitude (the kernel sums its K tiles in another order than XLA's dot); in bfloat16 (against
float32 ragged_dot of the same rounded inputs) 2e-2 for both, about 5 roundings of bfloat16's
8-bit mantissa (the hidden activations are rounded to bfloat16 between the matmuls)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.models import moe as moe_lib
from llm_jax.models.base import build_model
from llm_jax.models.megablox_mlp import Tiling, dim_tile, megablox_mlp, tile_rows
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.platform import targeting
from llm_jax.parallel.rules import activation_mesh, logical_to_spec
from llm_jax.train.aot import compile_lowered


def assert_close(got, want, err_msg="", tol=(1e-5, 1e-4)):
    """rtol tol[0], atol tol[1] of the reference's largest magnitude (module docstring)."""
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol[0],
                               atol=tol[1] * np.abs(want).max(initial=1.0), err_msg=err_msg)


def assert_trees_close(got, want):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert_close(g, w, jax.tree_util.keystr(path))


def test_tiles_follow_the_shapes():
    assert tile_rows(8192, 8) == 512 and tile_rows(2048, 8) == 256 and tile_rows(4096, 64) == 128
    assert tile_rows(40, 4) == 48  # fewer rows than a tile: all of them, rounded up to 16
    assert [dim_tile(d) for d in (4096, 768, 384, 48)] == [512, 256, 128, 48]  # 48: the whole dimension
    # The backward pass asks for (m, n, k): each of K and N gets its own tile.
    assert Tiling(16)(64, 768, 48) == (16, 256, 48) and Tiling(16)(64, 48, 768) == (16, 48, 256)


def test_megablox_is_refused_on_gpu():
    with targeting("gpu"):
        with pytest.raises(UserError, match="grouped_matmul=megablox is a Pallas kernel for TPU only"):
            moe_lib.grouped_matmul("megablox")
        assert moe_lib.grouped_matmul("auto") == "blocked"  # auto never picks megablox (not measured)
    with targeting("tpu"):
        assert moe_lib.grouped_matmul("auto") == "ragged_dot"
        assert moe_lib.grouped_matmul("megablox") == "megablox"


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype", [("relu", "float32"), ("swiglu", "float32"), ("swiglu", "bfloat16")])
def test_megablox_mlp_equals_ragged_dot(kind, dtype):
    """43 rows in row tiles of 16 (padded to 48): groups that are empty (first, middle, last),
    span several tiles, share a tile, and rows past every group; output and the gradients of the
    rows and of every weight against autodiff of lax.ragged_dot (in float32)."""
    rng = np.random.default_rng(3)
    E, D, F, M = 4, 16, 32, 43
    w = {"up": rng.normal(size=(E, D, F)), "down": rng.normal(size=(E, F, D)) / 4}
    if kind == "swiglu":
        w["gate"] = rng.normal(size=(E, D, F))
    w = {k: jnp.asarray(v, dtype) for k, v in w.items()}
    x = jnp.asarray(rng.normal(size=(M, D)), dtype)
    dy = jnp.asarray(rng.normal(size=(M, D)), dtype)
    tol = (1e-5, 1e-4) if dtype == "float32" else (2e-2, 2e-2)

    def vjp(fn, sizes, dtype):
        cast = partial(jax.tree.map, lambda a: a.astype(dtype))
        y, pull = jax.vjp(lambda w, x: fn(kind, w, x, sizes), cast(w), cast(x))
        return y, pull(cast(dy))

    reference = jax.jit(lambda sizes: vjp(lambda k, w, x, s: moe_lib._expert_mlp(k, w, x, s, "ragged_dot"), sizes,
                                          jnp.float32))
    megablox = jax.jit(lambda sizes: vjp(lambda k, w, x, s: megablox_mlp(k, w, x, s, tile=16), sizes, dtype))
    for sizes in ([9, 0, 17, 10], [0, 13, 30, 0], [43, 0, 0, 0], [0, 0, 0, 0]):
        sizes = jnp.array(sizes, jnp.int32)
        (want, (want_dw, want_dx)), (got, (got_dw, got_dx)) = reference(sizes), megablox(sizes)
        used = int(sizes.sum())
        assert got.dtype == got_dx.dtype == got_dw["up"].dtype == dtype
        assert_close(got[:used], want[:used], f"y {sizes}", tol)
        np.testing.assert_array_equal(got[used:], 0)
        assert_close(got_dx[:used], want_dx[:used], f"dx {sizes}", tol)
        np.testing.assert_array_equal(got_dx[used:], 0)
        for k in w:
            assert_close(got_dw[k], want_dw[k], f"d{k} {sizes}", tol)


def moe_config(grouped: str, *overrides: str):
    return load_config("gpt_tiny", ["model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.mlp=swiglu",
                                    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=48",
                                    f"model.moe.grouped_matmul={grouped}", *overrides])


@pytest.mark.slow
def test_tiny_moe_model_equals_looped():
    """A 2-layer MoE GPT (top-2 of 4 SwiGLU experts, the default row tile): the same loss,
    balancing losses and gradients of every parameter as with the looped grouped matmul."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 17)), jnp.int32)

    def loss_and_grads(grouped):
        model = build_model(moe_config(grouped), 64, nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(params):
            out = nnx.merge(graphdef, params)(tokens[:, :-1])
            logp = jax.nn.log_softmax(out.logits)
            ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
            return ce + out.aux["moe"]["aux_loss"].mean() + out.aux["moe"]["z_loss"].mean(), ce

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (want_loss, want_ce), want_grads = loss_and_grads("looped")
    (got_loss, got_ce), got_grads = loss_and_grads("megablox")
    assert_close(got_loss, want_loss)
    assert_close(got_ce, want_ce)
    assert_trees_close(nnx.to_pure_dict(got_grads), nnx.to_pure_dict(want_grads))


def layer_loss_and_grads(grouped: str, mesh_overrides: list[str]):
    """Loss and gradients (parameters and input) of one dropless MoE layer on the mesh the
    overrides describe (none: one device)."""
    cfg = moe_config(grouped, "train.batch_size=8", *mesh_overrides)
    graphdef, params = nnx.split(moe_lib.MoE(cfg.model, rngs=nnx.Rngs(1), std=0.3, out_std=0.3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 32)), jnp.float32)

    def loss(params, x):
        y, stats = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * jnp.cos(y)) + stats["aux_loss"]

    with activation_mesh(make_mesh(cfg) if mesh_overrides else None):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [["mesh.data=2", "mesh.expert=4"], ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]],
                         ids=["data2-expert4", "fsdp2-expert2-tensor2"])
def test_expert_parallel_megablox_equals_one_device(mesh):
    """8 CPU devices: each runs the kernel on its local experts' weights and the group sizes of
    the rows it received (the rest of its receive buffer the padding group), under shard_map."""
    want_loss, (want_dp, want_dx) = layer_loss_and_grads("looped", [])
    got_loss, (got_dp, got_dx) = layer_loss_and_grads("megablox", mesh)
    assert_close(got_loss, want_loss)
    assert_close(got_dx, want_dx)
    assert_trees_close(nnx.to_pure_dict(got_dp), nnx.to_pure_dict(want_dp))


@pytest.mark.slow
@pytest.mark.parametrize("expert", [1, 4])
def test_megablox_compiles_for_tpu(expert):
    """The gradient of a bfloat16 MoE layer lowered and compiled by Mosaic for a v5e-4 slice
    (interpret=False): one device, and 4 devices of expert parallelism (all-to-all)."""
    from llm_jax.parallel.topology import parse_topology

    with targeting("tpu"):
        cfg = moe_config("megablox", "mesh.data=1", f"mesh.expert={expert}", "model.d_model=128",
                         "model.moe.expert_d_ff=256")
        mesh = make_mesh(cfg, parse_topology("v5e-4").devices()[:expert])
        graphdef, params, x = abstract_moe_layer(cfg, mesh)
        with activation_mesh(mesh):
            gradient = jax.jit(jax.grad(partial(moe_layer_loss, graphdef), argnums=(0, 1)))
            hlo = compile_lowered(lambda: gradient.lower(params, x), 0).compiled.as_text()
    # SwiGLU: three gmm forward, three gmm (input gradients) and three tgmm (weight gradients).
    assert hlo.count('custom_call_target="tpu_custom_call"') == 9
    assert ("all-to-all" in hlo) == (expert > 1)


def abstract_moe_layer(cfg, mesh):
    """(graphdef, parameters, x) of one bfloat16 MoE layer of `cfg` as sharded ShapeDtypeStructs
    on `mesh`, x [8, 16, 128]: what a compile-only test lowers `moe_layer_loss`'s gradient with."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moe_lib.MoE(cfg.model, rngs=nnx.Rngs(1), std=0.3, out_std=0.3)))
    names = jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), state,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))

    def abstract(shape, logical):
        sharding = NamedSharding(mesh, logical_to_spec(logical, shape, mesh))
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)

    params = jax.tree.map(lambda v, n: abstract(v.shape, n), nnx.to_pure_dict(state), nnx.to_pure_dict(names),
                          is_leaf=lambda v: isinstance(v, jax.ShapeDtypeStruct))
    return graphdef, params, abstract((8, 16, 128), ("batch", "length", "embed"))


def moe_layer_loss(graphdef, params, x):
    y, stats = nnx.merge(graphdef, params)(x)
    return jnp.mean(y.astype(jnp.float32) ** 2) + stats["aux_loss"]
