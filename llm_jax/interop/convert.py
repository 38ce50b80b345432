"""Whole models: a Hugging Face directory -> (llm-jax Config, parameters), and back.

The registry picks the adapter (config.json's `model_type` when reading, the one that exports the
config exactly when writing); `files` does the I/O.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from llm_jax.config import Config, validate
from llm_jax.errors import UserError
from llm_jax.interop.base import adapter_for_config, adapter_for_model_type
from llm_jax.interop.files import read_config, read_tensors, write_files
from llm_jax.models.definition import model_def

# What a config.json of the wrong types or sizes makes the adapters raise (a string where a number
# goes, a null head count, a dimension too large to allocate): the file comes from anyone.
_BAD_VALUE = (TypeError, ValueError, AttributeError, ArithmeticError, IndexError)


def config_from_hf(hf: dict[str, Any], run_dir: str = "runs/hf") -> Config:
    """The llm-jax config of config.json's network: its `model` section, no dropout, the exact
    vocabulary, and `train.seq_len` (the encoder's too) at the adapter's default within the
    position table."""
    adapter = adapter_for_model_type(hf.get("model_type"))
    try:
        model = adapter.model_config(hf)
        model.update(vocab_size=hf["vocab_size"], vocab_multiple=1, dropout=0.0)
        seq_len = min(adapter.seq_len, model.get("max_seq_len") or adapter.seq_len)
    except KeyError as exc:
        raise UserError(f"this {adapter.hf_class} config.json lacks {exc.args[0]!r}") from None
    except _BAD_VALUE as exc:
        raise UserError(f"this {adapter.hf_class} config.json holds a value of the wrong type or size "
                        f"({type(exc).__name__}: {exc})") from None
    return validate({"run": {"dir": run_dir}, "model": model, "train": {"seq_len": seq_len, "src_len": seq_len}})


def read_hf_model(hf_dir: Path, run_dir: str = "runs/hf") -> tuple[str, Config, dict]:
    """(adapter name, llm-jax config, numpy parameters) of a Hugging Face directory, with every
    parameter's shape checked against the model the config describes."""
    hf = read_config(hf_dir)
    try:
        adapter = adapter_for_model_type(hf.get("model_type"))
    except UserError as exc:
        raise UserError(f"{hf_dir}: {exc}") from None
    cfg = config_from_hf(hf, run_dir)
    tensors = read_tensors(hf_dir)
    try:
        params = adapter.params_from_hf(tensors, cfg)
        want = jax.tree.map(lambda s: tuple(s.shape), model_def(cfg, cfg.model.vocab_size).shapes)
        got = jax.tree.map(lambda a: tuple(a.shape), params)
    except KeyError as exc:
        raise UserError(f"the {adapter.name} checkpoint lacks tensor {exc.args[0]}") from None
    except _BAD_VALUE as exc:
        raise UserError(f"{hf_dir}: its weights do not fit its config.json ({type(exc).__name__}: {exc})") from None
    if want != got:
        raise UserError(f"{hf_dir}: tensor shapes do not match its config.json")
    return adapter.name, cfg, params


def write_hf_model(out: Path, cfg: Config, params: dict, tokenizer_json: Path | None, eos_id: int | None,
                   pad_id: int = 0) -> str:
    """Write config.json, model.safetensors (and tokenizer.json) that transformers loads; returns
    the adapter's name. Refuses (a UserError) before writing anything when no adapter exports `cfg`."""
    adapter = adapter_for_config(cfg)
    tensors = adapter.params_to_hf(params, cfg)
    write_files(out, adapter.hf_config(cfg, eos_id, pad_id), tensors, tokenizer_json)
    return adapter.name
