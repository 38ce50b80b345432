"""BERT (model.arch=bert): bidirectional encoder (Hugging Face parity and round trip: test_hf),
masked-LM training (loss falls, same losses on every mesh and with gradient accumulation), no generation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import REPO, TINY, cli_subprocess, losses

import llm_jax
from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.models.base import build_model, family_of
from llm_jax.models.definition import model_def
from llm_jax.models.stack import matmul_params

FIXTURE = REPO / "tests" / "fixtures" / "hf" / "bert"
SMALL = ["model.arch=bert", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "train.seq_len=16"]


def test_generate_refuses_an_encoder():
    with pytest.raises(UserError, match="does not generate"):
        llm_jax.load(FIXTURE).generate("def ", max_new_tokens=4)


def test_attention_is_bidirectional_and_padding_is_hidden():
    model = build_model(load_config(None, SMALL), 128, nnx.Rngs(0))
    a = jnp.arange(16)[None] % 100
    b = a.at[0, 10].set(99)
    la, lb = model(a)[0], model(b)[0]
    assert not np.allclose(la[0, :10], lb[0, :10])  # earlier positions see the later token
    # Behind a padding mask, what the padded slots hold changes nothing at the real positions.
    mask = (jnp.arange(16) < 12)[None]
    pa = model(a, attention_mask_BT=mask)[0]
    pb = model(a.at[0, 13].set(7), attention_mask_BT=mask)[0]
    np.testing.assert_allclose(pa[0, :12], pb[0, :12], atol=1e-6)
    # Segment 1 differs from segment 0.
    assert not np.allclose(model(a, segments_BT=jnp.ones_like(a))[0], la)


def test_flops_count_both_directions():
    cfg = load_config("gpt_tiny", ["model.arch=bert"])  # 2 x 64, 4 heads, d_ff 256, T 32
    vocab, d, f, L, T = 128, 64, 256, 2, 32
    mdef = model_def(cfg, vocab)
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # attention, MLP, two LayerNorms
    head = d * d + d + 2 * d + vocab  # transform dense, its LayerNorm, output bias (decoder tied)
    n = vocab * d + 2 * d + L * per_layer + head  # embedding + its LayerNorm (no gathers' tables)
    assert matmul_params(cfg, mdef.shapes) == n
    assert mdef.num_params == n + T * d + 2 * d  # plus the position and segment tables
    # The full T x T attention: every token attends both ways.
    assert family_of(cfg.model.arch).flops_per_token(cfg, mdef.shapes) == 6 * n + 12 * L * 4 * 16 * T


STEPS = ["model.arch=bert", "train.batch_size=8", "checkpoint.every=0", "optim.warmup_steps=5"]


@pytest.mark.slow
def test_cli_training_lowers_the_masked_lm_loss(tmp_path, capsys):
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path}", *TINY, *STEPS, "train.steps=30",
                 "train.sample_tokens=16"]) == 0
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 31))
    assert np.mean([got[s] for s in range(26, 31)]) < got[1] - 1.0  # starts near ln(384) = 5.95
    out = capsys.readouterr().out
    assert "eval loss" in out and "no sample" in out and "does not generate" in out


@pytest.mark.slow
def test_same_losses_on_a_mesh_with_accumulation(tmp_path):
    """data=2 x tensor=4 with two microbatches against one device. (The masked LM on data=2 x
    fsdp=2 x tensor=2 without accumulation: test_families, the bert_small and bert_package
    presets, and the NSP test below.)"""
    steps = [*STEPS, "train.steps=6"]
    single = cli_subprocess(["train", "gpt_tiny", f"run.dir={tmp_path / 'one'}", "mesh.data=1", *TINY, *steps],
                            devices=1)
    # Two microbatches hold different numbers of masked positions: the step must still give the
    # full batch's loss and gradient (masks drawn once per step, sums over the global count).
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'accum'}", "mesh.data=2", "mesh.tensor=4",
                 "train.grad_accum=2", *TINY, *steps]) == 0
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "accum")
    assert sorted(ref) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=1e-4)


def test_a_trained_bert_exports_with_its_logits_and_odd_variants_are_refused(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "gpt_tiny", f"run.dir={run}", "model.arch=bert", "train.steps=3",
                 "train.sample_tokens=0", "data.max_bytes=300000"]) == 0
    assert main(["export-hf", str(run), str(out)]) == 0
    ids = np.random.default_rng(0).integers(0, 257, (2, 16))
    np.testing.assert_allclose(llm_jax.load(out).logits(ids), llm_jax.load(run).logits(ids), atol=2e-5)
    relu = tmp_path / "relu"
    assert main(["train", "gpt_tiny", f"run.dir={relu}", "model.arch=bert", "model.mlp=relu", "train.steps=1",
                 "train.sample_tokens=0", "data.max_bytes=300000"]) == 0
    capsys.readouterr()
    assert main(["export-hf", str(relu), str(tmp_path / "relu_hf")]) == 2
    assert "no Hugging Face equivalent" in capsys.readouterr().err


def test_classify_rows_read_cls_then_the_text():
    from llm_jax.data.tasks import PAD
    from llm_jax.train.objectives.tasks import classify_targets

    rows = np.array([[5, 6, 7, 1, 3], [8, 1, PAD, PAD, 0]], np.int32)  # 4 text slots, then the label
    inputs, targets, weights = classify_targets(jnp.asarray(rows), cls_id=258)
    np.testing.assert_array_equal(inputs["tokens_BT"], [[258, 5, 6, 7], [258, 8, 1, 0]])
    np.testing.assert_array_equal(inputs["attention_mask_BT"], [[1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(targets, [3, 0])
    assert weights is None


@pytest.mark.slow
def test_a_masked_lm_starts_a_classifier_that_learns_the_package_task(tmp_path, capsys):
    small = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "train.seq_len=64",
             "train.batch_size=16", "checkpoint.every=0", "train.eval_batches=4", "data.max_bytes=2000000",
             "train.log_every=1", "train.progress=false"]
    mlm, cls = tmp_path / "mlm", tmp_path / "cls"
    assert main(["train", "bert_small", f"run.dir={mlm}", "train.steps=3", *small]) == 0
    assert main(["train", "bert_package", f"run.dir={cls}", f"checkpoint.init_from={mlm}", "train.steps=30",
                 "optim.warmup_steps=3", "optim.lr=1e-3", "train.eval_every=0", *small]) == 0
    captured = capsys.readouterr()
    assert "newly initialised: ['classifier']['bias'], ['classifier']['kernel'], ['pooler']['bias']" in captured.err
    assert "final: step 30, eval loss" in captured.out and "accuracy" in captured.out
    got = losses(cls)
    assert np.mean([got[s] for s in range(26, 31)]) < got[1] - 0.1  # from ~ln(8) = 2.08

    # The encoder is the masked-LM run's; the MLM head is gone, the classifier head is new.
    source, tuned = llm_jax.load(mlm), llm_jax.load(cls)
    assert "head_dense" in source.params and "head_dense" not in tuned.params and "classifier" in tuned.params
    start = main(["train", "bert_package", f"run.dir={tmp_path / 'zero'}", f"checkpoint.init_from={mlm}",
                  "train.steps=1", "optim.lr=1e-9", "train.eval_every=0", *small])
    assert start == 0
    zero = llm_jax.load(tmp_path / "zero")
    np.testing.assert_allclose(zero.params["embed"]["embedding"], source.params["embed"]["embedding"], atol=1e-6)
    logits = tuned.logits(np.array([[258, 100, 101, 102]]))
    assert logits.shape == (1, 8)  # a classifier's logits: one per class


@pytest.mark.slow
def test_next_sentence_prediction_trains_and_shards_with_the_same_losses(tmp_path, capsys):
    steps = [*STEPS, "train.nsp=true", "train.steps=8", "train.seq_len=32", "optim.lr=3e-3", "optim.warmup_steps=2"]
    single = cli_subprocess(["train", "gpt_tiny", f"run.dir={tmp_path / 'one'}", "mesh.data=1", *TINY, *steps],
                            devices=1)
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'mixed'}", "mesh.data=2", "mesh.fsdp=2",
                 "mesh.tensor=2", *TINY, *steps]) == 0
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "mixed")
    np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=1e-4)
    assert np.mean([ref[7], ref[8]]) < ref[1] - 0.2
    params = llm_jax.load(tmp_path / "mixed").params
    assert params["nsp_head"]["kernel"].shape == (64, 2) and "head_dense" in params  # both heads
