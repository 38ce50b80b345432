"""Recurrent LMs (rnn, lstm, gru): cell equations, causality, training, generation (meshes: test_families)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import TINY, losses

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.inference.generate import generate
from llm_jax.models.base import build_model, family_of, model_vocab_size
from llm_jax.models.definition import model_def
from llm_jax.models.recurrent import GATES, cell_step, run_cell
from llm_jax.models.stack import matmul_params

ARCHS = ("rnn", "lstm", "gru")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_step(kind, h, c, x, wx, bx, wh, bh):
    """The textbook equations, one gate at a time, in float64 numpy.

    wx, wh: [gates, in, H]; bx, bh: [gates, H] (bh zero except for the GRU).
    """
    a = [x @ wx[g] + bx[g] for g in range(wx.shape[0])]
    b = [h @ wh[g] + bh[g] for g in range(wh.shape[0])]
    if kind == "rnn":
        return np.tanh(a[0] + b[0]), c
    if kind == "lstm":
        i, f, g, o = _sigmoid(a[0] + b[0]), _sigmoid(a[1] + b[1]), np.tanh(a[2] + b[2]), _sigmoid(a[3] + b[3])
        c = f * c + i * g
        return o * np.tanh(c), c
    r, z = _sigmoid(a[0] + b[0]), _sigmoid(a[1] + b[1])
    n = np.tanh(a[2] + r * b[2])  # reset gate applied to (W_hn h + b_hn)
    return (1 - z) * n + z * h, c


def _weights(kind, D, H, seed):
    rng = np.random.default_rng(seed)
    G = GATES[kind]
    wx, wh = rng.normal(0, 0.5, (G, D, H)), rng.normal(0, 0.5, (G, H, H))
    bx = rng.normal(0, 0.5, (G, H))
    bh = rng.normal(0, 0.5, (G, H)) if kind == "gru" else np.zeros((G, H))
    return wx, bx, wh, bh


@pytest.mark.parametrize("kind", ARCHS)
def test_scan_equals_step_by_step_reference(kind):
    B, T, D, H = 3, 7, 5, 4
    for seed in range(3):
        wx, bx, wh, bh = _weights(kind, D, H, seed)
        rng = np.random.default_rng(100 + seed)
        xs = rng.normal(size=(B, T, D))
        h0, c0 = rng.normal(size=(B, H)), rng.normal(size=(B, H))
        h, c, want = h0, c0, []
        for t in range(T):
            h, c = np_step(kind, h, c, xs[:, t], wx, bx, wh, bh)
            want.append(h)
        # The model's layout: the input projection precomputed, kernels [in, gates, H].
        xp = np.einsum("btd,gdh->btgh", xs, wx) + bx
        state = {"h": jnp.asarray(h0, jnp.float32)}
        if kind == "lstm":
            state["c"] = jnp.asarray(c0, jnp.float32)
        got, final = run_cell(kind, jnp.asarray(xp, jnp.float32), jnp.asarray(wh.transpose(1, 0, 2), jnp.float32),
                              jnp.asarray(bh, jnp.float32) if kind == "gru" else None, state)
        np.testing.assert_allclose(got, np.stack(want, 1), atol=1e-5)
        np.testing.assert_allclose(final["h"], h, atol=1e-5)
        if kind == "lstm":
            np.testing.assert_allclose(final["c"], c, atol=1e-5)


def test_one_step_with_known_weights():
    """Zero pre-activations: every sigmoid gate is 1/2 and tanh(0) = 0, computed by hand."""
    zeros = jnp.zeros((1, 4, 1))
    out = cell_step("lstm", {"h": jnp.ones((1, 1)), "c": jnp.full((1, 1), 2.0)}, zeros, jnp.zeros((1, 4, 1)), None)
    # c' = f*c + i*g = 0.5*2 + 0.5*0 = 1; h' = o*tanh(c') = 0.5*tanh(1)
    np.testing.assert_allclose(out["c"], [[1.0]], atol=1e-6)
    np.testing.assert_allclose(out["h"], [[0.5 * np.tanh(1.0)]], atol=1e-6)
    # GRU, h = 1, W = 0, b_hn = 2 (others 0): r = z = 1/2, n = tanh(0.5 * 2), h' = 0.5 n + 0.5 h.
    bh = jnp.array([[0.0], [0.0], [2.0]])
    out = cell_step("gru", {"h": jnp.ones((1, 1))}, jnp.zeros((1, 3, 1)), jnp.zeros((1, 3, 1)), bh)
    np.testing.assert_allclose(out["h"], [[0.5 * np.tanh(1.0) + 0.5]], atol=1e-6)
    # Elman: h' = tanh(x W_x + b + h W_h) with scalars 0.3 + 0.5 * 2.
    out = cell_step("rnn", {"h": jnp.full((1, 1), 2.0)}, jnp.full((1, 1, 1), 0.3), jnp.full((1, 1, 1), 0.5), None)
    np.testing.assert_allclose(out["h"], [[np.tanh(1.3)]], atol=1e-6)
    # And the numpy reference agrees with the hand values (it checks the scan above).
    h, c = np_step("lstm", np.ones((1, 1)), np.full((1, 1), 2.0), np.zeros((1, 1)), np.zeros((4, 1, 1)),
                   np.zeros((4, 1)), np.zeros((4, 1, 1)), np.zeros((4, 1)))
    np.testing.assert_allclose([h[0, 0], c[0, 0]], [0.5 * np.tanh(1.0), 1.0])


def test_lstm_forget_bias_starts_at_one():
    model = build_model(load_config(None, ["model.arch=lstm", "model.d_model=16"]), 128, nnx.Rngs(0))
    bias = np.asarray(model.layers.inp.bias[...])  # [layers, gates, H]
    assert (bias[:, 1] == 1).all() and (bias[:, [0, 2, 3]] == 0).all()


@pytest.mark.parametrize("kind", ARCHS)
def test_state_carries(kind):
    cfg = load_config(None, [f"model.arch={kind}", "model.num_layers=2", "model.d_model=32", "train.seq_len=16",
                             "model.tie_embeddings=false"])
    model = build_model(cfg, 128, nnx.Rngs(0))
    a = jnp.arange(16)[None] % 100
    la = model(a).logits
    # Two halves with the state carried between them equal one pass over the whole.
    l1, s, _ = model(a[:, :9], cache=model.init_cache(1, 0, jnp.float32))
    l2 = model(a[:, 9:], cache=s).logits
    np.testing.assert_allclose(jnp.concatenate([l1, l2], 1), la, atol=1e-5)


def test_flops_are_six_times_matmul_params():
    cfg = load_config("gpt_tiny", ["model.arch=lstm"])  # 2 layers, d 64, tied
    vocab, d, L = 128, 64, 2
    per_layer = (d * 4 * d + 4 * d)  # input projection and its bias, four gates
    per_layer += d * 4 * d           # recurrent projection (no bias for the LSTM)
    per_layer += 2 * d               # LayerNorm scale and bias
    n = vocab * d + L * per_layer + 2 * d  # tied embedding + layers + final norm
    mdef = model_def(cfg, vocab)
    assert matmul_params(cfg, mdef.shapes) == n == mdef.num_params
    assert family_of(cfg.model.arch).flops_per_token(cfg, mdef.shapes) == 6 * n  # no attention term
    gru = load_config("gpt_tiny", ["model.arch=gru", "model.tie_embeddings=false"])
    n_gru = vocab * d + L * (2 * (d * 3 * d + 3 * d) + 2 * d) + 2 * d  # head, layers, final norm
    assert matmul_params(gru, model_def(gru, vocab).shapes) == n_gru


STEPS = ["train.steps=30", "train.batch_size=8", "checkpoint.every=0", "optim.warmup_steps=5"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ARCHS)
def test_cli_training_lowers_the_loss(tmp_path, kind):
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path}", f"model.arch={kind}", *TINY, *STEPS]) == 0
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 31))
    assert np.mean([got[s] for s in range(26, 31)]) < got[1] - 1.0  # byte-level loss starts near ln(384)


# The same losses on data=2 x fsdp=2 x tensor=2 as on one device: test_families, the rnn_small,
# lstm_small and gru_small presets.


@pytest.mark.slow
@pytest.mark.parametrize("kind", ARCHS)
def test_generation_runs_past_train_seq_len(kind):
    """A recurrent model has no position table: it generates beyond train.seq_len (cached
    generation equals recomputation for every family: test_families.py)."""
    cfg = load_config(None, [f"model.arch={kind}", "model.num_layers=2", "model.d_model=32", "train.seq_len=32"])
    mdef = model_def(cfg, model_vocab_size(cfg, ByteTokenizer.vocab_size))
    rng = np.random.default_rng(ARCHS.index(kind))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), mdef.shapes)
    assert len(generate((mdef, params), cfg, [[1, 2]], max_new_tokens=40, temperature=0.0)[0]) == 40


@pytest.mark.slow
def test_generate_cli_on_a_trained_run(tmp_path, capsys):
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path}", "model.arch=gru", *TINY,
                 "train.steps=3", "checkpoint.every=0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "50",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    import llm_jax

    model = llm_jax.load(tmp_path)
    assert model.generate(["a", "import os"], max_new_tokens=5, temperature=0) == \
        model.generate(["a", "import os"], max_new_tokens=5, temperature=0)
