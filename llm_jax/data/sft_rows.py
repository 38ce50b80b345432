"""The rows of a supervised JSONL source (data.format prompt_completion, chat, seq2seq,
classify, preference), built once.

`resolve_format` turns data.format=auto into the format the file's first record implies, and
fills data.labels of a classify source with the training split's labels, before anything else
reads the config (the objective, the classifier's size, the run directory's identity).
`supervised_rows` reads the file (plain, .gz or .zst) in one pass: each non-empty line is an
example (`formats.encode_example`, `task_formats`) in the split its line number hashes to, as for
a text JSONL corpus (`jsonl_files.jsonl_held_out_lines`). A bad record stops the build with
`FILE:LINE: reason`, or with data.skip_bad_records is counted and skipped. Both splits' rows are
cached as `.npy` under `<cache>/sft/`, keyed by everything that decides them, and memory-mapped
afterwards; the `.json` beside them is written last, so it always vouches for complete arrays,
and an error leaves nothing behind.

With train.packing (prompt_completion, chat) a row holds several examples in file order, with a
segment id per token (`pack_examples`; width 3 * seq_len + 2); the objective keeps them apart by
those ids (attention, positions, no target across two examples), not by EOS, which a multi-turn
chat has inside it.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llm_jax.config import Config, validate
from llm_jax.config.schema import SUPERVISED_FORMATS, instruct_format
from llm_jax.data.cache import CACHE_FORMAT_VERSION, build_once, content_key, log, save_npy_atomic, write_json_atomic
from llm_jax.data.chat_template import chat_template_of
from llm_jax.data.formats import (
    TEMPLATE_VERSION,
    BadRecord,
    detect_format,
    encode_example,
    packed_row_width,
    parse_record,
)
from llm_jax.data.instruct import instruction_file
from llm_jax.data.jsonl_files import first_line, jsonl_fingerprint, jsonl_held_out_lines, jsonl_lines
from llm_jax.data.preference import encode_preference, split_rows
from llm_jax.data.task_formats import (
    classify_record,
    encode_classify_line,
    encode_seq2seq_line,
    scored_targets,
    sorted_labels,
)
from llm_jax.data.tokenizer import Tokenizer, decoder_start_id, identity_of
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


def supervised_file(cfg: Config, root: Path) -> tuple[Path, set[int]]:
    """The JSONL file of a supervised source and the 0-based numbers of its validation lines:
    a jsonl: file split by line number, or an embedded instruction set (`instruct`), which is
    written to the cache and split by the files its records are cut from."""
    data = cfg.data
    if data.source.startswith("instruct:"):
        found = instruction_file(data.source, data.val_fraction, root)
        return found.path, found.held_out
    path = jsonl_path(data.source)
    return path, jsonl_held_out_lines(path, data.val_fraction)


def resolve_format(cfg: Config) -> Config:
    """`cfg` with data.format=auto replaced by the supervised format (prompt_completion, chat,
    seq2seq, classify) that the first record of a data.source=jsonl: file implies (then
    validated again: the arch must take it), and with data.labels of a classify source filled.
    Auto stays auto where it means text, so it is what a run's config.yaml records."""
    data = cfg.data
    if data.source.startswith("instruct:") and data.format == "auto":  # an instruction set's records are of one format
        settings = cfg.to_dict()
        settings["data"]["format"] = instruct_format(data.source) or "chat"  # (unknown: said when it is opened)
        return validate(settings)
    if data.task or not data.source.startswith("jsonl:") or data.format not in ("auto", "classify"):
        return cfg
    if data.format == "auto" and not Path(data.source.removeprefix("jsonl:")).expanduser().is_file():
        return cfg  # a directory or glob of JSONL files is a text corpus (or missing: said there)
    path = jsonl_path(data.source)
    found = data.format if data.format != "auto" else detect_format(first_line(path), data.text_field)
    settings = cfg.to_dict()
    settings["data"]["format"] = "text" if found not in SUPERVISED_FORMATS else found
    if found == "classify" and not data.labels:
        settings["data"]["labels"] = training_labels(path, data.text_field, data.val_fraction)
    try:
        resolved = validate(settings)
    except UserError as exc:
        if data.format != "auto":
            raise
        raise UserError(f"{exc} (data.format=auto found {found} records in {path}"
                        f"{'' if found == 'text' else '; data.format=text reads them as text'})") from None
    return cfg if found not in SUPERVISED_FORMATS else resolved


def training_labels(path: Path, text_field: str, val_fraction: float) -> list:
    """The distinct labels of the training split's good records, sorted (`task_formats.sorted_labels`);
    bad records are left to the build, which reports or skips them."""
    held_out = jsonl_held_out_lines(path, val_fraction)
    labels = set()
    for i, line in jsonl_lines(path):
        if i not in held_out:
            try:
                labels.add(classify_record(line, text_field)[1])
            except BadRecord:
                continue
    if len(labels) < 2:
        raise UserError(f"{path}: data.format=classify needs at least two labels in the training split, found "
                        f"{sorted_labels(labels) or 'none'}")
    return sorted_labels(labels)


def supervised_rows(cfg: Config, tokenizer: Tokenizer,
                    root: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(training rows, validation rows, validation kinds): rows int32 [N, width], memory-mapped;
    the width is the objective's `row_width` (2 * seq_len + 1, packed 3 * seq_len + 2; src_len +
    seq_len + 1 for seq2seq; seq_len + 1 for classify; 4 * (seq_len + 1) for preference
    pairs). The kinds are each validation example's record's `kind` (text), in file order
    (packed rows hold them in that order too), or None when no record has one."""
    data = cfg.data
    path, held_out = supervised_file(cfg, root)
    key = content_key({"file": jsonl_fingerprint(path), "tokenizer": identity_of(tokenizer), "format": data.format,
                       **_row_settings(cfg), **_template_settings(cfg, tokenizer),
                       "seq_len": cfg.train.seq_len, "val_fraction": data.val_fraction,
                       "skip_bad_records": data.skip_bad_records, "template": TEMPLATE_VERSION,
                       "cache_format": CACHE_FORMAT_VERSION, "kinds": True})
    folder = root / "sft"
    meta_path = folder / f"{key}.json"

    def build() -> None:
        rows, meta = _build(cfg, tokenizer, path, held_out)
        for split in SPLITS:
            save_npy_atomic(folder / f"{key}.{split}.npy", rows[split])
        write_json_atomic(meta_path, meta)

    meta = build_once(meta_path, build)
    skipped = f"; {meta['bad']} bad records skipped ({'; '.join(meta['bad_quoted'])})" if meta["bad"] else ""
    scored = f"{meta['scored']} scored tokens" if data.format != "classify" else (
        f"{len(data.labels)} labels ({', '.join(map(str, data.labels[:8]))}{', ...' if len(data.labels) > 8 else ''})")
    packed = f", packed into {meta['rows']['train']} and {meta['rows']['validation']} rows" if "rows" in meta else ""
    shown = data.source if data.source.startswith("instruct:") else path
    log(f"{shown} ({data.format}): {meta['train']} training and {meta['validation']} validation examples{packed}, "
        f"{scored}{skipped}")
    # (allow_pickle=False, numpy's default, said aloud: a cache directory may be shared, and rows are ints)
    train, val = (np.load(folder / f"{key}.{split}.npy", mmap_mode="r", allow_pickle=False) for split in SPLITS)
    return train, val, meta.get("validation_kinds")


def _row_settings(cfg: Config) -> dict:
    """The settings besides the file, tokenizer and seq_len that decide a format's rows."""
    if cfg.data.format == "seq2seq":
        return {"src_len": cfg.train.src_len}
    if cfg.data.format == "classify":
        return {"text_field": cfg.data.text_field, "labels": cfg.data.labels}
    if cfg.data.format == "preference":
        return {}  # (only completions are scored: train.loss_on does not apply)
    # (packing only when on: the keys of unpacked rows cached before it existed stay valid; its
    # value names the packed layout, rows with segment ids)
    return {"loss_on": cfg.train.loss_on, **({"packing": "segment_ids"} if cfg.train.packing else {})}


def pack_examples(rows: np.ndarray, seq_len: int, eos_id: int) -> np.ndarray:
    """Masked rows of one example each ([N, 2T + 1], `formats.encode_example`) packed several to
    a row [M, 3T + 2] (`formats.packed_row_width`): next fit in the given order, so the result
    depends on the rows alone. An example ends at its last scored target (the EOS of its
    completion or last assistant turn), so its length is that target's index + 2; unscored tokens
    after it (a trailing user turn) are left out. Its weights move with its tokens, and its tokens
    get the row's next segment id (1, 2, ...), which is what keeps it apart: a chat's EOS inside
    the conversation does not split it. The rest of a row is EOS of segment 0 with weight 0."""
    T = seq_len
    weights = rows[:, T + 1:]
    lengths = T - np.argmax(weights[:, ::-1] > 0, axis=1) + 1  # last scored target j: length j + 2
    packed: list[np.ndarray] = []
    row, used, segment = None, T + 1, 0
    for example, length in zip(rows, lengths):
        if used + length > T + 1:
            row = np.zeros(packed_row_width(T), np.int32)
            row[:T + 1] = eos_id
            packed.append(row)
            used, segment = 0, 0
        segment += 1
        row[used:used + length] = example[:length]
        row[T + 1 + used:T + used + length] = example[T + 1:T + length]
        row[2 * T + 1 + used:2 * T + 1 + used + length] = segment
        used += length
    return np.stack(packed) if packed else np.zeros((0, packed_row_width(T)), np.int32)


def unpacked_examples(row: np.ndarray, seq_len: int, eos_id: int) -> list[np.ndarray]:
    """The examples of one packed row (`pack_examples`), each as its own row [2T + 1] again (up to
    the tokens `pack_examples` leaves out after an example's last scored target)."""
    T = seq_len
    segments = row[2 * T + 1:]
    examples = []
    for segment in range(1, int(segments.max(initial=0)) + 1):
        where = np.flatnonzero(segments == segment)
        if not len(where):
            continue
        start, length = int(where[0]), len(where)
        example = np.zeros(2 * T + 1, np.int32)
        example[:T + 1] = eos_id
        example[:length] = row[start:start + length]
        example[T + 1:T + length] = row[T + 1 + start:T + start + length]
        examples.append(example)
    return examples


def _template_settings(cfg: Config, tokenizer: Tokenizer) -> dict:
    """A chat's template (the tokenizer's own or the built-in): a changed template re-tokenises."""
    chats = cfg.data.format in ("chat", "preference")  # (preference records may be chats)
    return {"chat_template": chat_template_of(tokenizer).fingerprint} if chats else {}


def row_encoder(cfg: Config, tokenizer: Tokenizer) -> Callable[[str], np.ndarray]:
    """line -> the format's row (raises BadRecord)."""
    encode, eos, seq_len = tokenizer.encode, tokenizer.eos_id, cfg.train.seq_len
    fmt = cfg.data.format
    if fmt == "seq2seq":
        start = decoder_start_id(eos, getattr(tokenizer, "token_id", None))
        return lambda line: encode_seq2seq_line(line, encode, cfg.train.src_len, seq_len, eos, start)
    if fmt == "classify":
        index = {label: i for i, label in enumerate(cfg.data.labels)}
        return lambda line: encode_classify_line(line, cfg.data.text_field, index, encode, seq_len, eos)
    template = chat_template_of(tokenizer)
    if fmt == "preference":
        return lambda line: encode_preference(line, encode, eos, seq_len, template)
    return lambda line: encode_example(line, fmt, encode, eos, cfg.train.loss_on, seq_len, template)


def record_kind(line: str) -> str | None:
    """A good record's `kind` field as text (the task kind of an instruction set), else None."""
    kind = parse_record(line).get("kind")
    return None if kind is None else str(kind)


def _build(cfg: Config, tokenizer: Tokenizer, path: Path,
           held_out: set[int]) -> tuple[dict[str, np.ndarray], dict]:
    fmt = cfg.data.format
    encode_line = row_encoder(cfg, tokenizer)
    rows: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    val_kinds: list[str | None] = []
    bad: list[str] = []
    for i, line in jsonl_lines(path):
        try:
            row = encode_line(line)
        except BadRecord as exc:
            if not cfg.data.skip_bad_records:
                raise UserError(f"{path}:{i + 1}: {exc} (data.skip_bad_records=true skips such records)") from None
            bad.append(f"line {i + 1}: {exc}")
            continue
        except UserError as exc:  # the chat template cannot mask this conversation
            raise UserError(f"{path}:{i + 1}: {exc}") from None
        rows["validation" if i in held_out else "train"].append(row)
        if i in held_out:
            val_kinds.append(record_kind(line))
    for split in SPLITS:
        if not rows[split]:
            raise UserError(f"{path}: no {split} examples left ({sum(map(len, rows.values()))} good and {len(bad)} "
                            f"bad records); a run needs at least one on each side: add records or change "
                            f"data.val_fraction={cfg.data.val_fraction}")
    arrays = {split: np.stack(rows[split]) for split in SPLITS}
    meta = {split: len(arrays[split]) for split in SPLITS}
    if cfg.train.packing and fmt in ("prompt_completion", "chat"):
        arrays = {split: pack_examples(a, cfg.train.seq_len, tokenizer.eos_id) for split, a in arrays.items()}
        meta["rows"] = {split: len(arrays[split]) for split in SPLITS}
    meta.update(bad=len(bad), bad_quoted=bad[:_QUOTED_BAD], format=fmt, source=str(path),
                scored=sum(_scored(a, cfg) for a in arrays.values()),
                validation_kinds=[k or "" for k in val_kinds] if any(val_kinds) else None)
    return arrays, meta


def _scored(rows: np.ndarray, cfg: Config) -> int:
    if cfg.data.format in ("seq2seq", "classify"):
        return scored_targets(rows, cfg.data.format, cfg.train.src_len)
    if cfg.data.format == "preference":
        _, chosen_mask, _, rejected_mask = split_rows(rows)
        return int(chosen_mask.sum() + rejected_mask.sum())
    T = cfg.train.seq_len
    return int(rows[:, T + 1:2 * T + 1].sum())  # the weights (then a packed row's segment ids)
