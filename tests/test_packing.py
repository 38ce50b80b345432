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
from llm_jax.data.formats import encode_example, packed_row_width
from llm_jax.data.sft_rows import pack_examples, resolve_format, unpacked_examples
from llm_jax.errors import UserError
from llm_jax.models.attention import causal_attention, masked_attention, same_segment
from llm_jax.models.definition import model_def, param_shardings
from llm_jax.models.ssm import selective_scan
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.rules import activation_mesh, logical_to_spec
from llm_jax.train.exact_match import completion_of_row, completions_of_rows
from llm_jax.train.objectives import Vocab, build_objective, row_width
from llm_jax.train.objectives.base import token_losses
from llm_jax.train.objectives.causal import Causal, MaskedCausal, eos_segment_ids, packed_inputs

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


@pytest.mark.parametrize("mode", ["sequential", "associative", "chunked", "pallas"])
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
    rows = jnp.asarray([[7, 8, EOS, 9, EOS, EOS, 1, 2, 3], [EOS, 3, 4, 5, 6, EOS, 7, 8, 9]])
    inputs, weights = packed_inputs(rows[:, :-1], eos_segment_ids(rows, EOS))
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


BYTE_EOS = 256  # the byte tokenizer's EOS (63 is a byte: '?')


def byte_encode(text: str) -> list[int]:
    return list(text.encode())


def chat(*turns: str) -> str:
    """A chat record of alternating user and assistant turns."""
    roles = ["user", "assistant"] * len(turns)
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]})


def supervised_rows_of(tmp_path, fmt: str, *overrides: str):
    """(config, training rows, validation rows) of a JSONL file of prompt/completion examples
    (train.seq_len=32) or of chats of one or two exchanges (seq_len=128), of many lengths."""
    rng = np.random.default_rng(1)
    if fmt == "chat":
        records = [chat(*["q" * int(rng.integers(0, 4)) if i % 2 == 0 else "a" * int(rng.integers(1, 5))
                          for i in range(2 * int(rng.integers(1, 3)))]) for _ in range(60)]
        overrides = ("train.seq_len=128", *overrides)
    else:
        records = [json.dumps({"prompt": "q" * int(rng.integers(0, 12)) + ":",
                               "completion": "a" * int(rng.integers(1, 10))}) for _ in range(60)]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(r + "\n" for r in records))
    cfg = resolve_format(load_config("gpt_tiny", [f"data.source=jsonl:{path}", f"data.cache_dir={tmp_path / 'cache'}",
                                                  "data.val_fraction=0.1", "model.num_layers=1", *overrides]))
    assert cfg.objective == "masked_causal" and cfg.data.format == fmt
    bundle = build_data(cfg, tmp_path / "run")
    assert bundle.train_tokens.shape[1] == row_width(cfg)
    return cfg, np.asarray(bundle.train_tokens), np.asarray(bundle.val_tokens)


def masked_row(T: int, tokens, weights) -> np.ndarray:
    row = np.zeros(2 * T + 1, np.int32)
    row[:T + 1] = EOS
    row[:len(tokens)], row[T + 1:T + 1 + len(weights)] = tokens, weights
    return row


def test_examples_are_packed_in_order_with_their_weights_and_segment_ids():
    T = 8

    def packed(tokens, weights, segments):
        return np.concatenate([masked_row(T, tokens, weights), np.pad(segments, (0, T + 1 - len(segments)))])

    rows = np.stack([masked_row(T, [1, 2, EOS], [0, 1]), masked_row(T, [3, EOS], [1]),
                     masked_row(T, [4, 5, 6, 7, EOS], [0, 0, 1, 1]),
                     masked_row(T, [8, 9, 10, 11, 12, 13, 14, 15, EOS], [0, 1, 1, 1, 1, 1, 1, 1])])
    got = pack_examples(rows, T, EOS)
    np.testing.assert_array_equal(got, [
        packed([1, 2, EOS, 3, EOS], [0, 1, 0, 1], [1, 1, 1, 2, 2]),  # the third does not fit: next row; padding 0
        packed([4, 5, 6, 7, EOS], [0, 0, 1, 1], [1] * 5),
        packed([8, 9, 10, 11, 12, 13, 14, 15, EOS], [0, 1, 1, 1, 1, 1, 1, 1], [1] * 9),  # a full row
    ])
    assert got.shape[1] == packed_row_width(T)
    # each packed example reads back as its own row
    np.testing.assert_array_equal(np.concatenate([unpacked_examples(r, T, EOS) for r in got]), rows)


def test_a_chat_with_two_assistant_turns_stays_one_segment():
    T = 96
    chats = [chat("hi", "yo", "and?", "ok"), chat("x", "y")]
    rows = np.stack([encode_example(c, "chat", byte_encode, BYTE_EOS, "completion", T) for c in chats])
    first = len(byte_encode("<|user|>\nhi\n<|assistant|>\nyo")) + 1 + len(byte_encode("<|user|>\nand?\n"
                                                                                     "<|assistant|>\nok")) + 1
    second = len(byte_encode("<|user|>\nx\n<|assistant|>\ny")) + 1
    packed = pack_examples(rows, T, BYTE_EOS)
    assert len(packed) == 1
    tokens, segments = packed[0, :T + 1], packed[0, 2 * T + 1:]
    assert np.count_nonzero(tokens[:first] == BYTE_EOS) == 2  # the first turn's EOS is inside the chat
    np.testing.assert_array_equal(segments, [1] * first + [2] * second + [0] * (T + 1 - first - second))

    objective = MaskedCausal(seq_len=T, packing=True)
    inputs, targets, weights = objective.data(jnp.asarray(packed), 0)
    np.testing.assert_array_equal(inputs["segment_ids_BT"][0], segments[:T])
    positions = np.concatenate([np.arange(first), np.arange(second), np.arange(T - first - second)])
    np.testing.assert_array_equal(inputs["positions_BT"][0], positions)
    # the second assistant turn is scored as unpacked (the EOS rule would have cut the chat there)
    np.testing.assert_array_equal(weights[0, :first - 1], rows[0, T + 1:T + first])
    assert weights[0, :first].sum() == len("yo") + 1 + len("ok") + 1


def test_loss_on_all_never_scores_a_target_across_examples():
    T = 64
    rows = np.stack([encode_example(json.dumps({"prompt": "p" * n, "completion": "c"}), "prompt_completion",
                                    byte_encode, BYTE_EOS, "all", T) for n in (3, 5, 2, 7)]
                    + [encode_example(chat("u", "v", "w", "x"), "chat", byte_encode, BYTE_EOS, "all", T)])
    packed = pack_examples(rows, T, BYTE_EOS)
    assert len(packed) < len(rows)
    _, _, weights = MaskedCausal(seq_len=T, packing=True).data(jnp.asarray(packed), 0)
    weights = np.asarray(weights)
    segments = packed[:, 2 * T + 1:]
    crossing = segments[:, 1:] != segments[:, :-1]  # target t is token t + 1 of another segment
    assert crossing.any() and not weights[crossing].any()
    # every example's own targets are scored, as unpacked with loss_on=all: the chat's target
    # after its first turn's EOS too
    assert weights.sum() == rows[:, T + 1:].sum()
    inner_eos = (packed[:, :T] == BYTE_EOS) & ~crossing & (segments[:, :T] > 0)  # not the padding
    assert inner_eos.any() and weights[inner_eos].all()


@pytest.mark.slow  # builds both row sets and runs a model on each (about 8 s per format)
@pytest.mark.parametrize("fmt", ["prompt_completion", "chat"])
def test_packed_supervised_rows_give_the_same_completion_losses(tmp_path, fmt):
    cfg, rows, _ = supervised_rows_of(tmp_path, fmt)
    packed_cfg, packed_rows, _ = supervised_rows_of(tmp_path, fmt, "train.packing=true")
    assert len(packed_rows) < len(rows) * 2 / 3  # several examples per row
    T = cfg.train.seq_len
    assert packed_rows[:, T + 1:2 * T + 1].sum() == rows[:, T + 1:].sum()  # every scored token kept
    if fmt == "chat":  # some chats have two assistant turns: an EOS inside one segment
        segments, tokens = packed_rows[:, 2 * T + 1:], packed_rows[:, :T + 1]
        inner = (tokens[:, :-1] == BYTE_EOS) & (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        assert inner.any()

    vocab = Vocab(size=257, rows=320, eos_id=BYTE_EOS)
    mdef = model_def(cfg, vocab.rows)
    params = draw_params(cfg, mdef, 5)

    def scored_losses(c, r):
        inputs, targets, weights = build_objective(c, vocab).data(jnp.asarray(r), 0)
        losses_BT = token_losses(mdef.merge(params)(**inputs).logits, targets)
        return np.asarray(losses_BT)[np.asarray(weights) > 0]  # row-major: examples in file order

    want = scored_losses(cfg, rows)
    np.testing.assert_allclose(scored_losses(packed_cfg, packed_rows), want, rtol=1e-5, atol=1e-5 * want.max())
    # the same packed rows read as one sequence (no segments): later examples see earlier ones
    assert np.abs(scored_losses(cfg, packed_rows[:, :2 * T + 1]) - want).max() > 1e-3


def test_chat_rows_can_be_packed():
    cfg = load_config(None, ["data.source=jsonl:x.jsonl", "data.format=chat", "train.packing=true",
                             "train.seq_len=16"])
    assert cfg.objective == "masked_causal" and row_width(cfg) == packed_row_width(16) == 3 * 16 + 2
    unpacked = load_config(None, ["data.source=jsonl:x.jsonl", "data.format=chat", "train.seq_len=16"])
    assert row_width(unpacked) == 2 * 16 + 1


def test_exact_match_reads_every_example_of_packed_rows():
    T = 64
    chats = [chat("q1", "a1"), chat("q2", "a2", "q3", "a3"), chat("q4", "a4"), chat("q5", "a5")]
    rows = np.stack([encode_example(c, "chat", byte_encode, BYTE_EOS, "completion", T) for c in chats])
    packed = pack_examples(rows, T, BYTE_EOS)
    assert len(packed) < len(rows)
    kinds = ["k1", "k2", "k3", "k4"]
    for limit in (1, 3, 9):
        want = completions_of_rows(rows, T, BYTE_EOS, kinds, limit)
        assert completions_of_rows(packed, T, BYTE_EOS, kinds, limit) == want
    first = completion_of_row(packed[0], T, BYTE_EOS)
    assert bytes(first.prompt).decode() == "<|user|>\nq1\n<|assistant|>\n" and bytes(first.answer) == b"a1"


def test_packed_chats_keep_one_kind_per_validation_example(tmp_path):
    records = [json.dumps({"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}],
                           "kind": f"k{i % 3}"}) for i in range(40)]
    path = tmp_path / "kinds.jsonl"
    path.write_text("".join(r + "\n" for r in records))
    cfg = resolve_format(load_config("gpt_tiny", [f"data.source=jsonl:{path}", f"data.cache_dir={tmp_path / 'cache'}",
                                                  "data.val_fraction=0.3", "train.packing=true", "train.seq_len=128"]))
    bundle = build_data(cfg, tmp_path / "run")
    assert bundle.mixture is None  # (the kinds once landed in the mixture's field)
    rows, T = np.asarray(bundle.val_tokens), cfg.train.seq_len
    examples = [e for r in rows for e in unpacked_examples(r, T, BYTE_EOS)]
    assert len(rows) < len(examples) == len(bundle.val_kinds)
    for example in completions_of_rows(rows, T, BYTE_EOS, bundle.val_kinds, 100):  # each answer with its kind
        assert example.kind == f"k{int(bytes(example.answer)) % 3}"
