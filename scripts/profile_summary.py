"""Where a profiled step's device time goes: the kernels of a JAX profiler trace, summed.

    python scripts/profile_summary.py DIR [--top N] [--json] [--steps N]

DIR is a `bench.profile_dir` (or any `jax.profiler.trace` directory): the newest
perfetto_trace.json.gz under it is read (else the newest *.trace.json.gz). Device events are
the kernels on the GPU's streams (processes `/device:GPU:N`, threads `Stream #...`; the
profiler's derived lines such as `XLA Ops` repeat them and are left out), the `XLA Ops` line of
a device without streams (TPU), or, in a CPU trace (no device process), the XLA op events of the
host's threads (those that name an `hlo_op`). Prints the device time by class and the top N
kernels with their share, and how busy the device was over the traced window: the idle gaps are
the host's part of the step (dispatch, Python, synchronisation). Standard library only, so it
runs wherever the trace is copied.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

# Coarse classes, first match wins, on the lower-cased kernel name and HLO op name. The order
# matters: cuDNN's attention kernels use wgmma (a gemm word), cuBLAS gemms are custom calls.
CLASSES: list[tuple[str, re.Pattern[str]]] = [
    ("collective", re.compile(r"all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|collective|nccl")),
    ("attention/custom", re.compile(r"flash|fmha|sdpa|cudnn|attention|(^|[^a-z])mha")),
    # ynn/xnn/onednn fusions are XLA:CPU's library matmuls.
    ("gemm", re.compile(r"gemm|matmul|cublas|cutlass|nvjet|xmma|(^|[^a-z])dot([^a-z]|$)|convolution|"
                        r"(^|[^a-z])conv([^a-z]|$)|ynn_fusion|xnn_fusion|onednn")),
    ("triton/pallas", re.compile(r"triton|pallas|mosaic")),
    ("attention/custom", re.compile(r"custom-call|custom_call")),
    ("copy/transpose", re.compile(r"memcpy|memset|transpose|(^|[^a-z])copy([^a-z]|$)")),
    ("fusion/elementwise", re.compile(r"fusion|wrapped_|elementwise|reduce|broadcast|select|add|multiply|"
                                      r"subtract|divide|convert|exponential|tanh|rsqrt|negate|maximum|"
                                      r"minimum|compare|iota|scatter|gather|slice|concatenate|pad")),
]
OTHER = "other"
CLASS_NAMES = list(dict.fromkeys([name for name, _ in CLASSES] + [OTHER]))


class SummaryError(Exception):
    """Bad input: no trace, an unreadable one, or one without device events (one `error:` line)."""


def classify(name: str, hlo_op: str = "") -> str:
    text = f"{name} {hlo_op}".lower()
    for cls, pattern in CLASSES:
        if pattern.search(text):
            return cls
    return OTHER


def find_trace(directory: Path) -> Path:
    if not directory.is_dir():
        raise SummaryError(f"{directory} is not a directory")
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz"):
        found = [p for p in directory.rglob(pattern) if p.is_file()]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    raise SummaryError(f"no profiler trace (perfetto_trace.json.gz or *.trace.json.gz) under {directory}")


def load_events(path: Path) -> list[dict[str, Any]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SummaryError(f"cannot read the trace {path}: {exc}") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise SummaryError(f"{path} is not a trace: no traceEvents list")
    return [e for e in events if isinstance(e, dict)]


def _complete(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("ph") == "X" and isinstance(e.get("ts"), (int, float))
            and isinstance(e.get("dur"), (int, float)) and isinstance(e.get("name"), str)]


def device_events(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The events that are device work, and where they were found."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and isinstance(e.get("args"), dict):
            if e.get("name") == "process_name":
                processes[e.get("pid")] = str(e["args"].get("name", ""))
            elif e.get("name") == "thread_name":
                threads[(e.get("pid"), e.get("tid"))] = str(e["args"].get("name", ""))
    complete = _complete(events)
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if devices:
        for wanted, where in ((lambda n: n.startswith("Stream #"), "stream"), (lambda n: n == "XLA Ops", "XLA Ops")):
            lines = {key for key, name in threads.items() if key[0] in devices and wanted(name)}
            if lines:
                chosen = [e for e in complete if (e.get("pid"), e.get("tid")) in lines]
                names = sorted({processes[pid] for pid, _ in lines})
                return chosen, f"{len(lines)} {where} lines of {', '.join(names)}"
        raise SummaryError("the trace has device processes but no kernel lines (Stream #..., XLA Ops)")
    # A CPU trace: XLA:CPU records each executed op on the thread that ran it, with its hlo_op.
    chosen = [e for e in complete if isinstance(e.get("args"), dict) and "hlo_op" in e["args"]
              and not e["name"].startswith("end: ")]
    lines = {(e.get("pid"), e.get("tid")) for e in chosen}
    return chosen, (f"XLA op events on {len(lines)} host threads (a CPU trace: no device process; on a GPU "
                    "that means the kernel tracer, CUPTI, recorded nothing)")


def _merged(intervals: list[tuple[float, float, str]]) -> list[tuple[float, float, str, str]]:
    """Busy intervals (start, end, first event's name, last event's name), overlaps joined."""
    merged: list[list[Any]] = []
    for start, end, name in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1], merged[-1][3] = end, name
        else:
            merged.append([start, end, name, name])
    return [tuple(m) for m in merged]  # type: ignore[misc]


def _window(everything: list[dict[str, Any]]) -> tuple[float, float]:
    """The traced window: every event's span, host included (device idle time in it is the host's
    share of the step), less the profiler's own start and stop (writing the trace takes longer
    than a small model's steps)."""
    start = min(e["ts"] for e in everything)
    end = max(e["ts"] + e["dur"] for e in everything)
    for e in everything:  # the Python tracer's events, when it was on: "$profiler.py:151 start_trace"
        if e["name"].endswith("start_trace"):
            start = max(start, e["ts"] + e["dur"])
        elif e["name"].endswith("stop_trace"):
            end = min(end, e["ts"])
    return (start, end) if end > start else (min(e["ts"] for e in everything),
                                             max(e["ts"] + e["dur"] for e in everything))


def _steps(chosen: list[dict[str, Any]]) -> int | None:
    """Executions of the module that took the most time (run_id per execution), if recorded."""
    time_by_module: dict[str, float] = defaultdict(float)
    runs: dict[str, set[str]] = defaultdict(set)
    for e in chosen:
        args = e.get("args") or {}
        if "hlo_module" in args and "run_id" in args:
            time_by_module[str(args["hlo_module"])] += e["dur"]
            runs[str(args["hlo_module"])].add(str(args["run_id"]))
    if not time_by_module:
        return None
    return len(runs[max(time_by_module, key=time_by_module.__getitem__)])


def summarize(events: list[dict[str, Any]], top: int = 15, steps: int | None = None) -> dict[str, Any]:
    chosen, source = device_events(events)
    chosen = [e for e in chosen if e["dur"] > 0]
    if not chosen:
        raise SummaryError(f"no device events in the trace ({source})")
    total_us = sum(e["dur"] for e in chosen)
    by_class: dict[str, float] = dict.fromkeys(CLASS_NAMES, 0.0)
    by_name: dict[str, dict[str, Any]] = {}
    for e in chosen:
        hlo_op = str((e.get("args") or {}).get("hlo_op", ""))
        row = by_name.setdefault(e["name"], {"name": e["name"], "class": classify(e["name"], hlo_op),
                                             "us": 0.0, "count": 0, "hlo_ops": Counter()})
        row["us"] += e["dur"]
        row["count"] += 1
        if hlo_op and hlo_op != e["name"]:  # a GPU kernel's HLO op (fusion, custom call) when recorded
            row["hlo_ops"][hlo_op] += 1
        by_class[row["class"]] += e["dur"]

    window = _window(_complete(events))
    busy = _merged([(max(e["ts"], window[0]), min(e["ts"] + e["dur"], window[1]), e["name"]) for e in chosen
                    if e["ts"] < window[1] and e["ts"] + e["dur"] > window[0]])
    if not busy:
        raise SummaryError("no device events inside the traced window")
    busy_us = sum(end - start for start, end, _, _ in busy)
    gaps = [{"us": b[0] - a[1], "after": a[3], "before": b[2]} for a, b in zip(busy, busy[1:])]
    gaps += [{"us": busy[0][0] - window[0], "after": "(trace start)", "before": busy[0][2]},
             {"us": window[1] - busy[-1][1], "after": busy[-1][3], "before": "(trace end)"}]
    gaps = sorted((g for g in gaps if g["us"] > 0), key=lambda g: -g["us"])
    window_us = window[1] - window[0]
    steps = steps or _steps(chosen)

    def ms(us: float) -> float:
        return round(us / 1000, 4)

    return {
        "source": source,
        "events": len(chosen),
        "window_ms": ms(window_us),
        "busy_ms": ms(busy_us),
        "busy_fraction": busy_us / window_us if window_us > 0 else 1.0,
        "idle_ms": ms(window_us - busy_us),
        "gaps": len(gaps),
        "largest_gaps": [{"ms": ms(g["us"]), "after": g["after"], "before": g["before"]} for g in gaps[:5]],
        "device_ms": ms(total_us),
        "steps": steps,
        "device_ms_per_step": ms(total_us / steps) if steps else None,
        "window_ms_per_step": ms(window_us / steps) if steps else None,
        "classes": [{"class": c, "ms": ms(us), "percent": 100 * us / total_us}
                    for c, us in sorted(by_class.items(), key=lambda kv: -kv[1]) if us > 0],
        "top": [{"name": r["name"], "class": r["class"], "ms": ms(r["us"]), "percent": 100 * r["us"] / total_us,
                 "count": r["count"], "hlo_op": r["hlo_ops"].most_common(1)[0][0] if r["hlo_ops"] else None}
                for r in sorted(by_name.values(), key=lambda r: -r["us"])[:top]],
    }


def _short(name: str, width: int = 64) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def format_table(summary: dict[str, Any]) -> str:
    s = summary
    per_step = (f"; {s['steps']} steps: {s['device_ms_per_step']:.2f} ms device time and "
                f"{s['window_ms_per_step']:.2f} ms of window per step") if s["steps"] else ""
    lines = [
        f"trace: {s['trace']}",
        f"device events: {s['events']} ({s['source']})",
        f"traced window {s['window_ms']:.2f} ms; device busy {s['busy_ms']:.2f} ms "
        f"({100 * s['busy_fraction']:.1f}%), idle {s['idle_ms']:.2f} ms in {s['gaps']} gaps",
        f"device time {s['device_ms']:.2f} ms (summed over lines: concurrent lines each count){per_step}",
        "",
        f"{'class':<20} {'ms':>10} {'share':>7}",
    ]
    lines += [f"{c['class']:<20} {c['ms']:>10.2f} {c['percent']:>6.1f}%" for c in s["classes"]]
    lines += ["", f"{'top kernels':<64} {'ms':>10} {'share':>7} {'count':>6}  class"]
    for k in s["top"]:
        label = f"{k['name']} [{k['hlo_op']}]" if k.get("hlo_op") else k["name"]
        lines.append(f"{_short(label):<64} {k['ms']:>10.2f} {k['percent']:>6.1f}% {k['count']:>6}  {k['class']}")
    if s["largest_gaps"]:
        lines += ["", "largest idle gaps (device waiting):"]
        lines += [f"{g['ms']:>10.3f} ms  after {_short(g['after'], 40)}  before {_short(g['before'], 40)}"
                  for g in s["largest_gaps"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="the profile directory (bench.profile_dir)")
    parser.add_argument("--top", type=int, default=15, help="kernels to list (default 15)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps in the trace, for per-step figures (default: counted from the trace if it can)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        if args.top < 1 or (args.steps is not None and args.steps < 1):
            raise SummaryError("--top and --steps must be positive")
        trace = find_trace(Path(args.dir))
        summary = {"trace": str(trace), **summarize(load_events(trace), args.top, args.steps)}
    except SummaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
