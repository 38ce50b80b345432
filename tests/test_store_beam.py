"""`llm-jax prepare --engine beam`: the Apache Beam pipeline (DirectRunner, in this process) writes
the same token store as the local engine, file for file, and fails as it does."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_store import make_config, random_docs, text_corpus

from llm_jax.cli import main
from llm_jax.data import encode_groups, store
from llm_jax.data.build import prepare_data
from llm_jax.data.sources import open_corpus
from llm_jax.data.store import TokenStore
from llm_jax.data.tokenizer import ByteTokenizer, identity_of
from llm_jax.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DIRECT = ["--runner=DirectRunner"]


def _stores(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in (cache / "tokens").iterdir() if p.is_dir()}


@pytest.mark.parametrize("source", ["files", "joined"])
def test_beam_store_equals_the_local_store_file_for_file(tmp_path: Path, monkeypatch, source: str) -> None:
    # Small groups, records and shards: groups straddle shard boundaries, shards hold many groups.
    monkeypatch.setattr(encode_groups, "ENCODE_GROUP_CHARS", 2000)
    monkeypatch.setattr(store, "CHUNK_TOKENS", 256)
    monkeypatch.setattr(store, "SHARD_TOKENS", 256 * 11)
    if source == "files":  # documents, byte tokenizer
        corpus = text_corpus(tmp_path / "corpus", 40)
        cfg = make_config(tmp_path, f"text:{corpus}")
    else:  # one text file cut into pieces, one end-of-text; a Hugging Face tokenizer pickled to the DoFn
        (tmp_path / "one.txt").write_text("\n".join(random_docs(4, 3000)), encoding="utf-8")
        tokenizer = ROOT / "tests" / "fixtures" / "hf" / "gpt2" / "tokenizer.json"
        cfg = make_config(tmp_path, f"text:{tmp_path / 'one.txt'}", tokenizer=f"hf:{tokenizer}")
    local = {p.split: p.store for p in prepare_data(cfg, tmp_path / "run")}
    (tmp_path / "cache" / "tokens").rename(tmp_path / "local_tokens")
    beam = {p.split: p.store for p in prepare_data(cfg, tmp_path / "run", beam_args=DIRECT)}

    for split in ("train", "validation"):
        ours, theirs = beam[split], local[split]
        assert ours.path.name == theirs.path.name  # the same cache key
        assert ours.manifest == theirs.manifest  # fingerprints, counts, layout, every shard's entry
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
        files = sorted(p.name for p in theirs.path.iterdir())
        assert sorted(p.name for p in ours.path.iterdir()) == files
        for name in files:
            assert (ours.path / name).read_bytes() == (theirs.path / name).read_bytes(), name
    train = beam["train"].manifest
    assert len(train["shards"]) >= 3 and train["tokens"] > 2000 / 4 * len(train["shards"])
    assert train["documents"] == (1 if source == "joined" else 40 - beam["validation"].manifest["documents"])
    # Nothing but the stores and their locks: no temporary build directory left behind.
    assert sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir() if not p.name.endswith(".lock")) == \
        sorted(s.path.name for s in beam.values())


def test_a_bad_document_fails_as_the_local_engine_does_and_leaves_no_store(tmp_path: Path, capsys) -> None:
    lines = [json.dumps({"text": doc}) for doc in random_docs(6, 30)]
    lines[17] = '{"text": "cut short'
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    errors = {}
    for engine in ("local", "beam"):
        cache = tmp_path / f"cache_{engine}"
        code = main(["prepare", "gpt_tiny", f"data.source=jsonl:{corpus}", f"data.cache_dir={cache}",
                     f"run.dir={tmp_path / 'run'}", "--engine", engine])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: "), err
        errors[engine] = err[-1]
        assert [p.name for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")] == []
    assert errors["beam"] == errors["local"]
    assert f"{corpus}:18: not valid JSON" in errors["beam"]

    # Options that belong to the other engine are refused before anything is read.
    ok = ["prepare", "gpt_tiny", f"data.source=jsonl:{corpus}", f"data.cache_dir={tmp_path / 'c'}",
          f"run.dir={tmp_path / 'run'}"]
    for bad, message in (([*ok, "--engine", "beam", "--workers", "2"], "--workers is the local engine's"),
                         ([*ok, "--runner", "DirectRunner"], "for --engine beam"),
                         ([*ok, "--", "--direct_num_workers=2"], "for --engine beam"),
                         (["keys", "--", "--runner=X"], "pipeline options of prepare"),
                         ([*ok, "--engine", "beam", "--runner", "NoSuchRunner"],
                          "Unexpected pipeline runner: NoSuchRunner"),
                         ([*ok, "--engine", "beam", "--", "--direct_running_mode=bogus"],
                          "argument --direct_running_mode: invalid choice: 'bogus'")):
        assert main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "c").exists()


def test_runner_options_after_dashes_and_a_second_call_finds_the_stores(tmp_path: Path, capsys) -> None:
    corpus = text_corpus(tmp_path / "corpus", 6)
    args = ["prepare", "gpt_tiny", f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}", "--engine", "beam"]
    assert main([*args, "--", "--direct_running_mode=multi_threading", "--direct_num_workers=2"]) == 0
    built = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in built] == ["train", "validation"]
    paths = [line.rsplit(": ", 1)[1] for line in built]
    assert all(TokenStore(p).manifest["documents"] > 0 for p in paths)
    assert main([*args, "--runner", "DirectRunner"]) == 0
    again = capsys.readouterr().out.splitlines()
    assert [line.rsplit(": ", 1)[1] for line in again] == paths and all(": exists (" in line for line in again)


def test_workers_refuse_a_source_or_tokenizer_that_is_not_the_launchers(tmp_path: Path) -> None:
    from llm_jax.data.beam_engine import ReadGroups, SplitJob, Tokenise

    corpus = text_corpus(tmp_path / "corpus", 3)
    cfg = make_config(tmp_path, f"text:{corpus}")
    tokenizer = ByteTokenizer()
    fingerprint = open_corpus(cfg.data, tmp_path / "cache").fingerprint
    job = SplitJob(cfg.data, str(tmp_path / "cache"), "train", fingerprint, pickle.dumps(tokenizer),
                   identity_of(tokenizer), "uint16", tokenizer.eos_id, {}, str(tmp_path / "build"), 100, 8, 16)
    assert sum(len(docs) for _, _, docs in ReadGroups(job).process("train")) > 0
    (corpus / "doc000.py").write_text("changed since the launcher opened the source\n")
    with pytest.raises(UserError, match="is not what the launching process saw"):
        list(ReadGroups(job).process("train"))
    other = dataclasses.replace(job, tokenizer_identity={"name": "sentencepiece", "sha256": "0" * 64})
    with pytest.raises(UserError, match="is not the launching process's"):
        Tokenise(other).setup()
