"""Mamba: the three selective scans agree with gradients, the chunked scan's memory stays
bounded, the block is causal and initialised as the reference, the S4-like ablation differs only
in delta, B and C, and config errors name the problem. (Hugging Face parity: tests/test_hf.py;
cached generation: tests/test_generate.py; sharded training of a hybrid: tests/test_families.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.models.base import Dims
from llm_jax.models.definition import model_def
from llm_jax.models.mamba import MambaLM
from llm_jax.models.ssm import selective_scan


def scan_inputs(T: int, shared: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    B, D, N = 2, 6, 4

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    x, delta = normal(B, T, D), jax.nn.softplus(normal(B, T, D))
    A = -jnp.exp(normal(D, N))
    Bm, C = (normal(D, N), normal(D, N)) if shared else (normal(B, T, N), normal(B, T, N))
    return x, delta, A, Bm, C, normal(D), normal(B, D, N) * 0.5


@pytest.mark.parametrize("shared", [False, True], ids=["selective", "s4-like"])
def test_scans_agree_with_gradients(shared):
    args = scan_inputs(37, shared)  # 37: not a multiple of the chunk, so the last chunk is padded
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 37, 6)), jnp.float32) / 37

    def run(mode):
        def loss(*a):
            y, h = selective_scan(*a, mode=mode, chunk=8)
            return (y * weights).sum() + 0.01 * h.sum()

        y, h = selective_scan(*args, mode=mode, chunk=8)
        return y, h, jax.grad(loss, argnums=tuple(range(7)))(*args)

    ref = run("sequential")
    for mode in ("associative", "chunked"):
        got = run(mode)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(got[1], ref[1], atol=1e-5, err_msg=mode)
        for g, r in zip(got[2], ref[2]):
            np.testing.assert_allclose(g, r, atol=1e-5, err_msg=mode)


def test_the_scan_is_the_recurrence():
    """A hand-written loop of h = exp(delta A) h + delta B x, y = C h + D x."""
    x, delta, A, Bm, C, Dv, h0 = (np.asarray(a, np.float64) for a in scan_inputs(5))
    h = h0.copy()
    want = np.zeros_like(x)
    for t in range(5):
        h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[..., None] * Bm[:, t, None, :]
        want[:, t] = (h * C[:, t, None, :]).sum(-1) + Dv * x[:, t]
    y, last = selective_scan(*scan_inputs(5), mode="sequential")
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, h, rtol=1e-5, atol=1e-5)


def temp_bytes(mode: str, T: int) -> int:
    args = scan_inputs(T)

    def loss(*a):
        return selective_scan(*a, mode=mode, chunk=64)[0].sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_scan_memory_does_not_hold_every_state():
    """The associative scan's backward holds [B, T, D, N] arrays; the chunked one holds one
    chunk's: at T = 4096 it needs several times less scratch memory."""
    associative, chunked = temp_bytes("associative", 4096), temp_bytes("chunked", 4096)
    assert chunked * 3 < associative, (chunked, associative)


def tiny_mamba(*overrides: str) -> MambaLM:
    cfg = load_config("mamba_small", ["model.num_layers=2", "model.d_model=32", *overrides])
    return MambaLM(cfg.model, Dims(64, cfg.max_seq_len, "float32", "xla"), nnx.Rngs(0))


def test_initialisation_follows_the_reference():
    # dt_rank 3 differs from the 2 stacked layers, so a bound read off the wrong axis shows.
    cfg = load_config("mamba_small", ["model.num_layers=2", "model.d_model=32", "model.ssm.dt_rank=3"])
    params = nnx.to_pure_dict(nnx.state(tiny_mamba("model.ssm.dt_rank=3")))["blocks"]["l0"]["mixer"]
    N = params["A_log"].shape[-1]
    np.testing.assert_allclose(params["A_log"][0, 0], np.log(np.arange(1, N + 1)), rtol=1e-6)  # S4D-real
    np.testing.assert_array_equal(params["D"], 1.0)
    dt = jax.nn.softplus(params["dt_bias"])
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    # dt_proj ~ U(-dt_rank^-0.5, dt_rank^-0.5) per layer (the reference's dt_init="random").
    R = cfg.model.dt_rank
    assert R == 3 and params["dt_proj"].shape == (2, R, cfg.model.d_inner)
    bound = R ** -0.5
    assert float(jnp.abs(params["dt_proj"]).max()) <= bound
    assert float(jnp.abs(params["dt_proj"]).max()) > 0.9 * bound  # spans the range, not a narrower one


def test_the_s4_like_ablation_has_constant_delta_b_c():
    selective = nnx.to_pure_dict(nnx.state(tiny_mamba()))["blocks"]["l0"]["mixer"]
    ablation = nnx.to_pure_dict(nnx.state(tiny_mamba("model.ssm.selective=false")))["blocks"]["l0"]["mixer"]
    assert {"x_proj", "dt_proj"} <= set(selective) and not {"x_proj", "dt_proj"} & set(ablation)
    assert ablation["B"].shape == ablation["C"].shape == ablation["A_log"].shape  # [layers, d_inner, N]


@pytest.mark.parametrize("overrides,message", [
    (["model.layer_pattern=[mamba, attention]", "model.num_layers=3"], "do not divide model.num_layers=3"),
    (["model.layer_pattern=[mamba, moe]"], "model.layer_pattern has moe layers but model.moe.num_experts is 0"),
    (["model.layer_pattern=[mamba, conv]"], "model.layer_pattern"),
])
def test_config_errors_name_the_problem(overrides, message, tmp_path, capsys):
    assert main(["train", "mamba_small", f"run.dir={tmp_path / 'r'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_layer_pattern_belongs_to_mamba(tmp_path, capsys):
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'r'}", "model.layer_pattern=[mamba]"]) == 2
    assert "model.layer_pattern is for model.arch=mamba" in capsys.readouterr().err


def test_flops_count_attention_only_in_attention_sublayers():
    from llm_jax.models.base import family_of
    from llm_jax.models.stack import matmul_params

    pure = load_config("mamba_small", [])
    shapes = model_def(pure, 256).shapes
    n = matmul_params(pure, shapes)
    assert family_of("mamba").flops_per_token(pure, shapes) == 6 * n
    hybrid = load_config("mamba_hybrid", [])  # 2 repeats of [mamba, mamba, attention, moe]
    m = hybrid.model
    shapes = model_def(hybrid, 256).shapes
    n = matmul_params(hybrid, shapes)
    assert family_of("mamba").flops_per_token(hybrid, shapes) == 6 * n + 12 * 2 * m.num_heads * m.head_dim * 256 / 2


def _float32_matmuls(pattern: str) -> int:
    """dot_generals with both operands float32 in a bfloat16 hybrid's forward pass."""
    cfg = load_config("mamba_small", ["model.num_layers=2", "model.d_model=32", f"model.layer_pattern={pattern}"])
    model = MambaLM(cfg.model, Dims(64, cfg.max_seq_len, "bfloat16", "xla"), nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, jnp.zeros((1, 8), jnp.int32))

    def count(jx) -> int:
        n = 0
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general" and all(v.aval.dtype == jnp.float32 for v in eqn.invars):
                n += 1
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    n += count(inner)
        return n

    return count(jaxpr.jaxpr)


def test_attention_in_a_hybrid_computes_in_the_compute_dtype():
    """The float32 residual stream of a Mamba hybrid does not pull its attention and MLP into
    float32: in a bfloat16 model an attention sublayer adds no float32 matmul, as an MLP
    sublayer adds none (the Mamba mixer's own float32 projection is in both)."""
    assert _float32_matmuls("[mamba, attention]") == _float32_matmuls("[mamba, mlp]") >= 1
