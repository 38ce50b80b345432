"""Tokenizers: raw UTF-8 bytes, a sentencepiece BPE trained on the corpus, or a HF tokenizer.json.

All three share one small protocol. `decode` never raises: sampled ids can be padding rows
(the model pads the vocabulary) or stop mid-character, and a sample printout must not crash.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from llm_jax.data.cache import file_sha256, write_bytes_atomic
from llm_jax.data.chat_template import read_chat_template
from llm_jax.errors import UserError


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def identity_of(tokenizer: Tokenizer) -> dict[str, Any]:
    """What makes cached token ids valid: the tokenizer's kind and, for trained/loaded models,
    the hash of the model file."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    return fingerprint if fingerprint is not None else {"name": tokenizer.name}


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; 256 is end-of-document."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    fingerprint = {"name": "byte"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        raw = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return raw.decode("utf-8", errors="replace")

    def encode_documents(self, docs: Sequence[str]) -> np.ndarray:
        """All docs, each followed by EOS, as one uint16 array; vectorised (tens of MB in ~1 s)."""
        encoded = [d.encode("utf-8") for d in docs]
        # Filled in place: joining the bytes and inserting the EOS ids would copy the group twice
        # more, and a group's copies are the peak memory of tokenising (see data/store.py).
        tokens = np.empty(sum(len(b) for b in encoded) + len(encoded), np.uint16)
        position = 0
        for raw in encoded:
            tokens[position : position + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            tokens[position + len(raw)] = self.eos_id
            position += len(raw) + 1
        return tokens


class SentencePieceTokenizer:
    """A sentencepiece model (BPE with byte fallback, so any text encodes without <unk>)."""

    name = "sentencepiece"

    def __init__(self, model_path: Path):
        import sentencepiece  # only the sentencepiece tokenizer needs it

        self._path = Path(model_path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise UserError(f"sentencepiece model {model_path} has no EOS piece")
        self.fingerprint = {"name": self.name, "sha256": file_sha256(model_path)}
        self.threads = os.cpu_count() or 1
        """Encoding threads of `encode_documents`; a tokenising worker process uses one."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its model file's path (tokenising worker processes reload it there); the
        # processor itself does not pickle.
        return (type(self), (self._path,))

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def encode_documents(self, docs: Sequence[str]) -> np.ndarray:
        pieces = self._sp.encode(list(docs), num_threads=self.threads)
        return _join_with_eos(pieces, self.eos_id)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; EOS is the first common end marker present.

    `chat_template` is the Jinja template of the tokenizer_config.json beside the file, if any
    (`data/chat_template.py`); chats use the built-in template otherwise."""

    name = "hf"
    EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")

    def __init__(self, path: Path):
        import tokenizers  # only a Hugging Face tokenizer.json needs it

        self._path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises bare Exceptions on malformed files
            raise UserError(f"cannot load tokenizer {path}: {exc}".replace("\n", " ")) from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        found = [self._tok.token_to_id(t) for t in self.EOS_CANDIDATES]
        found = [i for i in found if i is not None]
        if not found:
            raise UserError(
                f"tokenizer {path} has none of the end-of-text tokens {', '.join(self.EOS_CANDIDATES)}"
            )
        self.eos_id = int(found[0])
        self.fingerprint = {"name": self.name, "sha256": file_sha256(path)}
        self.chat_template = read_chat_template(self._path)
        # Added tokens (specials such as <|im_end|>): a chat's end of turn is one of them.
        self.added_ids = frozenset(int(i) for i in self._tok.get_added_tokens_decoder())

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._path,))  # as SentencePieceTokenizer: reloaded from its file

    def token_id(self, token: str) -> int | None:
        """The id of a token (e.g. BERT's "[MASK]"), or None when the vocabulary lacks it."""
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(kept, skip_special_tokens=False)

    def encode_documents(self, docs: Sequence[str]) -> np.ndarray:
        encodings = self._tok.encode_batch(list(docs), add_special_tokens=False)
        return _join_with_eos([e.ids for e in encodings], self.eos_id)


def decoder_start_id(eos_id: int, lookup: Callable[[str], int | None] | None = None) -> int:
    """The encoder-decoders' first decoder input: `<pad>` where the tokenizer has it (T5's
    convention; `lookup` is its `token_id`), else end-of-text (which also separates documents)."""
    pad = lookup("<pad>") if lookup is not None else None
    return int(eos_id if pad is None else pad)


def _join_with_eos(pieces: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    lengths = [len(p) for p in pieces]
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=sum(lengths))
    return np.insert(flat, np.cumsum(lengths, dtype=np.int64), eos_id)


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """Token ids of `docs`, an EOS after each; uses a tokenizer's batched path when it has one."""
    batched = getattr(tokenizer, "encode_documents", None)
    if batched is not None:
        return batched(docs)
    return _join_with_eos([tokenizer.encode(d) for d in docs], tokenizer.eos_id)


# Sentencepiece sees "sentences"; feeding groups of whole lines (newlines kept) lets it learn
# pieces such as "):\n" and indentation runs, which line-by-line training would never see.
SP_SENTENCE_BYTES = 4000
SP_MAX_TRAIN_BYTES = 20_000_000


def _training_sentences(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    total = 0
    for doc in docs:
        group: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            group.append(line)
            size += len(line)
            if size >= SP_SENTENCE_BYTES:
                yield "".join(group)
                total += size
                group, size = [], 0
                if total >= max_bytes:
                    return
        if group:
            yield "".join(group)
            total += size
        if total >= max_bytes:
            return


def train_sentencepiece(docs: Iterable[str], vocab_size: int, out_path: Path) -> None:
    """Train a BPE model on (at most SP_MAX_TRAIN_BYTES of) `docs`, write it to `out_path`.

    Normalisation is off and whitespace is kept verbatim so decode(encode(x)) == x for source
    code (the defaults collapse runs of spaces, destroying indentation)."""
    import sentencepiece  # only training a sentencepiece model needs it

    if vocab_size < 512:
        raise UserError(
            f"data.sp_vocab_size={vocab_size} is too small: byte fallback alone takes 259 ids; use >= 512"
        )
    sentencepiece.set_random_generator_seed(0)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(docs, SP_MAX_TRAIN_BYTES),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9999,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=4 * SP_SENTENCE_BYTES,
            # A small corpus may not support the requested size: take what it supports.
            hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise UserError(f"sentencepiece training failed: {exc}".replace("\n", " ")) from None
    write_bytes_atomic(out_path, model.getvalue())
