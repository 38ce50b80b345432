"""Deterministic train/validation splits and byte caps, shared by every source.

Three rules:

- Several documents (files of a directory or glob, JSONL lines, TFDS examples): a document goes
  to validation when a hash of its name (path, line index, example index) falls below
  `val_fraction`. Adding documents never moves existing ones between splits, unlike a split by
  position.
- Documents in groups (the stdlib files of each package a supervised task labels): the same
  hash, but ranked within each group, so every group gives about `val_fraction` of its bytes
  to validation, at least one document (`stratified_validation_mask`).
- One text file: split by position, as nanoGPT's `prepare.py` does. The first
  (1 - val_fraction) of its characters (cut at the next line boundary) are the training split,
  the rest is validation (`tail_split`). Each split is one continuous text; it is handed to the
  tokenizer in line chunks (`line_chunks`) that are joined without end-of-document tokens.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator, Sequence

import numpy as np

CHUNK_BYTES = 64 * 1024


def name_hash(name: str) -> float:
    """A stable hash of `name` in [0, 1) (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def validation_mask(names: Sequence[str], val_fraction: float) -> list[bool]:
    """True for the names that belong to the validation split.

    A small corpus can hash every document to one side; then the lowest-hash document goes to
    validation (or the highest back to train), so both splits are non-empty when there are at
    least two documents. Large corpora never hit this, so it does not disturb stability there.
    """
    return streamed_validation_mask(names, val_fraction).tolist()


def streamed_validation_mask(names: Iterable[str], val_fraction: float) -> np.ndarray:
    """`validation_mask` of names given one at a time, as a bool array: keeps 8 bytes per name
    (its hash) instead of the names, for sources of many millions of rows."""
    hashes = np.fromiter((name_hash(n) for n in names), dtype=np.float64)
    mask = hashes < val_fraction
    if len(hashes) >= 2 and not mask.any():
        mask[np.argmin(hashes)] = True  # the first of equal hashes, as min() takes
    if len(hashes) >= 2 and mask.all():
        mask[np.argmax(hashes)] = False
    return mask


def stratified_validation_mask(
    names: Sequence[str], groups: Sequence[Hashable], sizes: Sequence[int], val_fraction: float
) -> list[bool]:
    """True for the names that belong to the validation split, drawn from every group alike.

    In each group, names are taken in `name_hash` order (ties by name) while each one brings the
    group's validation size closer to val_fraction of the group's total size: at least one name,
    never all of them (a group of one stays in training, where it can at least be learnt).
    Sizes are bytes, so each group holds out about val_fraction of its text whatever its file
    sizes; a prefix of the hash order, so no bias towards small files.

    For a supervised task whose labels are groups of files (the stdlib packages), a plain hash
    threshold leaves small groups out of validation by chance; this keeps every label in both
    splits with about the training split's label mix. A pure function of (name, group, size).
    """
    if not len(names) == len(groups) == len(sizes):
        raise ValueError(f"{len(names)} names, {len(groups)} groups and {len(sizes)} sizes")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    mask = [False] * len(names)
    for indices in members.values():
        target = val_fraction * sum(sizes[i] for i in indices)
        held = 0
        ranked = sorted(indices, key=lambda i: (name_hash(names[i]), names[i]))
        for taken, index in enumerate(ranked[:-1]):
            if taken and abs(held + sizes[index] - target) > abs(held - target):
                break
            mask[index] = True
            held += sizes[index]
    return mask


def tail_split(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation) of one text: validation is its tail, from the first line start at
    or after character int(len(text) * (1 - val_fraction)); train + validation == text.

    If no line break follows that point (a file of one long line, say), the cut is at that
    character itself, so the validation split is not empty.
    """
    point = int(len(text) * (1.0 - val_fraction))
    if point <= 0:
        return "", text
    newline = text.find("\n", point - 1)  # text[point - 1] == "\n": point is a line start
    cut = newline + 1 if 0 <= newline < len(text) - 1 else point
    return text[:cut], text[cut:]


def line_chunks(text: str, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Whole lines grouped into chunks of about `chunk_bytes` characters; "".join(chunks) == text.
    Lets one big text be capped and tokenised piecewise instead of as one huge string."""
    chunks, group, size = [], [], 0
    for line in text.splitlines(keepends=True):
        group.append(line)
        size += len(line)
        if size >= chunk_bytes:
            chunks.append("".join(group))
            group, size = [], 0
    if group:
        chunks.append("".join(group))
    return chunks


def cap_bytes(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Whole documents, in order, while they fit in `max_bytes` UTF-8 bytes (0: no cap).

    A document that does not fit is skipped and later smaller ones may still be taken, so one
    early large file does not starve the split. If not even the first document fits, its
    first `max_bytes` bytes are taken (cut at a character boundary) so the split is not empty.
    """
    if max_bytes <= 0:
        yield from docs
        return
    used = 0
    for doc in docs:
        size = len(doc.encode("utf-8"))
        if used + size <= max_bytes:
            used += size
            yield doc
        elif used == 0:
            used = max_bytes
            yield doc.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        if used >= max_bytes:
            return


def cap_prefix(pieces: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The first `max_bytes` UTF-8 bytes of the text that `pieces` join into (0: no cap), as
    pieces, the last one cut at a character boundary: for consecutive pieces of one text, where
    skipping a piece (as `cap_bytes` does with documents) would glue unrelated text together.
    """
    if max_bytes <= 0:
        yield from pieces
        return
    used = 0
    for piece in pieces:
        raw = piece.encode("utf-8")
        if used + len(raw) <= max_bytes:
            used += len(raw)
            yield piece
        else:
            yield raw[: max_bytes - used].decode("utf-8", errors="ignore")
            return
        if used >= max_bytes:
            return
