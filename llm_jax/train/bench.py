"""`llm-jax bench`: time the real train step on synthetic tokens (no corpus, no grain/tfds).

Reports compile time, steps/s, tokens/s, MFU against the peak table (or the measured CPU
peak) and peak memory. Synthetic data keeps the benchmark runnable on machines that have
only JAX installed.
"""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from llm_jax.config import Config
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import UserError
from llm_jax.models.base import model_vocab_size
from llm_jax.runtime.metrics import peak_flops_total
from llm_jax.train.objectives import Vocab, build_objective, row_width
from llm_jax.train.setup import TrainSetup, build_setup
from llm_jax.train.state import init_state
from llm_jax.train.trainer import Trainer


def peak_memory_bytes() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def synthetic_setup(cfg: Config, mesh: Mesh | None = None) -> TrainSetup:
    """The run's setup for synthetic tokens: no tokenizer is built and no corpus read (`bench`,
    `llm-jax compile`)."""
    byte_vocab = ByteTokenizer.vocab_size  # the default tokenizer's, used when model.vocab_size is unset
    vocab = model_vocab_size(cfg, byte_vocab)
    # Objectives that need special ids (masks, sentinels) take them as for byte tokens; the cost is
    # the same for any ids.
    return build_setup(cfg, vocab, build_objective(cfg, Vocab(byte_vocab, vocab, eos_id=byte_vocab - 1)), mesh=mesh)


def check_profile_dir(profile_dir: str) -> Path:
    """bench.profile_dir as a path the profiler may write: new or empty, never a directory holding
    something already (an earlier trace, a run) that a new trace would mix with."""
    if "://" in profile_dir:
        raise UserError(f"bench.profile_dir {profile_dir} is a URL; use a filesystem path")
    path = Path(profile_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"bench.profile_dir {path} exists and is not a directory; choose another bench.profile_dir")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"bench.profile_dir {path} exists and is not empty; choose a new directory "
                        "(an earlier trace is never overwritten)")
    return path


def _trace(profile_dir: Path | None) -> contextlib.AbstractContextManager:
    if profile_dir is None:
        return contextlib.nullcontext()
    try:
        profile_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create bench.profile_dir {profile_dir}: {exc.strerror}") from None
    # The perfetto JSON is what scripts/profile_summary.py reads (no TensorBoard needed).
    return jax.profiler.trace(str(profile_dir), create_perfetto_trace=True)


def bench(cfg: Config) -> dict:
    # Checked before any slow work: a refused directory should fail fast.
    profile_dir = check_profile_dir(cfg.bench.profile_dir) if cfg.bench.profile_dir else None
    setup = synthetic_setup(cfg)
    vocab = setup.vocab_size
    state = init_state(cfg, setup.mdef, setup.mesh, setup.tx, setup.shardings)
    rng = np.random.default_rng(cfg.seed)
    local_rows = cfg.train.batch_size // jax.process_count()
    batches = [setup.to_global(rng.integers(0, vocab, (local_rows, row_width(cfg)), dtype=np.int32))
               for _ in range(2)]

    start = time.perf_counter()
    compiled = setup.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    trainer = Trainer(compiled)
    state, metrics = trainer.run(state, ((i, batches[i % 2]) for i in range(cfg.bench.warmup)))
    jax.block_until_ready(state)
    with _trace(profile_dir):  # the timed steps only: no compilation, no warmup in the trace
        start = time.perf_counter()
        state, metrics = trainer.run(state, ((i, batches[i % 2]) for i in range(cfg.bench.steps)))
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start

    steps_per_s = cfg.bench.steps / elapsed
    tokens_per_s = steps_per_s * cfg.train.batch_size * cfg.train.seq_len * setup.objective.sequences_per_row
    peak, peak_source = peak_flops_total()
    memory, memory_source = peak_memory_bytes()
    result = {
        "params": setup.mdef.num_params,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "compile_s": compile_s,
        "step_ms": 1000 / steps_per_s,
        "steps_per_s": steps_per_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": setup.flops_per_token,
        "mfu": tokens_per_s * setup.flops_per_token / peak,
        "peak_flops": peak,
        "peak_source": peak_source,
        "peak_memory_mb": memory / 2**20,
        "memory_source": memory_source,
        "loss": float(metrics["loss"]),
    }
    if profile_dir is not None:  # the trace's own cost is inside these steps' time
        result.update(profiled=True, profile_dir=str(profile_dir))
    return result
