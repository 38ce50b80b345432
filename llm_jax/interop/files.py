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
from llm_jax.paths import safe_child

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
    except (OSError, ValueError, RecursionError) as exc:  # (RecursionError: JSON nested too deeply)
        raise UserError(f"cannot read {path / CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / CONFIG_FILE} is not a JSON object")
    return config


# Weight files that are Python pickles (PyTorch's torch.save): loading one runs whatever code it
# names, so they are never opened, only named in the refusal.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CONVERT = ("convert the weights to safetensors where you trust them, e.g. "
            "AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every weight of the directory (one file or the shards of an index), as float32. Only
    safetensors files are read: a directory with only PyTorch pickles is refused, naming them."""
    from safetensors import SafetensorError  # only reading or writing weights needs safetensors
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(path):
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"cannot read {file} as safetensors: {exc}") from None
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a directory: model.safetensors, or the shards its index lists
    (plain file names inside the directory, each a .safetensors file)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"cannot read {index}: no readable weight_map ({type(exc).__name__})") from None
        files = [safe_child(path, name, f"{INDEX_FILE} shard") for name in names]
        pickles = [f.name for f in files if not f.name.endswith(".safetensors")]
        if pickles:
            raise UserError(f"{index} lists {', '.join(pickles[:3])}, not safetensors files; " + _CONVERT)
        return files
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    pickles = sorted(f.name for f in path.iterdir() if f.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UserError(f"{path} has no model.safetensors, only PyTorch pickle weights ({', '.join(pickles[:3])}), "
                        "which llm-jax does not load since unpickling runs code; " + _CONVERT)
    raise UserError(f"{path} has no model.safetensors (nor a {INDEX_FILE})")


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
