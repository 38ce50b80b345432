"""Hugging Face directories on disk: config.json, safetensors weights and tokenizer.json.

A Hugging Face directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`), and usually `tokenizer.json`. Weights are read and written with
safetensors' numpy API, so neither torch nor transformers is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llm_jax.data.chat_template import CONFIG_FILE as CHAT_CONFIG
from llm_jax.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


def is_hf_dir(path: Path) -> bool:
    """A directory with config.json and no config.yaml (a run directory has that)."""
    return (path / CONFIG_FILE).is_file() and not (path / "config.yaml").exists()


def hf_dir(path: str | Path) -> Path:
    """`path` as a Hugging Face directory, or a UserError."""
    path = Path(path).expanduser()
    if not (path.is_dir() and is_hf_dir(path)):
        raise UserError(f"{path} is not a Hugging Face checkpoint directory (config.json + model.safetensors)")
    return path


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path / CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / CONFIG_FILE} is not a JSON object")
    return config


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every weight of the directory (one file or the shards of an index), as float32."""
    from safetensors.numpy import load_file  # only reading or writing weights needs safetensors

    index = path / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise UserError(f"{path} has no model.safetensors (PyTorch .bin checkpoints are not read; "
                        "re-save with save_pretrained(safe_serialization=True))")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def write_files(out: Path, config: dict[str, Any], tensors: dict[str, np.ndarray],
                tokenizer_json: Path | None) -> None:
    """config.json, model.safetensors (float32) and a copy of tokenizer_json (with the
    tokenizer_config.json beside it, if any), into `out`."""
    from safetensors.numpy import save_file  # only reading or writing weights needs safetensors

    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(arrays, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer_json is not None:
        (out / TOKENIZER_FILE).write_bytes(tokenizer_json.read_bytes())
        chat_config = tokenizer_json.parent / CHAT_CONFIG  # the chat template goes with its tokenizer
        if chat_config.is_file():
            (out / CHAT_CONFIG).write_bytes(chat_config.read_bytes())
