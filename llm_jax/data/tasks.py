"""Supervised tasks cut from Python source files, for encoder-decoder and classification models.

The documents are `(relative_path, text)` pairs: normally the standard library's `.py` files
(`stdlib_tfds.stdlib_documents`), but any iterable works, which is what the tests use.

    for example in task_examples("funcname", documents): ...
    rows, dropped = encode_seq2seq_rows(examples, tok.encode, src_len, tgt_len, eos, start)
    rows = encode_classify_rows(examples, tok.encode, text_len, eos)

Choices, and why:

- Functions are the `def`/`async def` statements that are not inside another function: module
  level, class level (nested classes included), and under module/class-level `if`/`try`/`with`.
  A function nested in a function is part of its parent's body already.
- `funcname`: the body is the source after the signature, dedented, docstring removed (it
  often says the name outright). Every whole-word occurrence of the name becomes `<?>`:
  recursive calls, `super().name(...)`, error messages. `<?>` has no identifier characters,
  so it is never confused with a real name: `_` is one (gettext, throwaway variables), and
  `<name>` would contain the answer for a function called `name`.
  Skipped: dunder methods (`__init__`, `__repr__`, ... would be a large, easy share of the
  targets) and bodies under `MIN_BODY_CHARS` non-blank characters (`pass`,
  `raise NotImplementedError`: nothing to infer a name from).
- `docsig`: every function with a non-empty docstring, dunders included (`__init__`'s
  docstring describes its arguments). The signature is `ast.unparse` of the arguments with
  annotations dropped (docstrings rarely state types and annotations would dominate the
  length); `self`/`cls` are kept, and defaults are the unparsed AST (`0o777` reads `511`).
- `package`: files directly in one of `PACKAGE_LABELS` (not in a test folder inside it), cut
  into chunks of whole lines of at most `CHUNK_CHARS` characters, after the module docstring
  and the comment header (licence, author lines), which would give the package away or be
  the same in every file. The labels are the eight largest library packages present in
  CPython 3.11 to 3.13: not `test` (about 20 MB, it would swamp the others and holds tests
  of every package), not `encodings` (generated codec tables), not `distutils`/`lib2to3`
  (removed in 3.12/3.13). In-package test folders moved into `test/` in 3.12, so they are
  skipped to keep each label's data alike across versions.
- Files that do not parse (Python 2 samples in the test suite, deliberate syntax errors) give
  no function examples; they are skipped silently.
- No deduplication: identical bodies in different files stay (the train/validation split is
  by file, upstream: the corpus's split by path hash for `funcname`/`docsig`; for `package`,
  whole files making up about `val_fraction` of each package's bytes, see `split_group`).
"""

from __future__ import annotations

import ast
import re
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal, NamedTuple

import numpy as np

from llm_jax.config.schema import TASK_KINDS
from llm_jax.errors import UserError

PAD = -1
NAME_PLACEHOLDER = "<?>"
MIN_BODY_CHARS = 32
CHUNK_CHARS = 512
# A chunk of a few short lines (a file's `if __name__ == "__main__": main()`) says too little.
MIN_CHUNK_CHARS = 64
PACKAGE_LABELS: tuple[str, ...] = (
    "asyncio", "email", "idlelib", "importlib", "multiprocessing", "tkinter", "unittest", "xml",
)
TEST_DIRS = frozenset({"test", "tests", "idle_test"})

TaskKind = Literal["seq2seq", "classify"]
Document = tuple[str, str]


@dataclass(frozen=True)
class Example:
    """One example: `target` is set for seq2seq tasks, `label` for classification tasks."""

    source: str
    target: str | None = None
    label: int | None = None


# ---------------------------------------------------------------------------------------------
# Finding functions


FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def parse_module(text: str) -> ast.Module | None:
    """The module's AST, or None when it does not parse."""
    # Old test files have invalid escapes ("\d"): Python warns about them at parse time, once
    # per file, which would bury real warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(text)
        except (SyntaxError, ValueError, RecursionError):  # ValueError: NUL bytes, on 3.11
            return None


def outer_functions(node: ast.AST) -> Iterator[FunctionNode]:
    """Functions not inside another function, in source order (pre-order walk)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, FunctionNode):
            yield child  # its body is not searched: nested functions belong to it
        elif not isinstance(child, ast.expr):  # statements, `except` and `case` clauses
            yield from outer_functions(child)


def source_lines(text: str) -> list[str]:
    """The text's lines as the parser counts them (str.splitlines would also split at form
    feeds and other separators, shifting every later AST line number)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def code_statements(func: FunctionNode) -> list[ast.stmt]:
    """The body's statements without the docstring."""
    has_docstring = ast.get_docstring(func, clean=False) is not None
    return func.body[1:] if has_docstring else func.body


def body_text(func: FunctionNode, lines: list[str]) -> str:
    """The source of the code statements, from the first one to the function's end, dedented.

    Comments between the signature (or docstring) and the first statement are lost; comments
    inside the body are kept.
    """
    statements = code_statements(func)
    if not statements:
        return ""
    first = statements[0]
    first_line = lines[first.lineno - 1]
    # col_offset counts UTF-8 bytes. In `def f(x): return x` the body shares the signature's
    # line and starts at the offset; on a line of its own, the indentation is kept for dedent.
    prefix = first_line.encode("utf-8")[: first.col_offset].decode("utf-8", errors="replace")
    if prefix.strip():
        first_line = first_line.encode("utf-8")[first.col_offset :].decode("utf-8", errors="replace")
    rest = lines[first.lineno : func.end_lineno]
    return textwrap.dedent("\n".join([first_line, *rest])).strip("\n")


def is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def hide_name(text: str, name: str) -> str:
    return re.sub(rf"\b{re.escape(name)}\b", NAME_PLACEHOLDER, text)


def signature(func: FunctionNode) -> str:
    """`name(a, b=1, *args, c, **kw)`: the arguments as written, without annotations."""
    args = func.args

    def bare(arg: ast.arg | None) -> ast.arg | None:
        return None if arg is None else ast.arg(arg=arg.arg)

    plain = ast.arguments(
        posonlyargs=[bare(a) for a in args.posonlyargs],
        args=[bare(a) for a in args.args],
        vararg=bare(args.vararg),
        kwonlyargs=[bare(a) for a in args.kwonlyargs],
        kw_defaults=args.kw_defaults,
        kwarg=bare(args.kwarg),
        defaults=args.defaults,
    )
    return f"{func.name}({ast.unparse(plain)})"


# ---------------------------------------------------------------------------------------------
# The tasks


def funcname_examples(path: str, text: str) -> Iterator[Example]:
    module = parse_module(text)
    if module is None:
        return
    lines = source_lines(text)
    for func in outer_functions(module):
        if is_dunder(func.name):
            continue
        body = body_text(func, lines)
        if len("".join(body.split())) < MIN_BODY_CHARS:
            continue
        yield Example(source=hide_name(body, func.name), target=func.name)


def docsig_examples(path: str, text: str) -> Iterator[Example]:
    module = parse_module(text)
    if module is None:
        return
    for func in outer_functions(module):
        docstring = ast.get_docstring(func, clean=True)  # clean=True is inspect.cleandoc
        if docstring:
            yield Example(source=docstring, target=signature(func))


def package_label(path: str) -> int | None:
    """The index of the path's top-level package in PACKAGE_LABELS, or None to skip the file."""
    parts = PurePosixPath(path).parts
    if len(parts) < 2 or parts[0] not in PACKAGE_LABELS:
        return None
    if TEST_DIRS.intersection(parts[1:-1]):
        return None
    return PACKAGE_LABELS.index(parts[0])


def preamble_end(text: str, lines: list[str]) -> int:
    """Index of the first line after the module docstring and the comment lines around it."""
    start = 0
    module = parse_module(text)
    if module is not None and ast.get_docstring(module, clean=False) is not None:
        start = module.body[0].end_lineno
    while start < len(lines) and (not lines[start].strip() or lines[start].lstrip().startswith("#")):
        start += 1
    return start


def line_groups(lines: list[str], max_chars: int) -> Iterator[str]:
    """Consecutive lines joined into chunks of at most `max_chars` characters (a longer single
    line is a chunk of its own). Blank lines never start a chunk: they would waste positions."""
    group: list[str] = []
    size = 0
    for line in lines:
        if not group and not line.strip():
            continue
        if group and size + len(line) + 1 > max_chars:
            yield "\n".join(group).rstrip()
            group, size = [], 0
            if not line.strip():
                continue
        group.append(line)
        size += len(line) + 1
    if group:
        yield "\n".join(group).rstrip()


def package_examples(path: str, text: str) -> Iterator[Example]:
    label = package_label(path)
    if label is None:
        return
    lines = source_lines(text)
    for chunk in line_groups(lines[preamble_end(text, lines) :], CHUNK_CHARS):
        if len(chunk.strip()) >= MIN_CHUNK_CHARS:
            yield Example(source=chunk, label=label)


class _Task(NamedTuple):
    description: str
    examples: Callable[[str, str], Iterator[Example]]
    # The group of a file for a split stratified by group (files of group None give no
    # examples); None: the task uses the corpus's own split by path hash.
    split_group: Callable[[str], int | None] | None = None


_TASKS: dict[str, _Task] = {
    "funcname": _Task(
        "a function's body (docstring removed, its name hidden) -> the function's name",
        funcname_examples),
    "docsig": _Task(
        "a function's docstring -> its signature, `name(a, b=1, *args, **kw)`",
        docsig_examples),
    "package": _Task(
        f"a chunk of a source file -> its stdlib package, one of {', '.join(PACKAGE_LABELS)}",
        package_examples, split_group=package_label),
}
TASKS: dict[str, str] = {name: task.description for name, task in _TASKS.items()}


def _task(name: str) -> _Task:
    if name not in _TASKS:
        known = "; ".join(f"{n} ({d})" for n, d in TASKS.items())
        raise UserError(f"unknown task {name!r}; known tasks: {known}")
    return _TASKS[name]


def task_kind(task: str) -> TaskKind:
    """seq2seq or classify: config.TASK_KINDS, the one table the config validation reads too."""
    _task(task)
    return TASK_KINDS[task]


def num_classes(task: str) -> int:
    kind = task_kind(task)
    if kind != "classify":
        raise UserError(f"task {task!r} is a {kind} task: it has no classes")
    return len(PACKAGE_LABELS)


def split_group(task: str) -> Callable[[str], int | None] | None:
    """How the task's files are split: None for the corpus's split by path hash (`funcname`,
    `docsig`: thousands of files, any of which may hold examples), else a function giving each
    file's group (its label, for `package`), which `splits.stratified_validation_mask` draws
    validation files from alike, so that every label is held out (by path hash alone, 4 of the
    8 packages had no validation file on CPython 3.11)."""
    return _task(task).split_group


def task_examples(task: str, documents: Iterable[Document]) -> Iterator[Example]:
    """The task's examples: in the documents' order, then in source order within a document."""
    make = _task(task).examples
    for path, text in documents:
        yield from make(path, text)


# ---------------------------------------------------------------------------------------------
# Rows: fixed-width int32 arrays, PAD (-1) where there is no token


def _require_positive(**lengths: int) -> None:
    for name, value in lengths.items():
        if value < 1:
            raise UserError(f"{name} must be at least 1 (room for the end-of-sequence id), got {value}")


def _checked_ids(ids: list[int], what: str) -> list[int]:
    # A negative id would be read as padding downstream and silently lose its loss weight.
    if ids and min(ids) < 0:
        raise ValueError(f"the encoder returned a negative id for {what}: {min(ids)}")
    return ids


def encode_seq2seq_rows(
    examples: Iterable[Example],
    encode: Callable[[str], list[int]],
    src_len: int,
    tgt_len: int,
    eos_id: int,
    start_id: int,
) -> tuple[np.ndarray, int]:
    """(rows, dropped): rows is int32 [N, src_len + tgt_len + 1].

    row[:src_len] = source ids cut to src_len - 1, eos_id, PAD...
    row[src_len:] = start_id, target ids, eos_id, PAD...  (tgt_len + 1 entries)
    Decoder inputs are row[src_len : src_len + tgt_len], its targets row[src_len + 1 :].
    An example whose target needs more than tgt_len - 1 ids is dropped, not cut (a cut name is
    a wrong answer); `dropped` counts them. Sources are cut.
    """
    _require_positive(src_len=src_len, tgt_len=tgt_len)
    sources: list[list[int]] = []
    targets: list[list[int]] = []
    dropped = 0
    for example in examples:
        if example.target is None:
            raise ValueError(f"not a seq2seq example (no target): {example.source[:60]!r}")
        target_ids = _checked_ids(encode(example.target), "a target")
        if len(target_ids) + 1 > tgt_len:
            dropped += 1
            continue
        sources.append(_checked_ids(encode(example.source), "a source")[: src_len - 1])
        targets.append(target_ids)
    rows = np.full((len(sources), src_len + tgt_len + 1), PAD, np.int32)
    for row, source_ids, target_ids in zip(rows, sources, targets, strict=True):
        row[: len(source_ids) + 1] = [*source_ids, eos_id]
        row[src_len : src_len + len(target_ids) + 2] = [start_id, *target_ids, eos_id]
    return rows, dropped


def encode_classify_rows(
    examples: Iterable[Example],
    encode: Callable[[str], list[int]],
    text_len: int,
    eos_id: int,
) -> np.ndarray:
    """int32 [N, text_len + 1]: text ids cut to text_len - 1, eos_id, PAD...; then the label."""
    _require_positive(text_len=text_len)
    texts: list[list[int]] = []
    labels: list[int] = []
    for example in examples:
        if example.label is None:
            raise ValueError(f"not a classification example (no label): {example.source[:60]!r}")
        texts.append(_checked_ids(encode(example.source), "a text")[: text_len - 1])
        labels.append(example.label)
    rows = np.full((len(texts), text_len + 1), PAD, np.int32)
    for row, text_ids in zip(rows, texts, strict=True):
        row[: len(text_ids) + 1] = [*text_ids, eos_id]
    rows[:, text_len] = labels
    return rows


def labels_of(cfg) -> list[str | int]:
    """The class names of a classifier for `cfg`, class i first: data.labels, or a task's labels."""
    if cfg.objective != "classify":
        return []
    return list(cfg.data.labels) if cfg.data.format == "classify" else list(PACKAGE_LABELS)


def classes_of(cfg) -> int:
    """Labels the model's classifier head needs for `cfg` (0: a run without classification): the
    task's, or data.labels of data.format=classify (filled when a run starts: `sft_rows.resolve_format`)."""
    if cfg.objective != "classify":
        return 0
    if cfg.data.format == "classify":
        if not cfg.data.labels:
            raise UserError("data.format=classify: data.labels is empty; it is filled from the training split "
                            "when a run starts (llm_jax.data.resolve_format)")
        return len(cfg.data.labels)
    return num_classes(cfg.data.task)
