"""Mixtures (`data.mixture`): several sources, each its own token store and windows, interleaved
by weight so that batch `step` is still a pure function of (seed, step).

Row k of the global stream (k = step * global_batch + row) is row j of source i, where (i, j) =
`WeightedInterleave(weights)[k]`, a fixed pattern of the normalised weights w_i (no randomness;
the seed only shuffles each source's own windows). The pattern: of the first n rows, m_0(n) = n
are shared out; source i takes m_i(n) - m_{i+1}(n) of the m_i(n) rows that reach it and passes
on m_{i+1}(n) = floor(m_i(n) * (w_{i+1} + ... + w_last) / (w_i + ... + w_last)). So

- count_i(n), source i's rows among the first n, is computed in O(sources) without replaying,
  differs from n * w_i by less than the number of sources, and equals it whenever n * w_i is a
  whole number for every i (weights are read as the decimals written: 0.7 is 7/10, exactly);
- row k belongs to the first source whose count grows from k to k+1, and is that source's row
  j = count_i(k): consecutive rows of one source are its stream's consecutive rows.

Source i's row j is window `permutation_i(epoch)[j % N_i]` of its own N_i windows, shuffled by
Grain with its own seed (`source_seed`), each source running through its epochs independently.
The same interleave gives each step's share of rows per source on the host, without reading data
(`shares`). It is wired into Grain as a `DatasetSelectionMap` (`MapDataset.select_from_datasets`).
Grain's own `MapDataset.mix` interleaves the same way, but rounds the weights to integers relative
to the smallest (1% resolution) and offers no public count of a source's rows among the first n,
which the share metrics need at any step.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from llm_jax.data.corpus import Corpus
from llm_jax.data.pipeline import StepBatches, Windows, eval_batches, grain_seed, rows_per_process, windows_of
from llm_jax.data.store import TokenStream


def exact_weights(weights: Sequence[float | Fraction]) -> list[Fraction]:
    """The weights as exact fractions of their sum, each float read as the decimal it prints as."""
    parts = [w if isinstance(w, Fraction) else Fraction(repr(float(w))) for w in weights]
    total = sum(parts)
    return [p / total for p in parts]


class WeightedInterleave:
    """k -> (source i, its row j) for the rows of a mixture; see the module docstring."""

    def __init__(self, weights: Sequence[float | Fraction]):
        self.weights = exact_weights(weights)
        # ratio[i] = (w_{i+1} + ... + w_last) / (w_i + ... + w_last): the part of source i's rows it passes on.
        tails = [sum(self.weights[i:]) for i in range(len(self.weights))] + [Fraction(0)]
        ratios = [tails[i + 1] / tails[i] for i in range(len(self.weights))]
        self._ratios = [(r.numerator, r.denominator) for r in ratios]

    def __len__(self) -> int:
        return sys.maxsize  # unbounded: every source repeats

    def _reaching(self, n: int) -> list[int]:
        """m_0(n) .. m_S(n): how many of the first n rows reach source i (m_S = 0)."""
        reach = [n]
        for num, den in self._ratios:
            reach.append(reach[-1] * num // den)
        return reach

    def counts(self, n: int) -> list[int]:
        """Each source's rows among the first n rows of the stream."""
        reach = self._reaching(n)
        return [reach[i] - reach[i + 1] for i in range(len(self.weights))]

    def __getitem__(self, k: int) -> tuple[int, int]:
        before, after = self._reaching(int(k)), self._reaching(int(k) + 1)
        for i in range(len(self.weights)):
            if after[i + 1] == before[i + 1]:  # row k stops at source i
                return i, before[i] - before[i + 1]
        raise AssertionError("unreachable: the last source keeps every row that reaches it")


def source_seed(seed: int, index: int) -> int:
    """Grain's shuffle seed for source `index`: the first source's is the plain pipeline's
    (`grain_seed`), so a one-entry mixture serves exactly data.source's batches; the others are
    hashed from (seed, index), unrelated to each other."""
    if index == 0:
        return grain_seed(seed)
    entropy = (seed % 2**64, index)
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


@dataclass
class MixtureSource:
    """One entry of data.mixture, prepared: its token streams and normalised weight."""

    name: str
    source: str
    weight: float
    """Normalised: the weights of a mixture sum to 1."""
    train_tokens: TokenStream
    val_tokens: TokenStream
    val_bytes_per_token: float
    exact_weight: Fraction | None = None
    """The normalised weight as an exact fraction of the config's decimals (1 and 2 give 1/3,
    2/3, which floats cannot hold); None: `weight` read as a decimal."""


class MixtureBatches(StepBatches):
    """StepBatches of a mixture; also knows which source each row of a step comes from."""

    def __init__(self, dataset, order: dict, interleave: WeightedInterleave, names: list[str]):
        super().__init__(dataset, order)
        self.interleave = interleave
        self.names = names

    def shares(self, done: int) -> dict[str, float]:
        """`data/share/<name>`: each source's share of the rows of step done-1 (the step just
        trained); `data/cumulative_share/<name>`: of all rows of steps 0 .. done-1. Rows all
        have seq_len+1 tokens, so these are the shares of tokens too."""
        batch = self.order["global_batch"]
        last, total = self.interleave.counts((done - 1) * batch), self.interleave.counts(done * batch)
        record = {f"data/share/{n}": (t - a) / batch for n, t, a in zip(self.names, total, last, strict=True)}
        rows = done * batch
        record.update({f"data/cumulative_share/{n}": t / rows for n, t in zip(self.names, total, strict=True)})
        return record


def mixture_dataset(sources: Sequence[MixtureSource], seq_len: int, global_batch: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> MixtureBatches:
    """ds[step] -> int32 [global_batch // process_count, seq_len + 1]: this process's rows of the
    mixture's batch `step` (the rows a one-process run's batch has at the same positions)."""
    import grain  # heavy, and absent where only `bench` or a synthetic task runs (the GPU image)

    local_batch = rows_per_process(global_batch, process_count)
    windows: list[Windows] = [windows_of(s.train_tokens, seq_len, f"'{s.name}' training") for s in sources]
    streams = [grain.MapDataset.source(w).shuffle(seed=source_seed(seed, i)).repeat() for i, w in enumerate(windows)]
    interleave = WeightedInterleave([s.weight if s.exact_weight is None else s.exact_weight for s in sources])
    grain.transforms.DatasetSelectionMap.register(WeightedInterleave)
    dataset = (
        grain.MapDataset.select_from_datasets(streams, interleave)
        # As in pipeline.train_dataset: process p keeps local batches p, p+P, ... of the stream.
        .batch(local_batch, drop_remainder=True)
        .slice(slice(process_index, None, process_count))
    )
    order = {"seed": seed, "seq_len": seq_len, "global_batch": global_batch,
             "n_windows": sum(len(w) for w in windows), "process_index": process_index,
             "process_count": process_count,
             "mixture": [{"name": s.name, "source": s.source, "weight": s.weight, "n_windows": len(w)}
                         for s, w in zip(sources, windows, strict=True)]}
    return MixtureBatches(dataset, order, interleave, [s.name for s in sources])


@dataclass
class EvalSet:
    """One source's fixed held-out batches (this process's rows) and its weight in the mixture."""

    name: str
    weight: float
    batches: list[np.ndarray]
    bytes_per_token: float


def mixture_eval_sets(sources: Sequence[MixtureSource], seq_len: int, global_batch: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1) -> list[EvalSet]:
    """Each source's own validation windows in order (as `pipeline.eval_batches`), in batches
    proportional to its weight, at least one: about num_batches + sources batches in all."""
    sets = []
    for s in sources:
        count = max(1, round(s.weight * num_batches))
        batches = eval_batches(s.val_tokens, seq_len, global_batch, count, process_index, process_count,
                               what=f"'{s.name}' validation")
        sets.append(EvalSet(s.name, s.weight, batches, s.val_bytes_per_token))
    return sets


def describe_mixture(sources: Sequence[MixtureSource], windows: Sequence[int], rows: int) -> list[str]:
    """Lines for the log: each source's weight, windows, and how many epochs `rows` rows make."""
    lines = [f"data mixture of {len(sources)} sources:"]
    for s, n in zip(sources, windows, strict=True):
        lines.append(f"  {s.name}: weight {s.weight:.4g}, {n:,} windows, {s.weight * rows / n:.2f} epochs "
                     f"over the run ({s.source})")
    return lines


def mixed_corpus(corpora: Sequence[Corpus], weights: Sequence[float]) -> Corpus:
    """The sources' documents merged so that each split's text is in the weights' proportion by
    bytes at every point (next: the source furthest behind its share); what a sentencepiece model
    for the mixture is trained on (its first ~20 MB). Its fingerprint keys that model's cache."""
    shares = [float(w) for w in exact_weights(weights)]

    def documents(split: str) -> Iterator[str]:
        # (bytes taken / weight, index): the smallest is the source furthest behind.
        streams = [iter(c.documents(split)) for c in corpora]
        taken = [0] * len(corpora)
        queue = [(0.0, i) for i in range(len(corpora))]
        while queue:
            _, i = heapq.heappop(queue)
            doc = next(streams[i], None)
            if doc is None:
                continue  # exhausted: the others go on
            yield doc
            taken[i] += len(doc.encode("utf-8"))
            heapq.heappush(queue, (taken[i] / shares[i], i))

    fingerprint = {"mixture": [{"corpus": c.fingerprint, "weight": str(w)}
                               for c, w in zip(corpora, shares, strict=True)]}
    return Corpus("+".join(c.label for c in corpora), fingerprint, documents)
