"""Hugging Face interop, once per registered adapter: each fixture checkpoint (made by
scripts/make_hf_fixtures.py with transformers) loads with transformers' logits, imports into a run
that exports back the same tensors, and seeds new runs; the registry picks each config's adapter
and refuses, with its reasons, configs none can export."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from runs import REPO
from safetensors.numpy import load_file, save_file

import llm_jax
from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.interop import adapter_for_config, adapter_for_model_type, adapters, read_hf_model
from llm_jax.interop.tree import stack_layers, unstack_layers
from llm_jax.models.definition import model_def

FIXTURES = REPO / "tests" / "fixtures" / "hf"
NAMES = [a.name for a in adapters()]


def reference(name: str):
    """(the fixture's reference arrays, the positional and keyword arguments of `Model.logits` that
    gave transformers' `logits`): encoder-decoder fixtures hold decoder inputs and a source mask."""
    ref = np.load(FIXTURES / name / "reference.npz")
    if "decoder_input_ids" in ref:
        return ref, (ref["input_ids"], ref["decoder_input_ids"]), {"attention_mask": ref["attention_mask"]}
    return ref, (ref["input_ids"],), {}


def test_every_adapter_has_a_fixture():
    assert sorted(NAMES) == sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", NAMES)
def test_load_gives_the_transformers_logits(name):
    ref, args, kwargs = reference(name)
    model = llm_jax.load(FIXTURES / name)
    assert model.config.model.arch == adapter_for_model_type(name).arch
    np.testing.assert_allclose(model.logits(*args, **kwargs), ref["logits"], atol=2e-4)
    assert model.tokenizer is not None and model.tokenizer.vocab_size <= model.vocab_size
    if "decoder_input_ids" in ref:  # an encoder-decoder: decoder inputs start with T5's <pad>
        assert model.decoder_start_id == ref["decoder_input_ids"][0, 0] == 0
        with pytest.raises(UserError, match="decoder_input_ids"):
            model.logits(ref["input_ids"])
    if "logits_segments_padding" in ref:  # segments and a padding mask, through the module itself
        module = model._mdef.merge(model.params)
        got = module(jnp.asarray(ref["input_ids"], jnp.int32), segments_BT=jnp.asarray(ref["token_type_ids"]),
                     attention_mask_BT=jnp.asarray(ref["attention_mask"])).logits
        np.testing.assert_allclose(got, ref["logits_segments_padding"], atol=2e-4)


def test_the_bert_fixture_reads_its_special_tokens():
    tok = llm_jax.load(FIXTURES / "bert").tokenizer
    assert tok.token_id("[MASK]") == 4 and tok.eos_id == tok.token_id("[SEP]")


@pytest.mark.parametrize("name", NAMES)
def test_import_then_export_round_trips_the_checkpoint(name, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["import-hf", str(FIXTURES / name), str(run)]) == 0
    assert f"imported {name} from" in capsys.readouterr().out
    ref, args, kwargs = reference(name)
    imported = llm_jax.load(run)
    assert imported.step == 0 and imported.config.model.arch == adapter_for_model_type(name).arch
    np.testing.assert_allclose(imported.logits(*args, **kwargs), ref["logits"], atol=2e-4)
    # The imported run generates through the CLI with the checkpoint's tokenizer, as the
    # checkpoint itself does (an encoder refuses, a one-line user error with exit status 2).
    source = llm_jax.load(FIXTURES / name)
    try:
        greedy = source.generate("def ", max_new_tokens=8, temperature=0.0)
    except UserError as exc:
        assert "does not generate" in str(exc)
        assert main(["generate", str(run), "--prompt", "def "]) == 2
        assert "does not generate" in capsys.readouterr().err
    else:
        assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]) == 0
        shown = f"def \n=> {greedy}" if source.config.model.is_encoder_decoder else "def " + greedy
        assert capsys.readouterr().out.strip() == shown.strip()

    assert main(["export-hf", str(run), str(out)]) == 0
    assert f"as {name} to" in capsys.readouterr().out
    want, got = load_file(str(FIXTURES / name / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    # Only a tied output matrix (GPT-2's lm_head, BERT's MLM decoder) is left out: transformers
    # stores it as a copy of the word embedding.
    for key in set(want) - set(got):
        assert imported.config.model.tie_embeddings
        assert any(np.array_equal(want[key], value) for value in got.values()), key
    assert json.loads((out / "config.json").read_text())["model_type"] == name
    assert (out / "tokenizer.json").read_bytes() == (FIXTURES / name / "tokenizer.json").read_bytes()
    exported = llm_jax.load(out)
    np.testing.assert_allclose(exported.logits(*args, **kwargs), ref["logits"], atol=2e-4)
    np.testing.assert_array_equal(exported.logits(*args, **kwargs), source.logits(*args, **kwargs))


@pytest.mark.parametrize("name", NAMES)
def test_the_registry_picks_each_fixtures_adapter(name):
    kind, cfg, _ = read_hf_model(FIXTURES / name)
    assert kind == name and adapter_for_config(cfg).name == name
    # Exactly one adapter exports it; every other one says why not, in a sentence naming its class.
    for other in adapters():
        reason = other.unsupported(cfg)
        assert (reason is None) == (other.name == name)
        assert reason is None or other.hf_class in reason


def test_a_config_no_adapter_exports_is_one_error_with_each_reason():
    with pytest.raises(UserError, match="no Hugging Face equivalent") as err:
        adapter_for_config(load_config("gpt_tiny", ["model.mlp=relu"]))
    # Every adapter for model.arch=gpt says what it would need; nothing from the others.
    assert "GPT2LMHeadModel needs model.mlp=gelu (not relu)" in str(err.value)
    assert "LlamaForCausalLM needs model.position=rope (not learned)" in str(err.value)
    assert "MixtralForCausalLM needs MoE layers" in str(err.value)
    assert "Bert" not in str(err.value)
    with pytest.raises(UserError, match="model.arch=lstm has no Hugging Face equivalent") as err:
        adapter_for_config(load_config("gpt_tiny", ["model.arch=lstm"]))
    assert all(a.hf_class in str(err.value) for a in adapters())
    with pytest.raises(UserError, match="is a classifier"):
        adapter_for_config(load_config("gpt_tiny", ["model.arch=bert", "data.task=package"]))
    with pytest.raises(UserError, match="model.moe.every=1 \\(not 2\\)"):
        adapter_for_config(load_config("gpt_tiny", ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
                                                     "model.use_bias=false", "model.moe.num_experts=4",
                                                     "model.moe.every=2"]))


def test_unreadable_directories_are_user_errors(tmp_path):
    bad = tmp_path / "neox"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(UserError, match="model_type 'gpt_neox' is not supported") as err:
        llm_jax.load(bad)
    assert all(f"{a.model_type} ({a.hf_class})" in str(err.value) for a in adapters())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(FIXTURES / "gpt2" / "config.json", pickled / "config.json")
    with pytest.raises(UserError, match="has no model.safetensors"):
        llm_jax.load(pickled)


def test_sharded_weights_load_like_one_file(tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copyfile(FIXTURES / "llama" / "config.json", sharded / "config.json")
    tensors = load_file(str(FIXTURES / "llama" / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for part, chunk in enumerate((names[::2], names[1::2])):
        shard = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in chunk}, str(sharded / shard))
        weight_map.update(dict.fromkeys(chunk, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ref, args, _ = reference("llama")
    np.testing.assert_allclose(llm_jax.load(sharded).logits(*args), ref["logits"], atol=2e-4)


def test_stacking_layers_round_trips():
    layers = [{"a": {"kernel": np.full((2, 3), i, np.float32)}, "b": np.arange(4) + i} for i in range(3)]
    stacked = stack_layers(layers)
    assert stacked["a"]["kernel"].shape == (3, 2, 3) and stacked["b"].shape == (3, 4)
    back = unstack_layers(stacked, 3)
    for want, got in zip(layers, back):
        np.testing.assert_array_equal(got["a"]["kernel"], want["a"]["kernel"])
        np.testing.assert_array_equal(got["b"], want["b"])


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
    ref, args, _ = reference("llama")
    # A vanishing learning rate: after one step the parameters are still the ones loaded.
    for source in (FIXTURES / "llama", imported):
        run = tmp_path / f"from_{source.name}"
        assert main(["train", str(imported / "config.yaml"), f"run.dir={run}", f"checkpoint.init_from={source}",
                     f"data.source=text:{corpus}", "train.steps=1", "train.seq_len=16", "train.batch_size=8",
                     "optim.lr=1e-30", "optim.min_lr=0", "train.sample_tokens=0", "train.eval_batches=1"]) == 0
        np.testing.assert_allclose(llm_jax.load(run).logits(*args), ref["logits"], atol=2e-4)


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
    gpt2 = load_config("gpt2", [])
    assert adapter_for_config(gpt2).name == "gpt2"
    assert model_def(gpt2, 50257).num_params == 124_439_808  # GPT2LMHeadModel's count for gpt2 (small)
    llama = load_config("llama", [])
    assert adapter_for_config(llama).name == "llama"
    assert llama.model.kv_heads == 4 and not llama.model.tie_embeddings


def test_import_hf_help_lists_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(a.hf_class in help_text for a in adapters())
