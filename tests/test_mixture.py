"""Mixtures (data.mixture): exact shares, (seed, step) determinism, process slices, resume, the
config's checks, the build from tiny text sources and a short training run that logs the shares."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from runs import losses

from llm_jax.cli import main
from llm_jax.config import load_config, validate
from llm_jax.data import BatchIterator, build_data, train_dataset
from llm_jax.data.build import prepare_data
from llm_jax.data.corpus import Corpus
from llm_jax.data.mixture import (
    MixtureSource,
    WeightedInterleave,
    mixed_corpus,
    mixture_dataset,
    mixture_eval_sets,
)
from llm_jax.errors import UserError
from llm_jax.train.run import check_data_order

SEQ = 4
OFFSET = 10_000  # source b's tokens start here, so a row tells its source and window


def source(name: str, windows: int, weight: float, offset: int) -> MixtureSource:
    """A source whose train tokens are offset + arange: window w starts at offset + w*SEQ."""
    tokens = np.arange(offset, offset + windows * SEQ + 1, dtype=np.int32)
    return MixtureSource(name, f"text:{name}", weight, tokens, tokens, 1.0)


def two_sources(wa: float = 0.7, wb: float = 0.3, na: int = 10, nb: int = 3) -> list[MixtureSource]:
    total = wa + wb
    return [source("a", na, wa / total, 0), source("b", nb, wb / total, OFFSET)]


def origin(row: np.ndarray) -> tuple[int, int]:
    """(source, window) of a row of `two_sources`."""
    np.testing.assert_array_equal(np.diff(row), 1)  # a real window, not a mix of two
    first = int(row[0])
    return (1, (first - OFFSET) // SEQ) if first >= OFFSET else (0, first // SEQ)


# ---------------------------------------------------------------- the interleave


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 2, 3], [0.01, 0.99], [0.2, 0.3, 0.1, 0.4], [5]])
def test_interleave_counts_are_exact_and_random_access(weights: list[float]) -> None:
    interleave = WeightedInterleave(weights)
    exact = [Fraction(repr(float(w))) / sum(Fraction(repr(float(x))) for x in weights) for w in weights]
    assert interleave.weights == exact
    period = math.lcm(*(w.denominator for w in exact))  # n * w_i is whole for every i
    running = [0] * len(weights)
    for k in range(2 * period + 37):
        i, j = interleave[k]
        assert j == running[i]  # a source's rows are its stream's consecutive rows
        running[i] += 1
        assert interleave.counts(k + 1) == running  # the closed form, no replay
        # Never off by a whole row per source from the exact share...
        assert all(abs(c - (k + 1) * w) < len(weights) for c, w in zip(running, exact, strict=True))
    # ...and exact at every multiple of the weights' common denominator, however far.
    for n in (period, 2 * period, 10**12 * period):
        assert interleave.counts(n) == [n * w for w in exact]


def test_shares_over_many_steps_match_the_weights() -> None:
    ds = mixture_dataset(two_sources(0.7, 0.3), SEQ, global_batch=8, seed=0)
    # 0.7 / 0.3 are 7/10, 3/10: every 10 rows hold exactly 7 of a; 5 steps of 8 rows are 40 rows.
    for done in (5, 100, 10**9):
        assert ds.shares(done)["data/cumulative_share/a"] == pytest.approx(0.7, abs=1e-15)
        assert ds.shares(done)["data/cumulative_share/b"] == pytest.approx(0.3, abs=1e-15)
    # Each step's reported shares are the sources of the rows it really served.
    for step in range(12):
        found = [origin(row)[0] for row in ds[step]]
        shares = ds.shares(step + 1)
        assert shares["data/share/a"] == found.count(0) / 8 and shares["data/share/b"] == found.count(1) / 8
        assert abs(found.count(0) - 0.7 * 8) < 2


def test_config_weights_are_exact_fractions() -> None:
    def three(exact: bool) -> list[MixtureSource]:
        sources = [source("a", 10, 1 / 6, 0), source("b", 3, 1 / 6, OFFSET), source("c", 5, 4 / 6, 2 * OFFSET)]
        if exact:  # as build_data sets them from weights 1, 1 and 4
            for s, share in zip(sources, (Fraction(1, 6), Fraction(1, 6), Fraction(2, 3)), strict=True):
                s.exact_weight = share
        return sources

    ds = mixture_dataset(three(exact=True), SEQ, global_batch=6, seed=0)
    assert all(ds.shares(done)["data/share/c"] == 4 / 6 for done in (1, 2, 10, 10**9))
    # Normalised floats alone (1/6 prints as 0.16666666666666666) drift by a row within 60.
    assert mixture_dataset(three(exact=False), SEQ, 6, seed=0).shares(10)["data/cumulative_share/c"] != 4 / 6


def test_each_source_repeats_its_own_shuffled_epochs() -> None:
    ds = mixture_dataset(two_sources(0.5, 0.5, na=10, nb=3), SEQ, global_batch=4, seed=3)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for step in range(15):  # 60 rows: 30 of a (3 epochs of 10), 30 of b (10 epochs of 3)
        for row in ds[step]:
            i, window = origin(row)
            seen[i].append(window)
    for i, n in ((0, 10), (1, 3)):
        epochs = [seen[i][e * n:(e + 1) * n] for e in range(len(seen[i]) // n)]
        assert len(epochs) >= 3 and all(sorted(e) == list(range(n)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    assert seen[0] != sorted(seen[0])  # shuffled at all


# ---------------------------------------------------------------- order, processes, resume


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    first, again = (mixture_dataset(two_sources(), SEQ, 8, seed=5) for _ in range(2))
    for step in (0, 7, 123, 10**6):
        np.testing.assert_array_equal(first[step], again[step])
    other = mixture_dataset(two_sources(), SEQ, 8, seed=6)
    assert any(not np.array_equal(first[s], other[s]) for s in range(4))
    # The same sources in the same stream positions whatever the seed: only the windows move.
    assert [origin(r)[0] for r in first[3]] == [origin(r)[0] for r in other[3]]


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_slices_make_the_global_batch(process_count: int) -> None:
    whole = mixture_dataset(two_sources(), SEQ, 8, seed=5)
    parts = [mixture_dataset(two_sources(), SEQ, 8, 5, p, process_count) for p in range(process_count)]
    for step in (0, 1, 9, 50):
        np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), whole[step])


def test_resume_from_iterator_state_gives_the_same_batches() -> None:
    ds = mixture_dataset(two_sources(), SEQ, 8, seed=1)
    with BatchIterator(ds, 0, 10, prefetch=2, to_global=lambda b: b) as it:
        served = [next(it) for _ in range(4)]
        state = it.get_state()
        rest = list(it)
    assert state["next_step"] == 4 and [e["name"] for e in state["mixture"]] == ["a", "b"]
    state = json.loads(json.dumps(state))  # as the checkpoint stores it
    check_data_order(state, ds.order)  # the same mixture resumes
    resumed = mixture_dataset(two_sources(), SEQ, 8, seed=1)
    with BatchIterator(resumed, state["next_step"], 10, prefetch=0, to_global=lambda b: b) as it:
        again = list(it)
    assert [s for s, _ in served + again] == list(range(10))
    for (s1, b1), (s2, b2) in zip(rest, again, strict=True):
        assert s1 == s2
        np.testing.assert_array_equal(b1, b2)


def test_resume_with_another_mixture_is_refused() -> None:
    saved = mixture_dataset(two_sources(0.7, 0.3), SEQ, 8, seed=1).order
    with pytest.raises(UserError, match="data mixture: a=text:a weight 0.7 .* -> a=text:a weight 0.5"):
        check_data_order(saved, mixture_dataset(two_sources(0.5, 0.5), SEQ, 8, seed=1).order)
    plain = train_dataset(np.arange(41), SEQ, 8, seed=1).order
    with pytest.raises(UserError, match="data mixture: none -> a=text:a"):
        check_data_order(plain, saved)
    check_data_order(plain, train_dataset(np.arange(41), SEQ, 8, seed=1).order)  # no mixture either side


def test_one_source_mixture_serves_the_plain_order() -> None:
    tokens = np.arange(401, dtype=np.int32)
    plain = train_dataset(tokens, SEQ, 8, seed=9)
    mixed = mixture_dataset([MixtureSource("x", "text:x", 1.0, tokens, tokens, 1.0)], SEQ, 8, seed=9)
    for step in (0, 3, 40):
        np.testing.assert_array_equal(mixed[step], plain[step])


def test_eval_sets_are_each_sources_validation_windows_in_proportion() -> None:
    sets = mixture_eval_sets(two_sources(0.7, 0.3), SEQ, 8, num_batches=10)
    assert [(s.name, len(s.batches)) for s in sets] == [("a", 7), ("b", 3)]
    assert {origin(r)[0] for b in sets[1].batches for r in b} == {1}
    tiny = mixture_eval_sets(two_sources(0.99, 0.01), SEQ, 8, num_batches=10)
    assert [len(s.batches) for s in tiny] == [10, 1]  # every source evaluated


def test_sentencepiece_text_is_merged_in_proportion_by_bytes() -> None:
    def corpus(name: str, size: int) -> Corpus:
        return Corpus(name, {"name": name}, lambda split: iter([name * size] * 200))

    docs = list(mixed_corpus([corpus("a", 10), corpus("b", 5)], [0.75, 0.25]).documents("train"))
    head = docs[:40]
    bytes_a = sum(len(d) for d in head if d[0] == "a")
    bytes_b = sum(len(d) for d in head if d[0] == "b")
    assert abs(bytes_a / (bytes_a + bytes_b) - 0.75) < 0.05
    assert len(docs) == 400  # then the rest of each, once the other is exhausted


# ---------------------------------------------------------------- config and build


def mixture_override(*entries: str) -> str:
    return "data.mixture=[" + ", ".join(entries) + "]"


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.mixture=[]"], "data.mixture is empty"),
    ([mixture_override("{source: stdlib, weight: 0}")], r"data\.mixture\.0\.weight: Input should be greater than 0"),
    ([mixture_override("{source: stdlib, weight: -1}")], r"data\.mixture\.0\.weight"),
    ([mixture_override("{source: stdlib, weight: 1}"), "data.source=text:x.txt"],
     "data.mixture replaces data.source"),
    ([mixture_override("{source: stdlib, weight: 1}", "{source: 'webtext:x', weight: 1}")],
     r"data\.mixture\.1\.source: unknown source 'webtext:x'"),
    ([mixture_override("{source: stdlib, weight: 1}", "{source: stdlib, weight: 2}")],
     "data.mixture names stdlib more than once"),
    ([mixture_override("{source: stdlib, weight: 1, wieght: 2}")], r"data\.mixture\.0\.wieght"),
    ([mixture_override("{source: stdlib, weight: 1, name: 'a b'}")], r"data\.mixture\.0\.name"),
    ([mixture_override("{source: stdlib, weight: 1}"), "data.format=chat"], "data.format=chat examples are not mixed"),
    ([mixture_override("{source: stdlib, weight: 1}"), "data.task=package"], "does not read a data.mixture"),
])
def test_bad_mixtures_are_user_errors_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config("gpt_tiny", overrides)


def test_cli_override_takes_a_yaml_list_and_names_default(tmp_path: Path) -> None:
    cfg = load_config("gpt_tiny", [mixture_override("{source: text:/data/web.txt, weight: 0.7}",
                                                    "{source: 'jsonl:code/*.jsonl.zst', weight: 3, name: py}",
                                                    "{source: 'tfds:wiki40b/en', weight: 1}")])
    assert [(e.name, e.source, e.weight) for e in cfg.data.mixture] == [
        ("web", "text:/data/web.txt", 0.7), ("py", "jsonl:code/*.jsonl.zst", 3.0), ("wiki40b_en", "tfds:wiki40b/en", 1)]


@pytest.fixture
def text_sources(tmp_path: Path) -> dict[str, Path]:
    """Two tiny corpora with nothing in common: lowercase words, and digits with capitals."""
    rng = np.random.default_rng(0)
    words = tmp_path / "words.txt"
    words.write_text("".join(f"{' '.join(rng.choice(['alpha', 'beta', 'gamma', 'delta'], 6))}\n"
                             for _ in range(400)))
    digits = tmp_path / "digits.txt"
    digits.write_text("".join(f"N{int(rng.integers(0, 1000)):03d} Q{int(rng.integers(0, 10))}\n" for _ in range(800)))
    return {"words": words, "digits": digits}


def test_build_uses_each_sources_own_store(tmp_path: Path, text_sources: dict[str, Path]) -> None:
    cache = str(tmp_path / "cache")
    mixture = [{"source": f"text:{text_sources['words']}", "weight": 3},
               {"source": f"text:{text_sources['digits']}", "weight": 1}]
    cfg = validate({"data": {"mixture": mixture, "cache_dir": cache}, "train": {"seq_len": 16, "batch_size": 8}})
    prepared = prepare_data(cfg, tmp_path / "run")
    assert [p.split for p in prepared] == ["words train", "words validation", "digits train", "digits validation"]
    bundle = build_data(cfg, tmp_path / "run")
    assert [(s.name, s.weight, s.exact_weight) for s in bundle.mixture] == [
        ("words", 0.75, Fraction(3, 4)), ("digits", 0.25, Fraction(1, 4))]
    # The stores are those of data.source=<each source>: the same cache entries.
    for s, p in zip(bundle.mixture, prepared[::2], strict=True):
        plain = build_data(validate({"data": {"source": s.source, "cache_dir": cache}}), tmp_path / "plain")
        assert s.train_tokens.path == p.store.path == plain.train_tokens.path
    words = bundle.tokenizer.decode(np.asarray(bundle.mixture[0].train_tokens)[:200].tolist())
    assert "alpha" in words or "beta" in words
    assert bundle.val_bytes_per_token == pytest.approx(sum(s.weight * s.val_bytes_per_token for s in bundle.mixture))


def test_build_errors_name_the_entry(tmp_path: Path, text_sources: dict[str, Path]) -> None:
    def build(second: str) -> None:
        mixture = [{"source": f"text:{text_sources['words']}", "weight": 1}, {"source": second, "weight": 1}]
        build_data(validate({"data": {"mixture": mixture, "cache_dir": str(tmp_path / "c")},
                             "train": {"seq_len": 16, "batch_size": 8}}), tmp_path / "run")

    with pytest.raises(UserError, match=r"data\.mixture\[1\] \(missing\): .*missing\.txt"):
        build(f"text:{tmp_path / 'missing.txt'}")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(UserError, match=r"data\.mixture\[1\] \(chat\): .*holds chat records; a mixture mixes text"):
        build(f"jsonl:{chat}")


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_training_on_a_mixture_logs_shares_and_learns(tmp_path: Path, text_sources: dict[str, Path],
                                                       capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    mixture = mixture_override(f"{{source: 'text:{text_sources['words']}', weight: 0.75}}",
                               f"{{source: 'text:{text_sources['digits']}', weight: 0.25}}")
    args = ["train", "gpt_tiny", f"run.dir={run}", mixture, f"data.cache_dir={tmp_path / 'cache'}",
            "train.log_every=10", "train.eval_every=0", "train.sample_tokens=0", "train.batch_size=8",
            "train.seq_len=32", "checkpoint.every=20", "optim.warmup_steps=10", "optim.decay_steps=40"]
    assert main([*args, "train.steps=20"]) == 0
    err = capsys.readouterr().err
    assert "data mixture of 2 sources:" in err and "words: weight 0.75" in err and "digits: weight 0.25" in err
    assert main([*args, "train.steps=40"]) == 0  # resumes at step 20: the checkpoint's mixture is this one
    assert "resumed from checkpoint at step 20" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [10, 20, 30, 40]
    for r in logged:  # 8 rows a step, 3/4 and 1/4 of every 4 rows: exact at every step
        assert (r["data/share/words"], r["data/share/digits"]) == (0.75, 0.25)
        assert (r["data/cumulative_share/words"], r["data/cumulative_share/digits"]) == (0.75, 0.25)
    loss = losses(run)
    assert loss[40] < loss[10] - 0.5
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["step"] == 40
    assert final["eval_loss"] == pytest.approx(0.75 * final["eval_loss/words"] + 0.25 * final["eval_loss/digits"])
    assert final["eval_loss/words"] < final["eval_loss/digits"]  # four words are easier than random digits
    assert list((run / "tb").iterdir())

    # The run directory refuses another mixture (the config's identity includes it).
    other = mixture.replace("weight: 0.75", "weight: 0.5")
    assert main([*(a if a != mixture else other for a in args), "train.steps=60"]) == 2
    assert "data.mixture" in capsys.readouterr().err
