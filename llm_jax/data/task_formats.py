"""JSONL records of the task kinds (data.format seq2seq, classify) as the built-in tasks' rows.

seq2seq: {"source": str, "target": str}, neither empty. The row is `tasks.encode_seq2seq_rows`'s:
the source cut to train.src_len - 1 tokens and end-of-text, then the decoder's start id, the
target and end-of-text in train.seq_len + 1 slots. A target longer than train.seq_len - 1 tokens
is a bad record (the tasks drop such examples: a cut target is a wrong answer).

classify: {TEXT_FIELD: str, "label": str | int}, text not empty. The row is
`tasks.encode_classify_rows`'s: the text cut to train.seq_len - 1 tokens and end-of-text, then
the label's index in data.labels. The labels are the training split's distinct labels, sorted
(integers before strings), unless data.labels names them; a label outside them is a bad record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from llm_jax.data.formats import BadRecord, parse_record, string_field
from llm_jax.data.tasks import PAD, Example, encode_classify_rows, encode_seq2seq_rows

Label = str | int
Encode = Callable[[str], list[int]]


def _non_empty(record: dict, name: str) -> str:
    value = string_field(record, name)
    if not value:
        raise BadRecord(f"empty {name}")
    return value


def seq2seq_example(line: str) -> Example:
    record = parse_record(line)
    return Example(source=_non_empty(record, "source"), target=_non_empty(record, "target"))


def classify_record(line: str, text_field: str) -> tuple[str, Label]:
    """(text, label) of one line."""
    record = parse_record(line)
    text = _non_empty(record, text_field)
    if "label" not in record:
        raise BadRecord("no field 'label'")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, str | int):  # JSON true is a Python int
        raise BadRecord(f"field 'label' is {type(label).__name__}, not text or an integer")
    return text, label


def sorted_labels(labels: Iterable[Label]) -> list[Label]:
    """Distinct labels in a fixed order: integers by value, then strings (so 2 comes before 10)."""
    return sorted(set(labels), key=lambda label: (isinstance(label, str), label))


def encode_seq2seq_line(line: str, encode: Encode, src_len: int, tgt_len: int, eos_id: int,
                        start_id: int) -> np.ndarray:
    """One row of width src_len + tgt_len + 1 (`tasks.encode_seq2seq_rows`)."""
    example = seq2seq_example(line)
    rows, dropped = encode_seq2seq_rows([example], encode, src_len, tgt_len, eos_id, start_id)
    if dropped:
        raise BadRecord(f"target of {len(encode(example.target))} tokens, longer than train.seq_len-1={tgt_len - 1} "
                        "(the decoder's start id and end-of-text take the other slots)")
    return rows[0]


def encode_classify_line(line: str, text_field: str, label_index: dict[Label, int], encode: Encode, text_len: int,
                         eos_id: int) -> np.ndarray:
    """One row of width text_len + 1 (`tasks.encode_classify_rows`); `label_index` maps each of
    data.labels to its class."""
    text, label = classify_record(line, text_field)
    if label not in label_index:  # (1 and "1" are different labels)
        known = ", ".join(map(repr, label_index)) if len(label_index) <= 8 else f"{len(label_index)} labels"
        raise BadRecord(f"label {label!r} is not one of the training split's labels (data.labels: {known})")
    return encode_classify_rows([Example(source=text, label=label_index[label])], encode, text_len, eos_id)[0]


def scored_targets(rows: np.ndarray, fmt: str, src_len: int) -> int:
    """Targets the loss counts: target tokens and end-of-text (seq2seq), or one label a row."""
    return int((rows[:, src_len + 1:] != PAD).sum()) if fmt == "seq2seq" else len(rows)
