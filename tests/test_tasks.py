"""Supervised tasks from Python sources (llm_jax/data/tasks.py): examples and fixed-width rows."""

from __future__ import annotations

import os
import re
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llm_jax.data.splits import stratified_validation_mask
from llm_jax.data.tasks import (
    NAME_PLACEHOLDER,
    PACKAGE_LABELS,
    PAD,
    TASKS,
    Example,
    encode_classify_rows,
    encode_seq2seq_rows,
    line_groups,
    num_classes,
    package_label,
    split_group,
    task_examples,
    task_kind,
)
from llm_jax.errors import UserError

# A tiny fake standard library. Raw strings: the "\n" inside stays two characters of source.
EMAIL_UTILS = r'''# Copyright (C) 2001-2010 Python Software Foundation
# Author: Somebody
"""Miscellaneous utilities for the email package."""

import re

try:
    from _email_speedups import collapse_spaces
except ImportError:
    def collapse_spaces(text, keep_newlines=False):
        """Replace each run of blanks with one space.

            Newlines are blanks too, unless keep_newlines is true.
        """
        if keep_newlines:
            return "\n".join(collapse_spaces(line) for line in text.split("\n"))
        return re.sub("[ \t\n]+", " ", text)


def format_header(name: str, value, width=78, /, *parts, sep=": ", strict: bool, **params) -> str:
    """Format one header line."""
    def fold(line):
        return line[:width]
    return fold(sep.join([name, value, *parts]))


def first_word(text): return text.split()[0] if text.split() else ""


def _short(x):
    return x


class Parser:
    """A feed-style parser."""

    def __init__(self, policy=None):
        """Make a parser for `policy`."""
        self.policy = policy
        self.chunks = []

    async def feed(self, data):
        self.chunks.append(data)
        await self.flush(len(self.chunks))

    class Nested:
        def nested_method(self):
            return self.nested_method_helper() + 1
'''

ASYNCIO_TASKS = '''"""Support for tasks, coroutines and the scheduler."""

__all__ = ("sleep_then",)

import functools


async def sleep_then(delay, callback, *args):
    """Sleep `delay` seconds, then call `callback(*args)`."""
    await sleep(delay)
    return functools.partial(callback, *args)()
'''

UNITTEST_TEST = '''import unittest


class TestCase(unittest.TestCase):
    def test_equality_of_ints(self):
        self.assertEqual(1 + 1, 2, "integer addition is broken")
'''

FAKE_STDLIB = [
    ("email/utils.py", EMAIL_UTILS),
    ("test/badsyntax_py2.py", 'def main():\n    print "hello, world"\n'),
    ("asyncio/tasks.py", ASYNCIO_TASKS),
    ("unittest/test/test_case.py", UNITTEST_TEST),
    ("xml/tiny.py", "# nothing much\nx = 1\n"),
]


def test_funcname_hides_the_name_and_drops_the_docstring():
    examples = list(task_examples("funcname", FAKE_STDLIB))
    # Documents' order, then source order; methods, async defs and defs under `except` are in;
    # dunders, short bodies, nested functions and the file that does not parse are not.
    assert [e.target for e in examples] == [
        "collapse_spaces", "format_header", "first_word", "feed", "nested_method",
        "sleep_then", "test_equality_of_ints",
    ]
    by_name = {e.target: e.source for e in examples}
    # The recursive call is hidden, the docstring gone, the body dedented.
    assert by_name["collapse_spaces"] == (
        'if keep_newlines:\n'
        f'    return "\\n".join({NAME_PLACEHOLDER}(line) for line in text.split("\\n"))\n'
        'return re.sub("[ \\t\\n]+", " ", text)'
    )
    # A nested function stays part of its parent's body.
    assert by_name["format_header"] == (
        "def fold(line):\n    return line[:width]\nreturn fold(sep.join([name, value, *parts]))"
    )
    # A body on the signature's line starts where its first statement does.
    assert by_name["first_word"] == 'return text.split()[0] if text.split() else ""'
    # Whole words only: a longer identifier that starts with the name is left alone.
    assert by_name["nested_method"] == "return self.nested_method_helper() + 1"
    assert by_name["sleep_then"] == "await sleep(delay)\nreturn functools.partial(callback, *args)()"
    for example in examples:
        assert example.target not in example.source.replace(example.target + "_helper", "")
        assert example.label is None
        assert '"""' not in example.source


def test_docsig_targets_are_exact_signatures():
    examples = list(task_examples("docsig", FAKE_STDLIB))
    assert [(e.target, e.source) for e in examples] == [
        ("collapse_spaces(text, keep_newlines=False)",
         ("Replace each run of blanks with one space.\n\n"
          "Newlines are blanks too, unless keep_newlines is true.")),
        # Positional-only, defaults, *args, keyword-only (with and without default), **kwargs;
        # annotations dropped.
        ("format_header(name, value, width=78, /, *parts, sep=': ', strict, **params)",
         "Format one header line."),
        ("__init__(self, policy=None)", "Make a parser for `policy`."),
        ("sleep_then(delay, callback, *args)", "Sleep `delay` seconds, then call `callback(*args)`."),
    ]


def test_package_chunks_skip_the_header_and_other_packages():
    examples = list(task_examples("package", FAKE_STDLIB))
    labels = [PACKAGE_LABELS[e.label] for e in examples]
    # test/ is not a label, unittest/test/ is a test folder, xml/tiny.py is too short.
    assert set(labels) == {"email", "asyncio"}
    assert labels == sorted(labels, key=["email", "asyncio"].index)
    email = [e.source for e in examples if PACKAGE_LABELS[e.label] == "email"]
    asyncio = [e.source for e in examples if PACKAGE_LABELS[e.label] == "asyncio"]
    # Licence comments and the module docstring are skipped; the code is all there, in order.
    assert email[0].startswith("import re\n")
    assert "".join("".join(email).split()) == "".join(EMAIL_UTILS.split('package."""')[1].split())
    assert asyncio == [ASYNCIO_TASKS.split('scheduler."""\n\n')[1].rstrip()]
    assert all(e.target is None for e in examples)
    assert len(email) >= 2 and all(len(chunk) <= 512 for chunk in email)
    assert task_kind("package") == "classify" and num_classes("package") == len(PACKAGE_LABELS) == 8


def test_line_groups_cut_at_line_boundaries():
    lines = ["aaa", "", "bbb", "c" * 10, "", "", "dd"]
    assert list(line_groups(lines, 8)) == ["aaa", "bbb", "c" * 10, "dd"]
    assert list(line_groups(lines, 100)) == ["aaa\n\nbbb\n" + "c" * 10 + "\n\n\ndd"]


def test_unknown_task_names_it_and_the_known_ones():
    with pytest.raises(UserError, match="'nosuch'.*funcname.*docsig.*package"):
        list(task_examples("nosuch", FAKE_STDLIB))
    with pytest.raises(UserError, match="nosuch"):
        task_kind("nosuch")
    with pytest.raises(UserError, match="seq2seq"):
        num_classes("funcname")
    assert {name: task_kind(name) for name in TASKS} == {
        "funcname": "seq2seq", "docsig": "seq2seq", "package": "classify"}


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_seq2seq_rows_cut_sources_and_drop_long_targets():
    examples = [
        Example("abcdef", target="xy"),   # source cut to src_len - 1
        Example("a", target="toolong"),   # dropped: 7 ids + EOS > tgt_len
        Example("ab", target="xyz"),      # target exactly fits: 3 ids + EOS == tgt_len
        Example("", target=""),
    ]
    rows, dropped = encode_seq2seq_rows(examples, byte_ids, src_len=4, tgt_len=4, eos_id=256, start_id=257)
    assert dropped == 1
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, [
        [97, 98, 99, 256, 257, 120, 121, 256, PAD],
        [97, 98, 256, PAD, 257, 120, 121, 122, 256],
        [256, PAD, PAD, PAD, 257, 256, PAD, PAD, PAD],
    ])
    # The trainer's view: decoder inputs and targets are the same sequence shifted by one.
    inputs, targets = rows[:, 4:8], rows[:, 5:]
    np.testing.assert_array_equal(inputs[0], [257, 120, 121, 256])
    np.testing.assert_array_equal(targets[0], [120, 121, 256, PAD])
    assert ((targets == 256).sum(axis=1) == 1).all()

    empty, dropped = encode_seq2seq_rows([], byte_ids, 4, 4, 256, 257)
    assert empty.shape == (0, 9) and dropped == 0


def test_classify_rows_end_with_the_label():
    examples = [Example("abcdef", label=3), Example("", label=0), Example("ab", label=7)]
    rows = encode_classify_rows(examples, byte_ids, text_len=4, eos_id=256)
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, [
        [97, 98, 99, 256, 3],
        [256, PAD, PAD, PAD, 0],
        [97, 98, 256, PAD, 7],
    ])


def test_rows_refuse_the_wrong_example_kind_and_bad_lengths():
    with pytest.raises(ValueError, match="no target"):
        encode_seq2seq_rows([Example("x", label=1)], byte_ids, 4, 4, 256, 257)
    with pytest.raises(ValueError, match="no label"):
        encode_classify_rows([Example("x", target="y")], byte_ids, 4, 256)
    with pytest.raises(UserError, match="src_len"):
        encode_seq2seq_rows([], byte_ids, 0, 4, 256, 257)
    with pytest.raises(UserError, match="text_len"):
        encode_classify_rows([], byte_ids, 0, 256)
    with pytest.raises(ValueError, match="negative id"):
        encode_classify_rows([Example("x", label=1)], lambda s: [-1], 4, 256)


def stdlib_sample(per_package: int = 40) -> list[tuple[str, str]]:
    """Up to `per_package` .py files of each labelled stdlib package, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for package in PACKAGE_LABELS:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root / package):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            paths += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
        for path in sorted(paths)[:per_package]:
            text = path.read_bytes().decode("utf-8", errors="replace")
            documents.append((path.relative_to(root).as_posix(), text))
    return documents


def test_real_stdlib_gives_plenty_of_examples():
    documents = stdlib_sample()
    assert 150 <= len(documents) <= 320
    funcname = list(task_examples("funcname", documents))
    docsig = list(task_examples("docsig", documents))
    package = list(task_examples("package", documents))
    assert len(funcname) > 1000
    assert len(docsig) > 1000
    counts = Counter(e.label for e in package)
    assert sorted(counts) == list(range(len(PACKAGE_LABELS)))
    assert min(counts.values()) > 100
    for example in funcname:
        assert example.source and example.target.isidentifier()
        assert re.search(rf"\b{re.escape(example.target)}\b", example.source) is None
    assert all(e.target.startswith(e.target.split("(")[0] + "(") and e.target.endswith(")") for e in docsig)
    rows, dropped = encode_seq2seq_rows(funcname, byte_ids, 256, 32, 256, 257)
    assert rows.shape == (len(funcname) - dropped, 256 + 32 + 1) and dropped < len(funcname) // 5


def test_stratified_split_holds_out_part_of_every_group():
    names = [f"{group}/f{i}.py" for group, n in (("a", 40), ("b", 3), ("c", 1)) for i in range(n)]
    groups = [name.split("/")[0] for name in names]
    sizes = [100 + 37 * i for i in range(len(names))]
    mask = stratified_validation_mask(names, groups, sizes, 0.1)
    held = {g: [m for m, gg in zip(mask, groups) if gg == g] for g in "abc"}
    assert 1 <= sum(held["a"]) < 40 and sum(held["b"]) == 1  # at least one file, never all
    assert held["c"] == [False]  # a group of one stays in training
    a_bytes = sum(s for s, m, g in zip(sizes, mask, groups) if m and g == "a")
    assert abs(a_bytes / sum(s for s, g in zip(sizes, groups) if g == "a") - 0.1) < 0.03
    # Deterministic, and independent of the order the files come in.
    order = np.random.default_rng(0).permutation(len(names))
    again = stratified_validation_mask([names[i] for i in order], [groups[i] for i in order],
                                       [sizes[i] for i in order], 0.1)
    assert [again[list(order).index(i)] for i in range(len(names))] == mask
    with pytest.raises(ValueError, match="sizes"):
        stratified_validation_mask(names, groups, sizes[:-1], 0.1)


def test_package_validation_covers_every_label_by_whole_files(tmp_path):
    """On the real stdlib: the split behind data.task=package holds out whole files of all eight
    packages, about val_fraction of each one's bytes, and no file is in both splits."""
    from llm_jax.config import validate
    from llm_jax.data.build import build_data
    from llm_jax.data.task_rows import task_files

    cfg = validate({"model": {"arch": "bert"}, "train": {"seq_len": 128, "batch_size": 32},
                    "data": {"source": "stdlib", "task": "package", "cache_dir": str(tmp_path / "cache")}})
    assert split_group("package") is package_label and split_group("funcname") is None
    bundle = build_data(cfg, tmp_path / "run")
    val_labels = Counter(np.asarray(bundle.val_tokens)[:, -1].tolist())
    train_labels = Counter(np.asarray(bundle.train_tokens)[:, -1].tolist())
    assert sorted(val_labels) == sorted(train_labels) == list(range(len(PACKAGE_LABELS)))
    assert len(bundle.val_tokens) > 200 and max(val_labels.values()) / len(bundle.val_tokens) < 0.4

    root = tmp_path / "cache"
    files = {split: dict(task_files(cfg, root, split)) for split in ("train", "validation")}
    assert not files["train"].keys() & files["validation"].keys()
    for label, package in enumerate(PACKAGE_LABELS):
        sizes = {split: [len(text.encode()) for path, text in found.items() if package_label(path) == label]
                 for split, found in files.items()}
        assert sizes["validation"] and len(sizes["train"]) > len(sizes["validation"]), package
        share = sum(sizes["validation"]) / (sum(sizes["train"]) + sum(sizes["validation"]))
        assert 0.02 < share < 0.1, (package, share)
    # Validation holds labelled files only; every other stdlib file counts as training (where
    # it gives no examples), so data.max_bytes caps the files read as for the other tasks.
    from llm_jax.data.stdlib_tfds import stdlib_dir, stdlib_files
    assert all(package_label(path) is not None for path in files["validation"])
    assert files["train"].keys() | files["validation"].keys() == set(stdlib_files(stdlib_dir()))
