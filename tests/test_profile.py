"""Profiling a step: `bench.profile_dir`, scripts/profile_summary.py, and the GPU session's script
experiments/gpu_issue19.sh (its DRY mode on this CPU, and shellcheck)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_launch import find_shellcheck

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.train.bench import bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu_issue19.sh"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ps = _load("profile_summary", ROOT / "scripts" / "profile_summary.py")


def _check_partition(summary: dict, top: int) -> None:
    """Shares sum to 100%, the classes split the total, the top list is sorted and cut at N."""
    assert sum(c["percent"] for c in summary["classes"]) == pytest.approx(100, abs=0.1)
    assert sum(c["ms"] for c in summary["classes"]) == pytest.approx(summary["device_ms"], rel=1e-3)
    assert {c["class"] for c in summary["classes"]} <= set(ps.CLASS_NAMES)
    times = [k["ms"] for k in summary["top"]]
    assert times == sorted(times, reverse=True) and 0 < len(times) <= top
    assert all(k["class"] == ps.classify(k["name"], k["hlo_op"] or "") for k in summary["top"])


@pytest.mark.slow
def test_bench_profiles_the_timed_steps_and_the_summary_reads_them(tmp_path):
    """The trace holds the timed steps only (2 executions of the step: no warmup, no compile), on
    the CPU as XLA op events; the result is marked profiled."""
    profile_dir = tmp_path / "profile"
    cfg = load_config("gpt_tiny", ["bench.steps=2", "bench.warmup=1", f"bench.profile_dir={profile_dir}"])
    result = bench(cfg)
    assert result["profiled"] is True and result["profile_dir"] == str(profile_dir)
    trace = ps.find_trace(profile_dir)
    assert trace.name == "perfetto_trace.json.gz"
    summary = ps.summarize(ps.load_events(trace), top=5)
    assert "CPU trace" in summary["source"] and summary["events"] > 0
    assert summary["steps"] == 2  # executions of the step module: the warmup step is not in the trace
    _check_partition(summary, 5)
    assert 0 < summary["busy_fraction"] <= 1
    assert summary["busy_ms"] + summary["idle_ms"] == pytest.approx(summary["window_ms"], abs=1e-3)
    assert any(c["class"] == "gemm" for c in summary["classes"])  # a transformer step is matmuls first
    assert ps.main([str(profile_dir), "--top", "3"]) == 0


def test_existing_profile_dir_is_refused_before_any_work(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "trace.json.gz").write_bytes(b"")
    cfg = load_config("gpt_tiny", [f"bench.profile_dir={earlier}"])
    with pytest.raises(UserError, match=r"bench.profile_dir .*earlier exists and is not empty"):
        bench(cfg)
    assert [p.name for p in earlier.iterdir()] == ["trace.json.gz"]  # untouched
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        bench(load_config("gpt_tiny", [f"bench.profile_dir={a_file}"]))
    (tmp_path / "empty").mkdir()
    from llm_jax.train.bench import check_profile_dir
    assert check_profile_dir(str(tmp_path / "empty")) == tmp_path / "empty"  # an empty one is fine


@pytest.mark.parametrize("write", [None, b"not gzip", gzip.compress(b"{not json"), gzip.compress(b'{"a": 1}')],
                         ids=["no-trace", "not-gzip", "not-json", "no-events"])
def test_summary_of_a_bad_directory_is_one_error_line(tmp_path, capsys, write):
    if write is not None:
        (tmp_path / "perfetto_trace.json.gz").write_bytes(write)
    assert ps.main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert ("no profiler trace" in lines[0]) if write is None else (str(tmp_path) in lines[0])


def _gpu_trace() -> list[dict]:
    """A GPU trace in the profiler's layout: kernels on stream lines of /device:GPU:0, the same
    kernels again on the derived `XLA Ops` line (to be left out), Python's start/stop on the host."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 20, "name": "thread_name", "args": {"name": "Stream #20(MemcpyD2D)"}},
        {"ph": "M", "pid": 1, "tid": 99, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "tid": 5, "name": "thread_name", "args": {"name": "python"}},
    ]
    host = [{"ph": "X", "pid": 2, "tid": 5, "ts": 0, "dur": 100, "name": "$profiler.py:151 start_trace"},
            {"ph": "X", "pid": 2, "tid": 5, "ts": 1000, "dur": 5000, "name": "$profiler.py:271 stop_trace"}]
    kernels = [  # (stream, start, duration, name), microseconds
        (7, 200, 300, "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT"),
        (7, 500, 100, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3"),
        (7, 650, 50, "loop_add_fusion"),
        (7, 700, 40, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL"),
        (7, 800, 60, "triton_softmax_3"),
        (20, 600, 100, "MemcpyD2D"),  # overlaps the compute stream's fusion: busy counts it once
        (7, 900, 10, "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT"),
    ]
    device = [{"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
               "args": {"hlo_module": "jit_step", "run_id": "1",  # cuBLAS: a custom call, still a gemm
                        **({"hlo_op": "custom-call.7"} if name.startswith("nvjet") else {})}}
              for tid, ts, dur, name in kernels]
    derived = [{"ph": "X", "pid": 1, "tid": 99, "ts": 200, "dur": 710, "name": "fusion.3"}]
    return meta + host + device + derived


def test_gpu_trace_counts_stream_kernels_only_with_exact_busy_time_and_gaps():
    summary = ps.summarize(_gpu_trace(), top=3)
    assert summary["source"] == "2 stream lines of /device:GPU:0"
    assert summary["events"] == 7
    assert summary["device_ms"] == pytest.approx(0.66)  # 300+100+50+40+60+100+10 us
    by_class = {c["class"]: c["ms"] for c in summary["classes"]}
    assert by_class == pytest.approx({"gemm": 0.31, "attention/custom": 0.1, "fusion/elementwise": 0.05,
                                      "collective": 0.04, "triton/pallas": 0.06, "copy/transpose": 0.1})
    _check_partition(summary, 3)
    assert summary["top"][0] == {"name": "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT", "class": "gemm",
                                 "ms": 0.31, "percent": pytest.approx(100 * 310 / 660), "count": 2,
                                 "hlo_op": "custom-call.7"}
    # Window 100..1000 us (the profiler's own start and stop left out); busy 200-740, 800-860, 900-910.
    assert summary["window_ms"] == pytest.approx(0.9)
    assert summary["busy_ms"] == pytest.approx(0.61)
    assert summary["idle_ms"] == pytest.approx(0.29)
    assert summary["gaps"] == 4
    assert summary["largest_gaps"][0] == {"ms": 0.1, "after": "(trace start)",
                                          "before": "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT"}
    assert summary["largest_gaps"][1]["after"].startswith("nvjet")  # 910 -> 1000, the trace's end
    assert summary["steps"] == 1 and summary["device_ms_per_step"] == pytest.approx(0.66)


def test_a_device_without_streams_falls_back_to_xla_ops_and_without_either_is_an_error():
    """A TPU's kernels are its `XLA Ops` line; a device process with no kernel line at all is an
    error, not a CPU trace (whose host op events would then be summed instead)."""
    without_streams = [e for e in _gpu_trace() if e.get("tid") not in (7, 20)]
    summary = ps.summarize(without_streams)
    assert summary["source"] == "1 XLA Ops lines of /device:GPU:0"
    assert summary["device_ms"] == pytest.approx(0.71) and summary["top"][0]["name"] == "fusion.3"
    with pytest.raises(ps.SummaryError, match="no kernel lines"):
        ps.summarize([e for e in without_streams if e.get("tid") != 99])


@pytest.mark.parametrize("name, cls", [
    ("ynn_fusion.12", "gemm"), ("dot_general.87", "gemm"), ("dot", "gemm"), ("cublas-gemm.3", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"), ("convolution.2", "gemm"), ("convert_fusion", "fusion/elementwise"),
    ("all-reduce.1", "collective"), ("reduce-scatter", "collective"), ("all-gather-start", "collective"),
    ("mha_forward", "attention/custom"), ("custom-call.4", "attention/custom"), ("pallas_call", "triton/pallas"),
    ("transpose_copy_fusion.23", "copy/transpose"), ("copy.224", "copy/transpose"),
    ("subtract_exponential_fusion", "fusion/elementwise"), ("while", "other"), ("rng-bit-generator", "other"),
])
def test_classes(name, cls):
    assert ps.classify(name) == cls


@pytest.mark.parametrize("script", [SCRIPT, ROOT / "experiments" / "gpu_wheels.sh"], ids=lambda p: p.name)
def test_gpu_scripts_pass_shellcheck(script):
    proc = subprocess.run([find_shellcheck(), "-x", "-s", "bash", str(script.relative_to(ROOT))],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _run_script(out: Path, **env: str) -> subprocess.CompletedProcess:
    # Without the tests' 8 forced host devices: the DRY presets run on one, as on a user's machine.
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environ.update({"PYTHON": sys.executable, "DRY": "1", "PYTHONPATH": str(ROOT), **env})
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=600)


def test_gpu_script_skips_every_part_once_the_budget_is_spent(tmp_path):
    proc = _run_script(tmp_path / "out", BUDGET_S="0")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["part"] for r in records] == ["a", "b", "b", "b", "c", "c", "c", "c", "d", "d", "e", "e"]
    assert all(r["skipped"] == "budget spent" for r in records)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert summary.count("SKIPPED") == 12 and "SKIPPED [c] moe_small ragged_dot_mgpu" in summary


def test_gpu_script_stops_after_the_environment_when_llm_jax_does_not_import(tmp_path):
    """A machine that lacks a dependency fails every part the same way: the script says so once
    and stops (exit 3) instead of spending the device time on failures."""
    python = tmp_path / "python"  # an interpreter without site-packages: jax does not import
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    proc = _run_script(tmp_path / "out", PYTHON=str(python))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["part"] for r in records] == ["a"]
    assert records[0]["result"]["import_error"].startswith("ModuleNotFoundError: No module named")
    assert "llm_jax does not import here" in proc.stdout


@pytest.mark.slow
def test_gpu_script_dry_run_writes_the_results_the_session_brings_back(tmp_path):
    """Parts a and b of the DRY mode end to end: environment, two benches, the profiled one and its
    summary; OUT stays within what the device tool brings back (8 plain files, no folders)."""
    out = tmp_path / "out"
    proc = _run_script(out, PARTS="a b", PROFILE_DIR=str(tmp_path / "raw"))
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "perfetto_trace.json.gz", "profile_summary.json", "profile_summary.txt",
                     "results.jsonl", "summary.txt"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["part"], r["rc"]) for r in records] == [("a", 0), ("b", 0), ("b", 0), ("b", 0), ("b", 0)]
    env, best, larger, profiled, profile = (r["result"] for r in records)
    assert env["llm_jax"] == "imports" and env["backend"] == "cpu"
    assert "profiled" not in best and "profiled" not in larger and profiled["profiled"] is True
    assert profiled["profile_dir"] == str(tmp_path / "raw" / "profile")
    assert profile == json.loads((out / "profile_summary.json").read_text())
    assert profile["steps"] == 2
    _check_partition(profile, 25)
    summary = (out / "summary.txt").read_text()
    assert "[b] profile: device busy" in summary and "FAILED" not in summary
    assert summary in proc.stdout  # printed at the end
