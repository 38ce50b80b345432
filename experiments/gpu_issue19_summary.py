"""The compact summary of experiments/gpu_issue19.sh's results.jsonl, against issue 19's targets.

    python experiments/gpu_issue19_summary.py OUT/results.jsonl

One line per measurement: step time, tokens/s, MFU (target 0.60) and memory of each bench; the
profile's busy fraction, classes and top kernels; the MoE step over the dense one of equal
active parameters (target 1.3x); each scan form against associative with its largest error
against sequential; Pallas GPU attention against the base kernel; then the failures and the
parts skipped. Standard library only.
"""

from __future__ import annotations

import json
import sys
from typing import Any

MFU_TARGET = 0.60
MOE_TARGET = 1.3


def _bench_line(name: str, r: dict[str, Any], target: bool = False) -> str:
    flag = "  (profiled: tracing slows it)" if r.get("profiled") else ""
    goal = f" (target {MFU_TARGET:.2f})" if target else ""
    return (f"{name}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.3f}{goal}, "
            f"{r['peak_memory_mb'] / 1024:.1f} GiB{flag}")


def _profile_lines(r: dict[str, Any]) -> list[str]:
    classes = ", ".join(f"{c['class']} {c['percent']:.1f}%" for c in r.get("classes", []))
    top = "; ".join(f"{k['name'][:50]}" + (f" [{k['hlo_op']}]" if k.get("hlo_op") else "") + f" {k['percent']:.1f}%"
                    for k in r.get("top", [])[:5])
    per_step = (f", {r['device_ms_per_step']:.1f} ms device time per step of {r['window_ms_per_step']:.1f}"
                if r.get("steps") else "")
    return [f"profile: device busy {100 * r['busy_fraction']:.1f}% of a {r['window_ms']:.1f} ms window "
            f"(idle {r['idle_ms']:.1f} ms in {r['gaps']} gaps){per_step}",
            f"  by class: {classes}", f"  top: {top}"]


def _scan_lines(name: str, rows: list[dict[str, Any]]) -> list[str]:
    header = next((r for r in rows if "length" in r), {})
    forms = [r for r in rows if "scan" in r]
    base = next((r for r in forms if r["scan"] == "associative"), None)
    lines = [f"{name} (B {header.get('batch')}, L {header.get('length')}):"]
    for r in forms:
        parts = []
        for kind in ("forward", "train"):
            if f"{kind}_s" in r:
                vs = (f", {base[f'{kind}_s'] / r[f'{kind}_s']:.2f}x associative's speed"
                      if base and f"{kind}_s" in base and r is not base else "")
                err = r.get(f"{kind}_max_rel_err_vs_sequential")
                parts.append(f"{kind} {1000 * r[f'{kind}_s']:.2f} ms{vs}" + (f" (err {err:.1e})" if err is not None
                                                                              else ""))
            elif f"{kind}_error" in r:
                parts.append(f"{kind} failed: {r[f'{kind}_error'][:80]}")
        chunk = f" {r['chunk']}" if r.get("chunk") else ""
        lines.append(f"  {r['scan']}{chunk}: " + "; ".join(parts))
    return lines


def summarize(records: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    by_part: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_part.setdefault(rec.get("part", "?"), []).append(rec)
    ok = [r for r in records if "result" in r]

    env = next((r["result"] for r in ok if r["part"] == "a"), None)
    if env:
        lines.append(f"[a] {env.get('device_kind', '?')} x{len(env.get('devices', []))}, jax {env.get('jax')}, "
                     f"flax {env.get('flax')}" + (f"; IMPORT ERROR {env['import_error']}" if "import_error" in env
                                                  else ""))
    for r in ok:
        if r["part"] == "b" and "step_ms" in r["result"]:
            lines.append("[b] " + _bench_line(r["name"], r["result"], target=True))
        elif r["part"] == "b" and "busy_fraction" in r["result"]:
            lines += ["[b] " + line for line in _profile_lines(r["result"])]

    checks = [r["result"] for r in ok if r["part"] == "c" and "check" in r["result"]]
    if checks:
        bad = [c["check"] for c in checks if not c.get("ok")]
        lines.append(f"[c] ragged_dot_mgpu against lax.ragged_dot: {len(checks) - len(bad)} of {len(checks)} "
                     "checks equal" + (f"; DIFFERENT: {', '.join(bad)}" if bad else ""))
    forms = [r["result"] for r in ok if r["part"] == "c" and "form" in r["result"]]
    if forms:
        lines.append("[c] expert MLP forward + backward: " + "; ".join(
            f"{f['form']} {1000 * f['median_s']:.2f} ms" for f in forms))
    moe = {r["name"]: r["result"] for r in ok if r["part"] == "c" and "step_ms" in r["result"]}
    dense = next((v for k, v in moe.items() if "dense" in k), None)
    for name, r in moe.items():
        ratio = f" = {r['step_ms'] / dense['step_ms']:.2f}x dense (target {MOE_TARGET}x)" \
            if dense and r is not dense else ""
        lines.append(f"[c] {_bench_line(name, r)}{ratio}")

    scans: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        if r["part"] == "d":
            scans.setdefault(r["name"], []).append(r["result"])
    for name, rows in scans.items():
        lines += ["[d] " + line for line in _scan_lines(name, rows)]

    attn = [r for r in ok if r["part"] == "e" and "step_ms" in r["result"]]
    lines += ["[e] " + _bench_line(r["name"], r["result"]) for r in attn]
    if len(attn) == 2:
        ratio = attn[1]["result"]["step_ms"] / attn[0]["result"]["step_ms"]
        lines.append(f"[e] pallas_gpu step / {attn[0]['name'].rsplit('=', 1)[-1]} step = {ratio:.2f}")

    for r in records:
        if "error" in r:
            lines.append(f"FAILED [{r['part']}] {r['name']} (exit {r['rc']}, {r['seconds']} s): {r['error']}")
        elif "skipped" in r:
            lines.append(f"SKIPPED [{r['part']}] {r['name']}: {r['skipped']}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {argv[0]}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summarize(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
