"""The rows of a supervised JSONL source (data.format prompt_completion or chat), built once.

`resolve_format` turns data.format=auto into the format the file's first record implies, before
anything else reads the config (the objective, the run directory's identity). `supervised_rows`
reads the file in one pass: each non-empty line is an example (`formats.encode_example`) in the
split its line number hashes to, as for a text JSONL corpus (`jsonl_files.jsonl_held_out_lines`; plain, .gz or .zst). A
bad record stops the build with `FILE:LINE: reason`, or with data.skip_bad_records is counted
and skipped. Both splits' rows are cached as `.npy` under `<cache>/sft/`, keyed by everything
that decides them, and memory-mapped afterwards; the `.json` beside them is written last, so it
always vouches for complete arrays, and an error leaves nothing behind.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np

from llm_jax.config import Config, validate
from llm_jax.config.schema import SUPERVISED_FORMATS
from llm_jax.data.cache import CACHE_FORMAT_VERSION, content_key, file_lock, log, save_npy_atomic, write_json_atomic
from llm_jax.data.formats import TEMPLATE_VERSION, BadRecord, detect_format, encode_example
from llm_jax.data.jsonl_files import first_line, jsonl_fingerprint, jsonl_held_out_lines, jsonl_lines
from llm_jax.data.tokenizer import Tokenizer, identity_of
from llm_jax.errors import UserError

SPLITS = ("train", "validation")
# Reasons of skipped records quoted in the log line (the rest are only counted).
_QUOTED_BAD = 3


def jsonl_path(source: str) -> Path:
    path = Path(source.removeprefix("jsonl:")).expanduser()
    if path.is_dir() or glob.has_magic(str(path)):
        raise UserError(f"supervised formats read one JSONL file (plain, .gz or .zst), not a directory or glob: "
                        f"data.source '{source}'")
    if not path.is_file():
        raise UserError(f"JSONL file not found: {path} (data.source '{source}')")
    return path


def resolve_format(cfg: Config) -> Config:
    """`cfg` with data.format=auto replaced by prompt_completion or chat when data.source is a
    JSONL file whose first record has those fields (then validated again: the arch must take
    it). Auto stays auto where it means text, so it is what a run's config.yaml records."""
    data = cfg.data
    if data.format != "auto" or data.task or not data.source.startswith("jsonl:"):
        return cfg
    path = Path(data.source.removeprefix("jsonl:")).expanduser()
    if not path.is_file():  # a directory or glob of JSONL files is a text corpus (or missing: said there)
        return cfg
    found = detect_format(first_line(path))
    if found not in SUPERVISED_FORMATS:
        return cfg
    settings = cfg.to_dict()
    settings["data"]["format"] = found
    try:
        return validate(settings)
    except UserError as exc:
        raise UserError(f"{exc} (data.format=auto found {found} records in {path}; "
                        "data.format=text reads them as text)") from None


def supervised_rows(cfg: Config, tokenizer: Tokenizer, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows), int32 [N, 2 * train.seq_len + 1], memory-mapped."""
    data, path = cfg.data, jsonl_path(cfg.data.source)
    key = content_key({"file": jsonl_fingerprint(path), "tokenizer": identity_of(tokenizer), "format": data.format,
                       "loss_on": cfg.train.loss_on, "seq_len": cfg.train.seq_len, "val_fraction": data.val_fraction,
                       "skip_bad_records": data.skip_bad_records, "template": TEMPLATE_VERSION,
                       "cache_format": CACHE_FORMAT_VERSION})
    folder = root / "sft"
    meta_path = folder / f"{key}.json"
    if not meta_path.is_file():
        with file_lock(folder / f".{key}.lock"):
            if not meta_path.is_file():  # another process may have built it meanwhile
                rows, meta = _build(cfg, tokenizer, path)
                for split in SPLITS:
                    save_npy_atomic(folder / f"{key}.{split}.npy", rows[split])
                write_json_atomic(meta_path, meta)
    meta = json.loads(meta_path.read_text())
    skipped = f"; {meta['bad']} bad records skipped ({'; '.join(meta['bad_quoted'])})" if meta["bad"] else ""
    log(f"{path} ({data.format}): {meta['train']} training and {meta['validation']} validation examples, "
        f"{meta['scored']} scored tokens{skipped}")
    train, val = (np.load(folder / f"{key}.{split}.npy", mmap_mode="r") for split in SPLITS)
    return train, val


def _build(cfg: Config, tokenizer: Tokenizer, path: Path) -> tuple[dict[str, np.ndarray], dict]:
    seq_len, fmt = cfg.train.seq_len, cfg.data.format
    held_out = jsonl_held_out_lines(path, cfg.data.val_fraction)
    rows: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    bad: list[str] = []
    for i, line in jsonl_lines(path):
        try:
            row = encode_example(line, fmt, tokenizer.encode, tokenizer.eos_id, cfg.train.loss_on, seq_len)
        except BadRecord as exc:
            if not cfg.data.skip_bad_records:
                raise UserError(f"{path}:{i + 1}: {exc} (data.skip_bad_records=true skips such records)") from None
            bad.append(f"line {i + 1}: {exc}")
            continue
        rows["validation" if i in held_out else "train"].append(row)
    for split in SPLITS:
        if not rows[split]:
            raise UserError(f"{path}: no {split} examples left ({sum(map(len, rows.values()))} good and {len(bad)} "
                            f"bad records); a run needs at least one on each side: add records or change "
                            f"data.val_fraction={cfg.data.val_fraction}")
    arrays = {split: np.stack(rows[split]) for split in SPLITS}
    meta = {split: len(arrays[split]) for split in SPLITS}
    meta.update(bad=len(bad), bad_quoted=bad[:_QUOTED_BAD], format=fmt, source=str(path),
                scored=int(sum(a[:, seq_len + 1:].sum() for a in arrays.values())))
    return arrays, meta
