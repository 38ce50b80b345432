"""Config parsing, overrides, validation messages and run-identity checks."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llm_jax.config import CONFIGS_DIR, Config, all_keys, check_compatible, key_docs, load_config
from llm_jax.errors import UserError


def test_preset_and_overrides():
    cfg = load_config("gpt_tiny", ["train.steps=7", "optim.lr=1e-3", "model.position=rope", "data.source=text:x"])
    assert cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.position == "rope"
    assert cfg.model.d_model == 64  # from the preset
    assert cfg.data.source == "text:x"


def test_yaml_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 96\n  num_heads: 3\n")
    cfg = load_config(str(path))
    assert cfg.model.d_model == 96 and cfg.model.head_dim == 32


def test_derived_values():
    cfg = load_config(None, ["model.d_model=128", "model.num_heads=4", "model.mlp=swiglu"])
    assert cfg.model.head_dim == 32
    assert cfg.model.kv_heads == 4
    assert cfg.model.ff_dim % 64 == 0 and cfg.model.ff_dim >= 8 * 128 // 3
    assert cfg.max_seq_len == cfg.train.seq_len


@pytest.mark.parametrize("override, message", [
    ("train.stpes=5", "did you mean 'train.steps'"),
    ("modle.d_model=5", "did you mean 'model.d_model'"),
    ("train.steps=abc", "train.steps"),
    ("model.num_heads=5", "does not divide model.d_model"),
    ("model.num_kv_heads=3", "model.num_kv_heads=3 does not divide"),
    ("model.position=alibi", "model.position"),
    ("train.grad_accum=3", "not divisible by train.grad_accum"),
    ("optim.lr=-1", "optim.lr"),
    ("train.steps", "KEY=VALUE"),
    *((f"{key}=0", f"{key}: Input should be greater than or equal to 1") for key in (
        "model.d_ff", "model.num_kv_heads", "model.vocab_size", "model.max_seq_len", "model.num_decoder_layers",
        "model.moe.expert_d_ff", "model.ssm.dt_rank", "optim.decay_steps")),
])
def test_bad_values_name_the_problem(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("gpt_tiny", [override])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(UserError, match="did you mean 'train.batch_size'"):
        load_config(str(path))


def test_unknown_preset_suggests():
    with pytest.raises(UserError, match="did you mean 'gpt_tiny'"):
        load_config("gpt_tiyn")


def test_every_key_documented():
    docs = key_docs()
    assert [k for k, _, _ in docs] == all_keys()
    undocumented = [k for k, _, d in docs if not d]
    assert undocumented == []


def test_identity_allows_more_steps_refuses_new_model():
    a = load_config("gpt_tiny")
    check_compatible(a, load_config("gpt_tiny", ["train.steps=99", "mesh.data=2", "model.scan_layers=true",
                                                 "model.remat=full", "model.dtype=bfloat16"]), "runs/x")
    with pytest.raises(UserError, match="model.d_model"):
        check_compatible(a, load_config("gpt_tiny", ["model.d_model=128"]), "runs/x")


def test_defaults_validate_and_are_the_documented_ones():
    defaults = Config()
    # No preset and no overrides: the schema's defaults, through the same validation as a file.
    assert load_config(None) == defaults
    assert Config.model_validate(defaults.to_dict()) == defaults  # what config.yaml holds reads back
    documented = {key: default for key, default, _ in key_docs()}  # what `llm-jax keys` prints
    for key in all_keys():
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        assert repr(value) == documented[key], key
    assert defaults.train.steps > 0 and defaults.model.d_model % defaults.model.num_heads == 0


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
def test_every_preset_validates(preset):
    cfg = load_config(preset, [])
    assert cfg.run.dir == f"runs/{preset}"  # each preset writes to its own run directory


def test_gpt_1b_preset_has_about_a_billion_parameters():
    from llm_jax.models.base import model_vocab_size
    from llm_jax.models.definition import model_def
    cfg = load_config("gpt_1b", [])
    assert model_def(cfg, model_vocab_size(cfg, 257)).num_params == 1_078_472_704  # as `bench` reported


def test_an_installed_wheel_carries_every_preset(tmp_path):
    # Build the wheel (no network: the venv's setuptools and wheel), install it alone into a
    # directory and load presets from it, away from the checkout's configs/.
    repo, src = Path(__file__).resolve().parent.parent, tmp_path / "src"
    # A copy, so setuptools' build/ and egg-info land in tmp_path rather than in the checkout.
    shutil.copytree(repo / "llm_jax", src / "llm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("llm_jax-*.whl")
    presets = sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))
    assert "gpt_small.yaml" in presets
    assert sorted(Path(n).name for n in zipfile.ZipFile(wheel).namelist()
                  if n.startswith("llm_jax/configs/")) == presets
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import llm_jax, llm_jax.config as c; assert llm_jax.__file__.startswith(%r), llm_jax.__file__; "
             "print(c.load_config('gpt_small', []).train.steps)" % str(site))
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(load_config("gpt_small", []).train.steps)
