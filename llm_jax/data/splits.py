"""Deterministic train/validation splits and byte caps, shared by every source.

A document goes to validation when a hash of its name (path, line index, chunk index) falls
below `val_fraction`: adding documents never moves existing ones between splits, unlike a
split by position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

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
    hashes = [name_hash(n) for n in names]
    mask = [h < val_fraction for h in hashes]
    if len(names) >= 2 and not any(mask):
        mask[min(range(len(names)), key=hashes.__getitem__)] = True
    if len(names) >= 2 and all(mask):
        mask[max(range(len(names)), key=hashes.__getitem__)] = False
    return mask


def line_chunks(text: str, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Whole lines grouped into chunks of about `chunk_bytes` characters: one big file still gets
    a validation split when its chunks are split by hash of their index."""
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
