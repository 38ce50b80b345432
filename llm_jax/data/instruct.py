"""The embedded instruction sets: `data.source=instruct:stdlib`, cut from the standard library's
source, and `instruct:arith`, the arithmetic problems of `arith` as prompt_completion records
(`arith_file`; its split is the task's own, docs/alignment.md).

Chat records, one task kind each, with short answers so that a small model can learn them:

    {"messages": [{"role": "user", "content": "Name this function:\\n..."},
                  {"role": "assistant", "content": "parse_args"}],
     "kind": "name_function", "source": "argparse.py"}

Kinds (the parsing is `tasks`'s, which the `funcname`, `docsig` and `package` tasks use too):

- `name_function`: a function's body (docstring removed, its name hidden as `<?>`) -> its name.
  Dunder methods and bodies with little code are skipped, as in `funcname`.
- `signature_from_docstring`: a function's docstring (its first paragraph) -> its `def` line
  without annotations, `def name(a, b=1):` (`tasks.signature`).
- `module_of`: a chunk of whole lines (every `MODULE_CHUNK_STRIDE`-th) of a file of one of
  `tasks.PACKAGE_LABELS` -> the package.

Both function kinds skip the test suite (files under a `test`, `tests` or `idle_test` folder):
two thirds of the short functions are its `test_...` methods, whose names the body hardly
decides (`test___repr__nondefault_limit`), and they would swamp the library's own functions.

Only examples whose prompt and answer are short (`MAX_PROMPT_BYTES`, `MAX_ANSWER_BYTES`) are
kept: with the chat template's headers, each fits a 256-token byte-level row.

Split, by file, so no text of a held-out example is trained on: a file is held out when the
stdlib corpus holds it out (by path hash, `data.val_fraction`: the split of a model pretrained
on `data.source=stdlib` with the same fraction) or when `module_of` holds it out (whole files
making up about `data.val_fraction` of each package's bytes, as the `package` task does, so
every package is asked about). All of a file's records go to its split, except that the
function kinds drop the records of files held out only for `module_of`: so `name_function` and
`signature_from_docstring` are asked about files the pretrained model never read, while some
`module_of` snippets come from files it may have read as text (never with their answer).

Within a split, the kinds take turns (each kind's records in the order of a hash of their text),
so the first N validation records (what `train.eval_exact_match` generates for) hold the kinds
alike. The records
are written once to `<cache>/instruct/<key>.jsonl` (training records first, then validation
ones) and read from there as any chat JSONL file (`sft_rows`).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llm_jax.config.schema import INSTRUCT_FORMATS
from llm_jax.data import arith, stdlib_tfds
from llm_jax.data.cache import build_once, content_key, log, write_bytes_atomic, write_json_atomic
from llm_jax.data.splits import stratified_validation_mask
from llm_jax.data.tasks import (
    MIN_BODY_CHARS,
    PACKAGE_LABELS,
    TEST_DIRS,
    body_text,
    hide_name,
    is_dunder,
    line_groups,
    outer_functions,
    package_label,
    parse_module,
    preamble_end,
    signature,
    source_lines,
)
from llm_jax.errors import UserError

INSTRUCT_SOURCES = tuple(INSTRUCT_FORMATS)
# instruct:arith: the training and validation problems written (seed 0 of `arith.problems`).
ARITH_TRAIN = 8000
ARITH_VALIDATION = 800
KINDS = ("name_function", "signature_from_docstring", "module_of")
# Bump when the records cut from the same files, or their split, change.
INSTRUCT_VERSION = 2  # 2: no function records from the test suite
MAX_PROMPT_BYTES = 150  # the question's payload (body, docstring, snippet), UTF-8
MAX_ANSWER_BYTES = 40
MODULE_CHUNK_BYTES = 140
MIN_MODULE_CHUNK_BYTES = 60
# Every this many-th chunk of a package file: all of them would outnumber the other kinds four to one.
MODULE_CHUNK_STRIDE = 4

QUESTIONS = {
    "name_function": "Name this function:\n",
    "signature_from_docstring": "Write the def line for this docstring:\n",
    "module_of": "Which stdlib package is this from?\n",
}


@dataclass(frozen=True)
class InstructFile:
    path: Path
    held_out: set[int]
    """0-based line numbers of the validation records."""


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def record(kind: str, payload: str, answer: str, path: str) -> dict:
    return {"messages": [{"role": "user", "content": QUESTIONS[kind] + payload},
                         {"role": "assistant", "content": answer}],
            "kind": kind, "source": path}


def _fits(payload: str, answer: str) -> bool:
    return 0 < _size(payload) <= MAX_PROMPT_BYTES and 0 < _size(answer) <= MAX_ANSWER_BYTES


def is_test_file(path: str) -> bool:
    return bool(TEST_DIRS.intersection(PurePosixPath(path).parts[:-1]))


def function_records(path: str, text: str) -> Iterator[dict]:
    """`name_function` and `signature_from_docstring` records of one file, in source order
    (none for the test suite's files: see the module docstring)."""
    module = parse_module(text)
    if module is None or is_test_file(path):
        return
    lines = source_lines(text)
    for func in outer_functions(module):
        if not is_dunder(func.name):
            body = body_text(func, lines)
            if len("".join(body.split())) >= MIN_BODY_CHARS:
                masked = hide_name(body, func.name)
                if _fits(masked, func.name):
                    yield record("name_function", masked, func.name, path)
        docstring = ast.get_docstring(func, clean=True)
        if docstring:
            first_paragraph = docstring.split("\n\n")[0].strip()
            def_line = f"def {signature(func)}:"
            if _fits(first_paragraph, def_line):
                yield record("signature_from_docstring", first_paragraph, def_line, path)


def module_records(path: str, text: str) -> Iterator[dict]:
    """`module_of` records of one file of a package in PACKAGE_LABELS (none for other files)."""
    label = package_label(path)
    if label is None:
        return
    lines = source_lines(text)
    chunks = list(line_groups(lines[preamble_end(text, lines):], MODULE_CHUNK_BYTES))
    for chunk in chunks[::MODULE_CHUNK_STRIDE]:
        if MIN_MODULE_CHUNK_BYTES <= _size(chunk) <= MAX_PROMPT_BYTES:
            yield record("module_of", chunk, PACKAGE_LABELS[label], path)


def _order(records: list[dict]) -> list[dict]:
    """Each kind's records in the order of a hash of their text, then the kinds taken in turn
    (while each lasts): deterministic, and any first N records hold the kinds alike."""
    def key(rec: dict) -> str:
        return hashlib.sha256(json.dumps(rec, sort_keys=True).encode("utf-8")).hexdigest()
    by_kind = [sorted((r for r in records if r["kind"] == kind), key=key) for kind in KINDS]
    return [r for turn in itertools.zip_longest(*by_kind) for r in turn if r is not None]


def instruction_records(files: Iterable[tuple[str, str, str]],
                        package_held_out: set[str]) -> dict[str, list[dict]]:
    """{"train": [...], "validation": [...]} from (path, text, corpus split) triples; a package
    file's `module_of` records go where `package_held_out` says (see the module docstring)."""
    split: dict[str, list[dict]] = {"train": [], "validation": []}
    for path, text, corpus_split in files:
        held_out = corpus_split == "validation" or path in package_held_out
        records = split["validation" if held_out else "train"]
        if held_out == (corpus_split == "validation"):  # (not a file the pretraining split read)
            records.extend(function_records(path, text))
        records.extend(module_records(path, text))
    return {name: _order(records) for name, records in split.items()}


def package_held_out_files(files: list[tuple[str, str, str]], val_fraction: float) -> set[str]:
    """The package files whose `module_of` records are held out: about val_fraction of each
    package's bytes, at least one file each (`splits.stratified_validation_mask`)."""
    grouped = [(path, group, _size(text)) for path, text, _ in files if (group := package_label(path)) is not None]
    if not grouped:
        return set()
    mask = stratified_validation_mask(*zip(*grouped), val_fraction)
    return {path for (path, _, _), held in zip(grouped, mask, strict=True) if held}


def instruct_name(source: str) -> str:
    """The set named by data.source=instruct:NAME, checked."""
    name = source.removeprefix("instruct:")
    if name not in INSTRUCT_SOURCES:
        raise UserError(f"unknown instruction set in data.source '{source}'; known: "
                        f"{', '.join('instruct:' + s for s in INSTRUCT_SOURCES)}")
    return name


def instruction_file(source: str, val_fraction: float, cache_root: Path) -> InstructFile:
    """The set's JSONL file in the cache (written on first use) and its validation lines."""
    if instruct_name(source) == "arith":
        return arith_file(cache_root)
    key = content_key({"set": source, "python": sys.version, "version": INSTRUCT_VERSION,
                       "limits": [MAX_PROMPT_BYTES, MAX_ANSWER_BYTES, MODULE_CHUNK_BYTES, MODULE_CHUNK_STRIDE],
                       "stdlib": str(Path(sysconfig.get_paths()["stdlib"]).resolve()),
                       "layout": stdlib_tfds.STDLIB_LAYOUT_VERSION, "val_fraction": val_fraction})
    folder = cache_root / "instruct"
    path, meta_path = folder / f"{key}.jsonl", folder / f"{key}.json"

    def build() -> None:
        log(f"building the {source} instruction set from the stdlib files...")
        builder = stdlib_tfds.prepared_builder(cache_root / "tfds", val_fraction)
        files = [(p, text, split) for split in ("train", "validation")
                 for p, text in stdlib_tfds.stdlib_documents(builder, split)]
        records = instruction_records(files, package_held_out_files(files, val_fraction))
        lines = [json.dumps(r, ensure_ascii=False) for split in ("train", "validation") for r in records[split]]
        write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
        counts = {split: {kind: sum(r["kind"] == kind for r in records[split]) for kind in KINDS}
                  for split in records}
        write_json_atomic(meta_path, {"train": len(records["train"]), "validation": len(records["validation"]),
                                      "kinds": counts})

    meta = build_once(meta_path, build)
    return InstructFile(path, set(range(meta["train"], meta["train"] + meta["validation"])))


def arith_file(cache_root: Path) -> InstructFile:
    """instruct:arith: ARITH_TRAIN training problems, then ARITH_VALIDATION validation ones, as
    prompt_completion records with their `kind` (add, sub), in the cache. The split is the
    task's (`arith.split_of`), so data.val_fraction does not change it."""
    key = content_key({"set": "instruct:arith", "version": arith.ARITH_VERSION,
                       "counts": [ARITH_TRAIN, ARITH_VALIDATION]})
    folder = cache_root / "instruct"
    path, meta_path = folder / f"{key}.jsonl", folder / f"{key}.json"

    def build() -> None:
        records = {split: [arith.record(p) for p in arith.problems(split, count)]
                   for split, count in (("train", ARITH_TRAIN), ("validation", ARITH_VALIDATION))}
        lines = [json.dumps(r) for split in ("train", "validation") for r in records[split]]
        write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
        write_json_atomic(meta_path, {split: len(records[split]) for split in records})

    meta = build_once(meta_path, build)
    return InstructFile(path, set(range(meta["train"], meta["train"] + meta["validation"])))
