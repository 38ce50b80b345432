"""Masked-LM masking and next-sentence pairs (llm_jax/train/objectives/masked_lm.py): BERT's rates, determinism in
(seed, step), the special ids, and the next-sentence loss scored from the model's aux output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.models.base import ModelOutput
from llm_jax.train.objectives import Vocab, build_objective, tokenizer_objective
from llm_jax.train.objectives.masked_lm import MLMSpec, mlm_key, mlm_mask, mlm_spec, mlm_targets

SPEC = MLMSpec(mask_id=257, vocab_limit=257)


def test_rates_are_15_percent_then_80_10_10():
    # Tokens that are never the mask id and lie in a narrow band, so a random replacement is
    # recognisable as long as it leaves the band.
    tokens = jnp.full((256, 512), 3, jnp.int32)
    inputs, chosen = mlm_mask(mlm_key(0, 7), tokens, SPEC)
    inputs, chosen = np.asarray(inputs), np.asarray(chosen)
    n = chosen.size
    assert abs(chosen.mean() - 0.15) < 0.003  # 131k draws: the std is 0.001
    # Unchosen positions are never touched.
    assert (inputs[~chosen] == 3).all()
    picked = inputs[chosen]
    masked = (picked == 257).mean()
    kept_or_random = picked[picked != 257]
    random = (kept_or_random != 3).mean() * len(kept_or_random) / len(picked)
    # A random replacement draws 3 itself with probability 1/257: count it as "kept" and correct.
    random /= 1 - 1 / 257
    assert abs(masked - 0.8) < 0.01, masked
    assert abs(random - 0.1) < 0.01, random
    assert abs(1 - masked - random - 0.1) < 0.01
    # Random replacements come from the tokenizer's ids, never from padding rows.
    assert picked.max() <= 257 and (picked[picked != 257] < 257).all()
    assert n == 256 * 512


def test_masks_are_a_function_of_seed_and_step():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (8, 64)), jnp.int32)
    a = mlm_mask(mlm_key(0, 5), tokens, SPEC)
    b = mlm_mask(mlm_key(0, 5), tokens, SPEC)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for other in (mlm_key(0, 6), mlm_key(1, 5)):
        assert not np.array_equal(mlm_mask(other, tokens, SPEC)[1], a[1])
    # A traced step (as in the jitted train step) gives the python step's masks.
    traced = jax.jit(lambda s: mlm_mask(mlm_key(0, s), tokens, SPEC))(jnp.int32(5))
    np.testing.assert_array_equal(traced[0], a[0])


def test_targets_are_the_first_t_tokens_weighted_where_chosen():
    windows = jnp.asarray(np.random.default_rng(1).integers(0, 257, (4, 33)), jnp.int32)
    inputs, targets, weights = mlm_targets(windows, mlm_key(0, 0), SPEC)
    assert inputs.shape == targets.shape == weights.shape == (4, 32)
    np.testing.assert_array_equal(targets, windows[:, :-1])
    _, chosen = mlm_mask(mlm_key(0, 0), windows[:, :-1], SPEC)
    np.testing.assert_array_equal(weights, np.asarray(chosen, np.float32))


class _WithMask:
    vocab_size = 96
    eos_id = 1

    def token_id(self, token):
        return {"[MASK]": 4}.get(token)


def test_mask_id_is_the_tokenizers_or_the_first_padding_row():
    assert mlm_spec(Vocab(257, 384, 256)) == MLMSpec(mask_id=257, vocab_limit=257)  # byte tokens padded to 384
    assert tokenizer_objective(load_config("gpt_tiny", ["model.arch=bert"]), _WithMask(), 96).mlm.mask_id == 4
    with pytest.raises(UserError, match="no padding row"):
        mlm_spec(Vocab(257, 257, 256))  # model.vocab_multiple=1: nowhere to put [MASK]


def test_next_sentence_pairs_continue_or_borrow_and_keep_specials():
    cfg = load_config("gpt_tiny", ["model.arch=bert", "train.nsp=true", "train.seq_len=13"])
    objective = build_objective(cfg, Vocab(257, 384, eos_id=256))
    assert (objective.mlm.mask_id, objective.nsp.cls_id, objective.nsp.sep_id) == (257, 258, 259)  # padding rows
    B, T, a = 64, 13, 5  # a = (T - 3) // 2; B spans the remaining T - 3 - a = 5 tokens
    rows = jnp.asarray(np.arange(B * (T + 1)).reshape(B, T + 1) % 200, jnp.int32)
    inputs, targets, weights = objective.data(rows, 7)
    t = np.asarray(targets["tokens"])
    labels = np.asarray(targets["next"])
    assert 0.3 < labels.mean() < 0.7 and set(labels) == {0, 1}  # IsNext / NotNext about half each
    r = np.asarray(rows)
    for i in range(B):
        np.testing.assert_array_equal(t[i, [0, a + 1, T - 1]], [258, 259, 259])
        np.testing.assert_array_equal(t[i, 1:a + 1], r[i, :a])  # A: the row's first a tokens
        donor = (i + 1) % B if labels[i] else i  # B: what follows A, or the same span of the next row
        np.testing.assert_array_equal(t[i, a + 2:T - 1], r[donor, a:T - 3])
    np.testing.assert_array_equal(np.asarray(inputs["segments_BT"])[0], [0] * (a + 2) + [1] * (T - a - 2))
    w = np.asarray(weights["tokens"])
    assert not w[:, [0, a + 1, T - 1]].any()  # specials never masked
    masked = w.astype(bool)
    assert 0.08 < masked.mean() < 0.2  # about 15% of the other positions
    same = objective.data(rows, 7)
    np.testing.assert_array_equal(same[1]["next"], labels)  # a function of (seed, step)
    np.testing.assert_array_equal(same[1]["tokens"], t)
    # Every label counts once, beside the masked tokens.
    assert float(objective.count(targets, weights)) == masked.sum() + B
    with pytest.raises(UserError, match="train.nsp"):
        load_config("gpt_tiny", ["train.nsp=true"])


def test_next_sentence_loss_is_the_masked_tokens_and_the_labels_over_their_count():
    cfg = load_config("gpt_tiny", ["model.arch=bert", "train.nsp=true", "train.seq_len=13"])
    objective = build_objective(cfg, Vocab(257, 384, eos_id=256))
    rows = jnp.asarray(np.random.default_rng(0).integers(0, 257, (8, 14)), jnp.int32)
    _, targets, weights = objective.data(rows, 3)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 13, 384)).astype(np.float32)
    nsp_logits = rng.normal(size=(8, 2)).astype(np.float32)
    out = ModelOutput(jnp.asarray(logits), None, {"nsp_logits": jnp.asarray(nsp_logits)})
    total, count = objective.loss(out, targets, weights, train=False)

    def nll(z, t):  # -log softmax(z)[t], by hand
        z = z - z.max(-1, keepdims=True)
        return np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, t[..., None], -1)[..., 0]

    w = np.asarray(weights["tokens"])
    want = (nll(logits, np.asarray(targets["tokens"])) * w).sum() + nll(nsp_logits, np.asarray(targets["next"])).sum()
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(count) == w.sum() + 8
    hits = (logits.argmax(-1) == np.asarray(targets["tokens"])) * w
    want_hits = hits.sum() + (nsp_logits.argmax(-1) == np.asarray(targets["next"])).sum()
    assert float(objective.hits(out, targets, weights)) == want_hits
