"""GPT model: attention kernels agree, scan equals unrolled, MFU formula equals a hand count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.models.attention import blockwise_causal_attention, masked_attention
from llm_jax.models.base import family_of
from llm_jax.models.definition import model_def
from llm_jax.models.layers import sinusoidal_table
from llm_jax.models.stack import matmul_params


def _qkv(B=2, T=64, N=4, K=2, H=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
            jax.random.normal(ks[2], (B, T, K, H)))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_blockwise_attention_equals_reference(kv_heads):
    q, k, v = _qkv(K=kv_heads)
    T = q.shape[1]
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (q.shape[0], T, T))

    def ref(q, k, v):
        return masked_attention(q, k, v, causal)

    def blk(q, k, v):
        return blockwise_causal_attention(q, k, v, block=16)

    np.testing.assert_allclose(blk(q, k, v), ref(q, k, v), atol=1e-5)
    # Same gradients too: the skipped blocks contribute nothing.
    g_ref = jax.grad(lambda *a: (ref(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.grad(lambda *a: (blk(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_blk):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # And the library kernel (multi-head case) agrees.
    if kv_heads == q.shape[2]:
        lib = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        np.testing.assert_allclose(blk(q, k, v), lib, atol=1e-5)


def test_mfu_formula_matches_hand_count():
    cfg = load_config("gpt_tiny")  # 2 layers, d 64, 4 heads, d_ff 256, seq 32, tied, learned positions
    vocab, d, f, L, T = 128, 64, 256, 2, 32
    mdef = model_def(cfg, vocab)
    per_layer = (4 * (d * d + d)          # q, k, v, o with biases
                 + (d * f + f) + (f * d + d)  # MLP up and down
                 + 2 * 2 * d)             # two LayerNorms (scale, bias)
    n = vocab * d + L * per_layer + 2 * d  # tied embedding + blocks + final norm (no position table)
    assert matmul_params(cfg, mdef.shapes) == n
    expected = 6 * n + 12 * L * 4 * 16 * T / 2
    assert family_of(cfg.model.arch).flops_per_token(cfg, mdef.shapes) == pytest.approx(expected)
    assert mdef.num_params == n + T * d  # the position table is a parameter but no matmul


@pytest.mark.parametrize("length,dim", [(50, 16), (37, 7)], ids=["even-dim", "odd-dim"])
def test_sinusoidal_table_follows_the_formula(length, dim):
    # Vaswani et al. 3.5: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)),
    # written out per entry in float64; an odd d ends on a sine column.
    want = np.zeros((length, dim))
    for pos in range(length):
        for j in range(dim):
            angle = pos / 10000.0 ** ((j - j % 2) / dim)
            want[pos, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    got = sinusoidal_table(length, dim)
    assert got.shape == (length, dim) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got[0]), np.arange(dim) % 2)  # sin 0 = 0, cos 0 = 1


@pytest.mark.parametrize("arch", ["gpt", "mamba", "lstm"])
def test_score_head_gives_a_scalar_per_position_that_starts_at_zero_and_trains(arch):
    from flax import nnx

    from llm_jax.models.base import build_model

    cfg = load_config("gpt_tiny", [f"model.arch={arch}", "model.score_head=true", "model.num_layers=1",
                                   "model.d_model=16", "model.num_heads=2"])
    model = build_model(cfg, 32, nnx.Rngs(0))
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    out = model(tokens)
    assert out.aux["score"].shape == (2, 6) and out.aux["score"].dtype == jnp.float32
    np.testing.assert_array_equal(out.aux["score"], 0.0)  # zero-initialised: every text scores alike
    graphdef, params = nnx.split(model)
    grads = jax.grad(lambda p: nnx.merge(graphdef, p)(tokens).aux["score"][:, -1].sum())(params)
    assert float(jnp.abs(grads["score_head"]["kernel"][...]).sum()) > 0
    plain = build_model(load_config("gpt_tiny", [f"model.arch={arch}", "model.num_layers=1", "model.d_model=16",
                                                 "model.num_heads=2"]), 32, nnx.Rngs(0))
    assert "score" not in plain(tokens).aux


def test_score_head_is_refused_on_an_encoder():
    from llm_jax.errors import UserError

    with pytest.raises((UserError, ValueError), match="model.score_head is a decoder's scalar head"):
        load_config("bert_small", ["model.score_head=true"])
