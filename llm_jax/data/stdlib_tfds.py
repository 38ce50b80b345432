"""The running interpreter's standard library as a TFDS dataset (array_record, no TensorFlow).

Documents are the `.py` files under `sysconfig.get_paths()["stdlib"]`, recursively. Skipped:
`site-packages`/`dist-packages` (third-party code, differs between environments) and
`__pycache__`. Kept: the `test`/`tests` packages, which are ordinary Python and roughly double
the corpus (about 30 MB on CPython 3.11). TFDS itself is imported only when the builder is first
needed: it is heavy, and absent on machines that only benchmark or train synthetic tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from llm_jax.data.cache import content_key, file_lock, is_main_process, log
from llm_jax.data.splits import validation_mask

# Bump when the stdlib corpus's layout (files kept, split rule) changes: cached tokens then miss.
STDLIB_LAYOUT_VERSION = 1

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib's .py files, sorted (the order is part of the data)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


@cache
def builder_classes() -> tuple[type, type]:
    """(StdlibConfig, LlmJaxStdlib): defined on first use, so importing this module does not
    import TFDS; cached, so TFDS registers the builder once."""
    import tensorflow_datasets as tfds  # heavy; only the stdlib source needs it

    @dataclasses.dataclass
    class StdlibConfig(tfds.core.BuilderConfig):
        root: str = ""
        val_fraction: float = 0.05


    class LlmJaxStdlib(tfds.core.GeneratorBasedBuilder):
        """Python standard library source files; split train/validation by a hash of the path."""

        # The files are those of this interpreter: another Python version is another dataset.
        VERSION = tfds.core.Version(PYTHON_VERSION)
        # TFDS finds a builder's download-checksums file via `code_path`, which for a class inside
        # an installed package touches the `importlib_resources` backport that TFDS 4.9 does not
        # install (ModuleNotFoundError). This builder downloads nothing: no checksums file.
        code_path = None

        def _info(self) -> tfds.core.DatasetInfo:
            # DatasetInfo directly, not dataset_info_from_configs: that one reads metadata files
            # from the builder's package directory, which a builder inside a library lacks.
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "path": tfds.features.Text()}
                ),
            )

        def _split_generators(self, dl_manager: tfds.download.DownloadManager):
            config: StdlibConfig = self.builder_config
            paths = stdlib_files(Path(config.root))
            in_val = validation_mask(paths, config.val_fraction)
            train = [p for p, v in zip(paths, in_val, strict=False) if not v]
            val = [p for p, v in zip(paths, in_val, strict=False) if v]
            return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

        def _generate_examples(self, paths: list[str]):
            root = Path(self.builder_config.root)
            for rel in paths:
                # A few test files are deliberately not UTF-8; keep them, with replacement chars.
                text = (root / rel).read_bytes().decode("utf-8", errors="replace")
                yield rel, {"text": text, "path": rel}

    return StdlibConfig, LlmJaxStdlib


def prepared_builder(data_dir: Path, val_fraction: float) -> Any:
    """The stdlib builder under `data_dir`, prepared (array_record files) if it is not yet."""
    import tensorflow_datasets as tfds  # heavy; only the stdlib source needs it

    StdlibConfig, LlmJaxStdlib = builder_classes()
    root = stdlib_dir()
    name = f"v{STDLIB_LAYOUT_VERSION}-val{val_fraction:g}-{content_key({'root': str(root)})[:8]}"
    config = StdlibConfig(name=name, root=str(root), val_fraction=val_fraction)
    with _quiet_absl():
        builder = LlmJaxStdlib(data_dir=str(data_dir), config=config, file_format="array_record")
        if not builder.is_prepared():
            with file_lock(data_dir / f".{name}.lock"):
                builder = LlmJaxStdlib(data_dir=str(data_dir), config=config, file_format="array_record")
                if not builder.is_prepared():
                    log(f"preparing the stdlib TFDS dataset from {root} in {data_dir}...")
                    tfds.disable_progress_bar()
                    # TFDS prints a banner on stdout; progress belongs on stderr, process 0's only.
                    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(
                        sys.stderr if is_main_process() else devnull
                    ):
                        builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Hide TFDS's warnings about a custom builder config and a not-yet-prepared folder: both
    are the normal case here, and they would print on every process of every run."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def stdlib_documents(builder: Any, split: str):
    """(path, text) of one split, read back through TFDS's array_record data source."""
    source = builder.as_data_source(split=split)
    for index in range(len(source)):
        record = source[index]
        yield record["path"].decode("utf-8"), record["text"].decode("utf-8")
