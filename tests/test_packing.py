"""Sequence packing (`train.packing`): a packed row gives each document the per-token losses and
gradients it gets alone in its own row, for every causal family and attention kernel, on one
device and on an 8-device data-parallel mesh; encoders refuse packing."""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from runs import TINY, losses

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.data.build import build_data
from llm_jax.data.sft_rows import pack_examples, resolve_format
from llm_jax.errors import UserError
from llm_jax.models.attention import causal_attention, masked_attention, same_segment
from llm_jax.models.definition import model_def, param_shardings
from llm_jax.models.ssm import selective_scan
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.rules import activation_mesh, logical_to_spec
from llm_jax.train.objectives import Vocab, build_objective
from llm_jax.train.objectives.base import token_losses
from llm_jax.train.objectives.causal import Causal, packed_inputs

VOCAB, EOS, T = 64, 63, 16
SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64", f"train.seq_len={T}",
         "train.batch_size=8", "mesh.data=1"]
LLAMA = ["model.position=rope", "model.num_kv_heads=2", "model.norm=rmsnorm", "model.mlp=swiglu",
         "model.use_bias=false"]
# attention blocks of 4 queries: a 16-token row has four, so segments cross block edges
ATTENTION = {"xla": ["model.attention=xla"], "blockwise": ["model.attention=blockwise", "model.attention_block=8"],
             "masked": ["model.attention=xla"]}  # masked: the einsum path, given an explicit causal mask
MODELS = {
    **{f"gpt-learned-{k}": ["model.position=learned", *v] for k, v in ATTENTION.items()},
    **{f"gpt-rope-{k}": ["model.position=rope", *v] for k, v in ATTENTION.items()},
    **{f"llama-gqa-{k}": [*LLAMA, *v] for k, v in ATTENTION.items()},
    **{f"mamba-{scan}": ["model.arch=mamba", "model.norm=rmsnorm", f"model.ssm.scan={scan}", "model.ssm.chunk=4"]
       for scan in ("sequential", "associative", "chunked")},
    "mamba-hybrid": ["model.arch=mamba", "model.layer_pattern=[mamba, attention]", "model.attention=blockwise",
                     "model.attention_block=8"],
    "rnn": ["model.arch=rnn"],
    "lstm": ["model.arch=lstm", "model.tie_embeddings=false"],
    "gru": ["model.arch=gru"],
}


def documents(seed: int = 0) -> list[np.ndarray]:
    """Documents of different lengths, each ending in EOS."""
    rng = np.random.default_rng(seed)
    lengths = [5, 9, 3, 12, 7, 2, 6, 11, 4, 8, 10, 3, 6, 13, 5, 7, 9, 2, 4, 6, 8, 5, 3, 12, 7, 6, 9]
    return [np.append(rng.integers(0, EOS, n), EOS) for n in lengths]


def pack(docs: list[np.ndarray], rows: int) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """Rows [rows, T+1] of whole documents in order, the last one of a row cut short (a partial
    document), and the pieces: (row, start column, tokens) of every document part in a row."""
    packed = np.zeros((rows, T + 1), np.int32)
    pieces = []
    docs = iter(docs)
    for r in range(rows):
        col = 0
        while col < T + 1:
            doc = next(docs)[: T + 1 - col]
            packed[r, col:col + len(doc)] = doc
            pieces.append((r, col, doc))
            col += len(doc)
    return packed, pieces


def alone(pieces, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each piece in a row of its own from column 0, padded with zeros (the rows rounded up to a
    multiple of 8), and the weights of its real targets."""
    width = -(-max(len(pieces), rows) // 8) * 8
    ref = np.zeros((width, T + 1), np.int32)
    weights = np.zeros((width, T), np.float32)
    for i, (_, _, doc) in enumerate(pieces):
        ref[i, :len(doc)] = doc
        weights[i, :len(doc) - 1] = 1.0
    return ref, weights


def draw_params(cfg, mdef, seed: int):
    """Normal draws of std 0.3 (sharp attention, so a leak across documents shows), norm scales 1."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if getattr(path[-1], "key", None) == "scale":
            return jnp.ones(shape.shape, shape.dtype)
        return jnp.asarray(rng.normal(0.0, 0.3, shape.shape), shape.dtype)

    return jax.tree_util.tree_map_with_path(draw, mdef.shapes)


def per_token_losses(model, inputs: dict, targets_BT, explicit_mask: bool):
    if explicit_mask:  # the `masked` kernel: the einsum path under an explicit causal mask
        inputs = {**inputs, "mask_BTS": jnp.tril(jnp.ones((T, T), bool))[None]}
    return token_losses(model(**inputs).logits, targets_BT)


@partial(jax.jit, static_argnames=("graphdef", "explicit_mask", "packed"))
def losses_and_grads(graphdef, params, rows, weights_BT, *, explicit_mask: bool, packed: bool):
    """Per-token losses [B, T] (weighted) and the gradient of their sum, of packed rows (inputs
    from the `causal` objective with packing) or of one-document rows (inputs as without it)."""
    objective = Causal(packing=packed, eos_id=EOS)
    inputs, targets_BT, data_weights = objective.data(rows, 0)
    if packed:
        weights_BT = data_weights

    def total(p):
        losses_BT = per_token_losses(nnx.merge(graphdef, p), inputs, targets_BT, explicit_mask) * weights_BT
        return losses_BT.sum(), losses_BT

    (_, losses_BT), grads = jax.value_and_grad(total, has_aux=True)(params)
    return losses_BT, weights_BT, grads


def run(cfg, mdef, params, rows, weights, *, explicit_mask, packed, mesh):
    batch = NamedSharding(mesh, logical_to_spec(("batch", None)))
    params = jax.device_put(params, param_shardings(mdef, mesh))
    with activation_mesh(mesh):
        out = losses_and_grads(mdef.graphdef, params, jax.device_put(rows, batch), jax.device_put(weights, batch),
                               explicit_mask=explicit_mask, packed=packed)
    return jax.tree.map(np.asarray, out)


def assert_close_to_scale(got, want, rtol=1e-5):
    """Equal within rtol, and within rtol of the largest value in `want` (fp32 sums in another
    order: a gradient that is zero in exact arithmetic, a key bias's, comes out as rounding noise)."""
    scale = max(np.abs(w).max() for w in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


# On 8 devices, one kernel per family: sharding the batch changes no segment logic, and every
# kernel is already checked on one device (each case compiles two gradients, 5-30 s on 2 cores).
SHARDED = ("gpt-learned-blockwise", "gpt-rope-xla", "llama-gqa-masked", "mamba-chunked", "mamba-hybrid",
           "rnn", "lstm", "gru")
CASES = [(name, 1) for name in MODELS] + [(name, 8) for name in SHARDED]


@pytest.mark.slow  # the kernels' own check below is quick
@pytest.mark.parametrize(("name", "devices"), CASES)
def test_packed_rows_equal_documents_alone(name, devices):
    cfg = load_config(None, [*SMALL, *MODELS[name], f"mesh.data={devices}"])
    mdef = model_def(cfg, VOCAB)
    params = draw_params(cfg, mdef, sum(map(ord, name)))
    mesh = make_mesh(cfg, jax.devices()[:devices])
    rows, pieces = pack(documents(), 8)
    ref_rows, ref_weights = alone(pieces, 8)
    explicit_mask = name.endswith("-masked")

    losses, weights, grads = run(cfg, mdef, params, rows, np.zeros((8, T), np.float32), explicit_mask=explicit_mask,
                                 packed=True, mesh=mesh)
    ref_losses, _, ref_grads = run(cfg, mdef, params, ref_rows, ref_weights, explicit_mask=explicit_mask,
                                   packed=False, mesh=mesh)

    # Each piece's targets sit in its packed row from its start column on; the target after an
    # EOS (the next document's first token) and the padding of the rows alone are not scored.
    want_losses, want_weights = np.zeros_like(losses), np.zeros_like(weights)
    for i, (r, col, doc) in enumerate(pieces):
        n = min(len(doc), T - col)
        want_losses[r, col:col + n] = ref_losses[i, :n]
        want_weights[r, col:col + n] = ref_weights[i, :n]
    np.testing.assert_array_equal(weights, want_weights)
    assert weights.sum() == ref_weights.sum()
    assert_close_to_scale(losses, want_losses)
    assert_close_to_scale(grads, ref_grads)

    if devices == 1:  # the check has teeth: the same rows without segment ids give other losses
        model = mdef.merge(params)
        inputs, targets, _ = Causal(packing=True, eos_id=EOS).data(jnp.asarray(rows), 0)
        leaky = per_token_losses(model, {"tokens_BT": inputs["tokens_BT"]}, targets, explicit_mask) * weights
        assert np.abs(np.asarray(leaky) - want_losses).max() > 1e-3


@pytest.mark.parametrize("kernel", ["blockwise", "xla"])
def test_attention_kernels_keep_segments_apart_forward_and_backward(kernel):
    """Each kernel under segment ids equals the einsum reference under causal-and-same-segment
    masks, values and gradients (blockwise: its hand-written backward pass), with grouped KV heads."""
    B, T, N, K, H = 2, 16, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in ks[1:])
    seg = jnp.asarray([[0] * 3 + [1] * 7 + [2] * 6, [0] * 10 + [1] * 2 + [2] * 4])  # across the blocks of 8
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & same_segment(seg)

    def ref(q, k, v):
        return masked_attention(q, k, v, mask)

    def got(q, k, v):
        if kernel == "xla":  # the library kernel takes kv heads equal to query heads
            k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        return causal_attention(q, k, v, kernel, 8, seg)

    def value_and_grads(f):  # jitted: the blockwise loop dispatches op by op otherwise
        return jax.jit(jax.value_and_grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)

    (want, g_ref), (value, g_got) = value_and_grads(ref), value_and_grads(got)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("mode", ["sequential", "associative", "chunked"])
def test_selective_scan_restarts_at_each_segment(mode):
    """With resets, each scan equals scanning every segment on its own from the zero state."""
    ks = jax.random.split(jax.random.key(1), 4)
    Bsz, T, D, N = 1, 12, 3, 2
    x, delta = jax.random.normal(ks[0], (Bsz, T, D)), jax.nn.softplus(jax.random.normal(ks[1], (Bsz, T, D)))
    B, C = (jax.random.normal(key, (Bsz, T, N)) for key in ks[2:])
    A, D_skip = -jnp.arange(1.0, N + 1) * jnp.ones((D, 1)), jnp.ones(D)
    starts = [0, 3, 4, 9]  # segments [0, 3), [3, 4), [4, 9), [9, 12): across chunks of 4
    reset = jnp.zeros((Bsz, T), bool).at[:, starts[1:]].set(True)
    got, _ = jax.jit(partial(selective_scan, mode=mode, chunk=4))(x, delta, A, B, C, D_skip, reset_BT=reset)
    for a, b in zip(starts, starts[1:] + [T]):
        want, _ = selective_scan(x[:, a:b], delta[:, a:b], A, B[:, a:b], C[:, a:b], D_skip, mode="sequential")
        np.testing.assert_allclose(got[:, a:b], want, rtol=1e-5, atol=1e-6)


def test_segments_and_positions_restart_after_each_eos():
    tokens = jnp.asarray([[7, 8, EOS, 9, EOS, EOS, 1, 2], [EOS, 3, 4, 5, 6, EOS, 7, 8]])
    inputs, weights = packed_inputs(tokens, EOS)
    np.testing.assert_array_equal(inputs["segment_ids_BT"], [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(inputs["positions_BT"], [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 0, 1]])
    np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0, 0, 1, 1], [0, 1, 1, 1, 1, 0, 1, 1]])


def test_without_packing_the_objective_is_unchanged():
    rows = jnp.asarray(pack(documents(), 2)[0])
    inputs, targets, weights = Causal(eos_id=EOS).data(rows, 0)
    assert set(inputs) == {"tokens_BT"} and weights is None
    np.testing.assert_array_equal(inputs["tokens_BT"], rows[:, :-1])
    np.testing.assert_array_equal(targets, rows[:, 1:])


@pytest.mark.parametrize("arch", [["model.arch=bert"], ["model.arch=t5"], ["model.arch=transformer",
                                                                           "data.task=funcname"]])
def test_packing_is_refused_for_encoders(arch):
    with pytest.raises(UserError, match=rf"train.packing .*model.arch={arch[0].split('=')[1]}"):
        load_config(None, [*arch, "train.packing=true"])


def test_packing_is_refused_for_synthetic_tasks():
    with pytest.raises(UserError, match="train.packing .*data.task=induction"):
        load_config(None, ["data.task=induction", "train.packing=true"])


def short_documents(path) -> str:
    """A JSONL corpus of short texts: many EOS-separated documents in every 33-token window."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "value", "print", "for", "in", "if", "else", "None"]
    lines = [json.dumps({"text": " ".join(rng.choice(words, rng.integers(1, 6)))}) for _ in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    return f"data.source=jsonl:{path}"


@pytest.mark.slow
def test_packed_training_learns_and_packing_changes_the_losses(tmp_path):
    args = ["train", "gpt_tiny", *TINY, "train.steps=20", "checkpoint.every=0", "mesh.data=8",
            short_documents(tmp_path / "docs.jsonl")]
    assert main([*args, f"run.dir={tmp_path / 'packed'}", "train.packing=true"]) == 0
    assert main([*args, f"run.dir={tmp_path / 'plain'}"]) == 0
    packed, plain = losses(tmp_path / "packed"), losses(tmp_path / "plain")
    assert np.mean([packed[19], packed[20]]) < packed[1] - 1.0, packed  # it learns
    # Same data, same start: the flag takes effect (targets after EOS are not scored, documents
    # do not see each other), so the losses differ from the first step on.
    assert abs(packed[1] - plain[1]) > 1e-3


# ---------------------------------------------------------------- supervised examples, packed


def prompt_completion_rows(tmp_path, *overrides: str):
    """(config, training rows) of a prompt/completion JSONL file of examples of many lengths."""
    rng = np.random.default_rng(1)
    records = [{"prompt": "q" * int(rng.integers(0, 12)) + ":", "completion": "a" * int(rng.integers(1, 10))}
               for _ in range(60)]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = resolve_format(load_config("gpt_tiny", [f"data.source=jsonl:{path}", f"data.cache_dir={tmp_path / 'cache'}",
                                                  "data.val_fraction=0.1", "model.num_layers=1", *overrides]))
    assert cfg.objective == "masked_causal"
    return cfg, np.asarray(build_data(cfg, tmp_path / "run").train_tokens)


def test_examples_are_packed_in_order_with_their_weights():
    T = 8

    def row(tokens, weights):
        r = np.full(2 * T + 1, EOS, np.int32)
        r[T + 1:] = 0
        r[:len(tokens)], r[T + 1:T + 1 + len(weights)] = tokens, weights
        return r

    rows = np.stack([row([1, 2, EOS], [0, 1]), row([3, EOS], [1]), row([4, 5, 6, 7, EOS], [0, 0, 1, 1]),
                     row([8, 9, 10, 11, 12, 13, 14, 15, EOS], [0, 1, 1, 1, 1, 1, 1, 1])])
    packed = pack_examples(rows, T, EOS)
    np.testing.assert_array_equal(packed, [
        row([1, 2, EOS, 3, EOS, EOS, EOS, EOS, EOS], [0, 1, 0, 1]),  # the third does not fit: next row
        row([4, 5, 6, 7, EOS], [0, 0, 1, 1]),
        row([8, 9, 10, 11, 12, 13, 14, 15, EOS], [0, 1, 1, 1, 1, 1, 1, 1]),  # a full row
    ])


@pytest.mark.slow  # builds both row sets and runs a model on each (about 8 s)
def test_packed_supervised_rows_give_the_same_completion_losses(tmp_path):
    cfg, rows = prompt_completion_rows(tmp_path)
    packed_cfg, packed_rows = prompt_completion_rows(tmp_path, "train.packing=true")
    assert len(packed_rows) < len(rows) / 2  # several examples per row
    T = cfg.train.seq_len
    assert packed_rows[:, T + 1:].sum() == rows[:, T + 1:].sum()  # every scored token kept

    vocab = Vocab(size=257, rows=320, eos_id=256)
    mdef = model_def(cfg, vocab.rows)
    params = draw_params(cfg, mdef, 5)

    def scored_losses(c, r):
        inputs, targets, weights = build_objective(c, vocab).data(jnp.asarray(r), 0)
        losses_BT = token_losses(mdef.merge(params)(**inputs).logits, targets)
        return np.asarray(losses_BT)[np.asarray(weights) > 0]  # row-major: examples in file order

    want = scored_losses(cfg, rows)
    np.testing.assert_allclose(scored_losses(packed_cfg, packed_rows), want, rtol=1e-5, atol=1e-5 * want.max())
    # the same packed rows read as one sequence (no segments): later examples see earlier ones
    assert np.abs(scored_losses(cfg, packed_rows) - want).max() > 1e-3


def test_chat_rows_are_not_packed():
    with pytest.raises(UserError, match="train.packing .*data.format=chat"):
        load_config(None, ["data.source=jsonl:x.jsonl", "data.format=chat", "train.packing=true"])
