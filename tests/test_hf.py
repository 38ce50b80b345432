"""Hugging Face interop: fixture checkpoints (made by scripts/make_hf_fixtures.py with transformers)
load with transformers' logits, import into runs, export back unchanged, and seed new runs."""

import numpy as np
import pytest
from runs import REPO
from safetensors.numpy import load_file

import llm_jax
from llm_jax.cli import main

FIXTURES = REPO / "tests" / "fixtures" / "hf"
FAMILIES = ["gpt2", "llama", "mixtral", "mamba"]


def reference(name: str):
    ref = np.load(FIXTURES / name / "reference.npz")
    return ref["input_ids"], ref["logits"]


@pytest.mark.parametrize("name", FAMILIES)
def test_load_gives_the_transformers_logits(name):
    ids, logits = reference(name)
    model = llm_jax.load(FIXTURES / name)
    np.testing.assert_allclose(model.logits(ids), logits, atol=2e-4)
    assert model.tokenizer is not None and model.tokenizer.vocab_size <= model.vocab_size


@pytest.mark.parametrize("name", FAMILIES)
def test_import_then_export_round_trips_the_checkpoint(name, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["import-hf", str(FIXTURES / name), str(run)]) == 0
    ids, logits = reference(name)
    imported = llm_jax.load(run)
    assert imported.step == 0
    np.testing.assert_allclose(imported.logits(ids), logits, atol=2e-4)
    # The imported run generates through the CLI, with the checkpoint's tokenizer.
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    greedy = llm_jax.load(FIXTURES / name).generate("def ", max_new_tokens=8, temperature=0.0)
    assert capsys.readouterr().out.strip() == ("def " + greedy).strip()

    assert main(["export-hf", str(run), str(out)]) == 0
    want, got = load_file(str(FIXTURES / name / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(k for k in want if k != "lm_head.weight" or name != "gpt2")
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    assert (out / "tokenizer.json").read_bytes() == (FIXTURES / name / "tokenizer.json").read_bytes()
    np.testing.assert_allclose(llm_jax.load(out).logits(ids), logits, atol=2e-4)


def test_a_trained_run_exports_as_gpt2_with_its_logits(tmp_path):
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "gpt_tiny", f"run.dir={run}", "train.steps=3", "train.sample_tokens=0",
                 "data.max_bytes=300000"]) == 0
    assert main(["export-hf", str(run), str(out)]) == 0
    ids = np.random.default_rng(0).integers(0, 257, (2, 16))
    np.testing.assert_allclose(llm_jax.load(out).logits(ids), llm_jax.load(run).logits(ids), atol=2e-5)


def test_init_from_starts_a_new_run_from_hf_or_run_weights(tmp_path):
    imported = tmp_path / "imported"
    assert main(["import-hf", str(FIXTURES / "llama"), str(imported)]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main(args):\n    return args.value + 1\n" * 400)
    ids, logits = reference("llama")
    # A vanishing learning rate: after one step the parameters are still the ones loaded.
    for source in (FIXTURES / "llama", imported):
        run = tmp_path / f"from_{source.name}"
        assert main(["train", str(imported / "config.yaml"), f"run.dir={run}", f"checkpoint.init_from={source}",
                     f"data.source=text:{corpus}", "train.steps=1", "train.seq_len=16", "train.batch_size=8",
                     "optim.lr=1e-30", "optim.min_lr=0", "train.sample_tokens=0", "train.eval_batches=1"]) == 0
        np.testing.assert_allclose(llm_jax.load(run).logits(ids), logits, atol=2e-4)


def _error(args, capsys) -> str:
    capsys.readouterr()
    assert main(args) == 2
    return capsys.readouterr().err


def test_mismatches_and_bad_paths_are_user_errors(tmp_path, capsys):
    gpt2_run = tmp_path / "gpt2"
    assert main(["import-hf", str(FIXTURES / "gpt2"), str(gpt2_run)]) == 0

    err = _error(["import-hf", str(FIXTURES / "llama"), str(gpt2_run)], capsys)
    assert "already exists" in err
    err = _error(["import-hf", str(tmp_path), str(tmp_path / "x")], capsys)
    assert "is not a Hugging Face checkpoint directory" in err
    err = _error(["train", str(gpt2_run / "config.yaml"), f"run.dir={tmp_path / 'mixed'}",
                  f"checkpoint.init_from={FIXTURES / 'llama'}", "train.steps=1"], capsys)
    assert "is a different model" in err and "model.position: 'rope' there, 'learned' here" in err
    relu = tmp_path / "relu"
    assert main(["train", "gpt_tiny", f"run.dir={relu}", "model.mlp=relu", "train.steps=1",
                 "train.sample_tokens=0", "data.max_bytes=300000"]) == 0
    err = _error(["export-hf", str(relu), str(tmp_path / "relu_hf")], capsys)
    assert "no Hugging Face equivalent" in err
    assert not (tmp_path / "relu_hf").exists()


def test_presets_are_gpt2_small_and_a_llama():
    from llm_jax.config import load_config
    from llm_jax.interop import hf
    from llm_jax.models.definition import model_def
    gpt2 = load_config("gpt2", [])
    assert hf.family_of(gpt2) == "gpt2"
    assert model_def(gpt2, 50257).num_params == 124_439_808  # GPT2LMHeadModel's count for gpt2 (small)
    llama = load_config("llama", [])
    assert hf.family_of(llama) == "llama"
    assert llama.model.kv_heads == 4 and not llama.model.tie_embeddings
