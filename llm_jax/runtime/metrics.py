"""Metrics out of jit: FLOPs per token, MFU, and the JSONL / TensorBoard / progress-bar writer.

FLOPs per token (training = forward + backward) follow Kaplan et al. and PaLM:
    6 * N + 12 * L * H * Q * T, with the attention term halved for causal attention,
where N counts the parameters that take part in matmuls (every parameter except the position
table and, when the output layer is untied, the input embedding, which is a gather; of an MoE
layer's experts only the top_k / num_experts a token uses),
L = layers, H = query heads, Q = head dim, T = sequence length. Recurrent models (rnn, lstm,
gru) have no attention term: every FLOP of a step is a matmul against a parameter (the input
and recurrent projections and the output layer), so 6 * N alone. Mamba counts attention only for
the attention sublayers of its `model.layer_pattern`; its scan's elementwise work (about
10 * d_inner * N FLOPs per token and layer) is not counted.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llm_jax.config import Config
from llm_jax.paths import cache_root

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}


def matmul_params(cfg: Config, shapes: dict) -> int:
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    for gathered in ("pos_embed", "segment_embed"):  # table lookups, not matmuls
        if gathered in shapes:
            total -= int(np.prod(shapes[gathered]["embedding"].shape))
    if not cfg.model.tie_embeddings:
        total -= int(np.prod(shapes["embed"]["embedding"].shape))
    return total - inactive_expert_params(cfg, shapes)


def inactive_expert_params(cfg: Config, shapes: dict) -> int:
    """Expert weights a token does not pass through: (E - k) / E of every MoE layer's experts.
    MFU counts active parameters only (a sparse model gets no credit for idle experts)."""
    moe = cfg.model.moe
    if not moe.enabled:
        return 0
    experts = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        if any(getattr(k, "key", None) == "experts" for k in path):
            experts += int(np.prod(leaf.shape))
    return experts * (moe.num_experts - moe.top_k) // moe.num_experts


def flops_per_token(cfg: Config, n_matmul_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12*L*H*Q*T, the attention term halved when causal."""
    m = cfg.model
    if m.is_recurrent:
        return 6 * n_matmul_params  # x @ W_x and h @ W_h per token, no attention over the context
    t = seq_len or cfg.train.seq_len
    layers = m.num_layers
    if m.arch == "mamba":  # only the pattern's attention sublayers attend; the scan is not a matmul
        layers = m.num_layers // len(m.pattern) * m.pattern.count("attention")
    attention = 12 * layers * m.num_heads * m.head_dim * t
    if cfg.objective != "mlm":  # bert attends both ways: the whole T x T score matrix counts
        attention /= 2
    return 6 * n_matmul_params + attention


def encoder_decoder_flops_per_token(cfg: Config, n_encoder: int, n_decoder: int) -> float:
    """Training FLOPs per counted token (train.seq_len per row) of an encoder-decoder: the
    encoder's 6N and full attention over the S source tokens, the decoder's 6N, causal
    self-attention and cross-attention over its T tokens, divided by train.seq_len. (The
    cross-attention's key/value projections, which run on S rather than T tokens, are counted on T.)"""
    from llm_jax.train.objectives import span_counts

    m = cfg.model
    if cfg.objective == "span":
        noise, spans = span_counts(cfg.train.seq_len, cfg.train.noise_density, cfg.train.mean_span)
        s, t = cfg.train.seq_len - noise + spans + 1, noise + spans + 1
    else:
        s, t = cfg.train.src_len, cfg.train.seq_len
    width = m.num_heads * m.head_dim
    encoder = 6 * n_encoder * s + 12 * m.num_layers * width * s * s
    decoder = 6 * n_decoder * t + 12 * m.decoder_layers * width * (t * t / 2 + t * s)
    return (encoder + decoder) / cfg.train.seq_len


def measure_cpu_peak(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted fp32 matmul on one CPU device: the practical peak of this machine."""
    a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32), jax.devices("cpu")[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_peak_flops() -> float:
    """Measured once per machine, JAX version and core count, then read from the cache."""
    key = f"{platform.processor() or platform.machine()}-{os.cpu_count()}-jax{jax.__version__}"
    path = cache_root("") / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
        if key in cached:
            return float(cached[key])
    except (OSError, ValueError):
        cached = {}
    peak = measure_cpu_peak()
    cached[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached))
        tmp.replace(path)
    except OSError:
        pass
    return peak


def peak_flops_total() -> tuple[float, str]:
    """Peak FLOP/s of all devices of this job and where the number comes from."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        # Forced host devices share the same cores: the measured peak is the whole machine's.
        return cpu_peak_flops() * jax.process_count(), "measured cpu matmul"
    kind = dev.device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops * jax.device_count(), f"{dev.device_kind} table"
    return float("nan"), f"unknown device {dev.device_kind}"


SYNC_EVERY_S = 60.0


class MetricsWriter:
    """JSONL always; TensorBoard and a progress bar when enabled; everything on process 0 only."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, total_steps: int):
        self.active = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.total = total_steps
        self.done = start_step
        self.first = start_step
        self.t0 = None
        if not self.active:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.synced = time.monotonic()
        if cfg.train.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        # A live bar on a terminal; in logs (CI, batch jobs) a line per logged step with the ETA.
        if cfg.train.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if time.monotonic() - self.synced > SYNC_EVERY_S:
            # A FUSE-mounted bucket (gcsfuse) uploads a file on fsync or close only: without
            # this, a host lost mid-run would lose every metric line since the start.
            os.fsync(self.jsonl.fileno())
            self.synced = time.monotonic()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if "loss" not in record:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        else:
            extra = "".join(f", {k} {record[k]:.4g}" for k in ("grad_norm", "tokens_per_sec", "mfu") if k in record)
            self.log(f"step {record['step']}/{self.total}: loss {record['loss']:.4f}{extra}, eta {self.eta()}")

    def eta(self) -> str:
        if self.t0 is None or self.done <= self.first + 1:
            return "?"
        per_step = (time.perf_counter() - self.t0) / (self.done - self.first - 1)
        seconds = int(per_step * max(self.total - self.done, 0))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self.t0 is None:
            self.t0 = time.perf_counter()  # after the first (compiling) step
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, text: str) -> None:
        """A line for the user, kept clear of the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
