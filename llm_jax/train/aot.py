"""`llm-jax compile`: compile a config's real train step (and one decode step) ahead of time for a
Cloud TPU topology on this machine, and read what the compiler says about it: HBM per chip,
FLOPs per step, the collectives of the partitioned program. Nothing is allocated or run.

Everything is built inside `targeting("tpu")`, so every `auto` choice (bf16 compute, attention
kernel, selective scan, grouped matmul) resolves as it would on the pod; the state is abstract
(shapes with the mesh's shardings). docs/tpu.md explains how to read each number.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.platform import targeting
from llm_jax.parallel.topology import TpuTopology
from llm_jax.train.aot_decode import lower_decode_step, shard_bytes
from llm_jax.train.bench import synthetic_setup
from llm_jax.train.objectives import row_width
from llm_jax.train.step import batch_sharding

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction's opcode is followed by its operands: `... = bf16[8,128]{1,0} all-gather(%p), ...`;
# async collectives appear as `-start` / `-done` pairs, counted once by their `-start`.
_COLLECTIVE_OP = re.compile(r"\s((?:" + "|".join(COLLECTIVES) + r")(?:-start)?)\(")
_WHILE_OP = re.compile(r"\swhile\(")
# A Pallas kernel in the lowered (StableHLO) program. Not counted in the compiled program, which
# has Mosaic calls of the TPU compiler's own too (lax.ragged_dot becomes several).
_PALLAS_CALL = "stablehlo.custom_call @tpu_custom_call("
_FUNC = re.compile(r"^  func\.func (?:public |private )?@([\w.$-]+)\(", re.MULTILINE)
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")
# The TPU compiler's out-of-memory messages (sizes in GiB, written like 20.32G or 512.5M).
_SIZE = r"([\d.]+)([KMGT])i?B?"
_USED = re.compile(r"Used " + _SIZE + r" of " + _SIZE + r" hbm")
_REQUIRED = re.compile(r"required for [\w ]+ \(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)")
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
GIB = 2**30


@dataclass
class Memory:
    """Per chip, from the compiled program's memory analysis. The donated state's outputs are
    written over its arguments (aliased), so they are counted once."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def as_dict(self) -> dict:
        return {"arguments": self.arguments, "outputs": self.outputs, "aliased": self.aliased,
                "temporaries": self.temporaries, "generated_code": self.code, "total": self.total}


class OutOfMemory(Exception):
    """The TPU compiler refused the program: it needs `needed` bytes per chip (at least)."""

    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


def memory_of(compiled: Any) -> Memory:
    m = compiled.memory_analysis()
    return Memory(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
                  temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)


def collectives_of(hlo_text: str) -> dict[str, int]:
    """Collective opcodes of the partitioned program and how often each is written in it (a loop's
    body counts once, however often it runs)."""
    return dict(sorted(Counter(_COLLECTIVE_OP.findall(hlo_text)).items()))


def _bytes_of(number: str, unit: str) -> int:
    return int(float(number) * _UNIT[unit])


def needed_from_error(message: str, argument_bytes: int) -> int | None:
    """Bytes per chip the compiler asked for, from its RESOURCE_EXHAUSTED message; None for other
    errors. A message about temporaries alone adds the arguments (the state) this module knows."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    if used := _USED.search(message):
        return _bytes_of(*used.group(1, 2))
    if temps := _REQUIRED.search(message):
        return argument_bytes + _bytes_of(*temps.group(1, 2))
    return None


def pallas_calls(lowered_text: str) -> int:
    """The Pallas kernel calls of a lowered module: a function's kernels count as often as it is
    called, starting from @main (JAX lowers a kernel used in several layers into one function)."""
    starts = [(m.start(), m.group(1)) for m in _FUNC.finditer(lowered_text)]
    ends = [start for start, _ in starts[1:]] + [len(lowered_text)]
    bodies = {name: lowered_text[start:end] for (start, name), end in zip(starts, ends)}

    @cache
    def count(name: str) -> int:
        body = bodies[name]
        return body.count(_PALLAS_CALL) + sum(count(callee) for callee in _CALL.findall(body))

    # (A module without @main, in some other printing, still has its kernels: each counted once.)
    return count("main") if "main" in bodies else lowered_text.count(_PALLAS_CALL)


@dataclass
class Program:
    compiled: Any
    compile_s: float  # lowering and compiling
    pallas_kernels: int  # the Pallas kernel calls of the lowered program (a loop body's once)


def compile_lowered(lower: Callable[[], Any], argument_bytes: int) -> Program:
    """Lower and compile; raises OutOfMemory when the TPU compiler says the program cannot fit."""
    start = time.perf_counter()
    # A compile-only executable cannot be loaded back without TPU chips: keep it out of the
    # persistent compilation cache (where it would be large and unreadable). Only the write is
    # held back: switching the cache off would switch it off for the rest of the process.
    min_s = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        lowered = lower()
        pallas_kernels = pallas_calls(lowered.as_text())
        compiled = lowered.compile()
    except Exception as exc:  # the compiler's own refusal comes as a runtime error
        needed = needed_from_error(str(exc), argument_bytes)
        if needed is None:
            raise
        raise OutOfMemory(needed) from None
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
    return Program(compiled, time.perf_counter() - start, pallas_kernels)


def program_report(program: Program, chips: int, capacity: int) -> dict:
    """What one compiled SPMD program says about itself. cost_analysis() counts the FLOPs of one
    chip's program: the step's total is that times the chips."""
    compiled = program.compiled
    memory = memory_of(compiled)
    hlo = compiled.as_text()
    counts = collectives_of(hlo)
    return {"hbm_per_chip_bytes": memory.total, "hbm": memory.as_dict(), "fits": memory.total <= capacity,
            "flops_per_step": float(compiled.cost_analysis()["flops"]) * chips,
            "collectives": list(counts), "collective_counts": counts, "while_loops": len(_WHILE_OP.findall(hlo)),
            "pallas_kernels": program.pallas_kernels, "compile_s": program.compile_s}


def compile_for_topology(cfg: Config, topology: TpuTopology, *, decode: bool = True,
                         tokens_per_s: float | None = None) -> dict:
    """The report of `llm-jax compile` (docs/tpu.md). Raises OutOfMemory for a train step that the
    compiler refuses; a decode step that does not fit is reported in report["decode"]."""
    chips, capacity = topology.total_chips, topology.hbm_bytes
    with targeting("tpu"):
        mesh = make_mesh(cfg, devices=topology.devices())
        setup = synthetic_setup(cfg, mesh)
        state = setup.abstract_state()
        batch = jax.ShapeDtypeStruct((cfg.train.batch_size, row_width(cfg)), jnp.int32,
                                     sharding=batch_sharding(mesh))
        program = compile_lowered(lambda: setup.train_step.lower(state, batch), shard_bytes((state, batch)))
        decode_report = lower_and_report_decode(cfg, setup, chips, capacity) if decode else None
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * setup.objective.sequences_per_row
    report = {
        "topology": topology.name, "num_slices": topology.num_slices, "chips": chips,
        "mesh": dict(mesh.shape), "params": setup.mdef.num_params,
        "hbm_capacity_bytes": capacity,
        **program_report(program, chips, capacity),
        "flops_per_step_formula": setup.flops_per_token * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "decode": decode_report,
        "warnings": setup.warnings,
    }
    report["flops_ratio"] = report["flops_per_step"] / report["flops_per_step_formula"]
    if tokens_per_s is not None:
        report["tokens_per_s"] = tokens_per_s
        report["mfu_needed"] = tokens_per_s * setup.flops_per_token / (chips * topology.peak_flops)
    return report


def lower_and_report_decode(cfg: Config, setup: Any, chips: int, capacity: int) -> dict:
    """One decode step of the family's sampling loop (models/decoding), or why there is none."""
    lowered = lower_decode_step(cfg, setup.mdef, setup.mesh)
    if isinstance(lowered, str):
        return {"skipped": lowered}
    lower, info, argument_bytes = lowered
    try:
        program = compile_lowered(lower, argument_bytes)
    except OutOfMemory as oom:
        return {**info, "fits": False, "hbm_per_chip_bytes": oom.needed, "refused_by_compiler": True}
    return {**info, **program_report(program, chips, capacity)}


def check_fits(cfg_name: str, report: dict) -> None:
    """The one-line refusal of a train step that does not fit a chip's HBM."""
    if not report["fits"]:
        raise UserError(too_big(cfg_name, report["topology"], report["hbm_per_chip_bytes"],
                                report["hbm_capacity_bytes"]))


def too_big(cfg_name: str, topology: str, needed: int, capacity: int) -> str:
    return (f"{cfg_name} needs {needed / GIB:.1f} GiB of HBM per chip on {topology}, "
            f"{(needed - capacity) / GIB:.1f} GiB more than its {capacity / GIB:.0f} GiB")


def format_report(report: dict) -> str:
    """A short aligned table for people."""
    hbm = report["hbm"]
    rows = [
        ("topology", f"{report['topology']} x {report['num_slices']} slice(s): {report['chips']} chips"),
        ("mesh", " ".join(f"{k}={v}" for k, v in report["mesh"].items())),
        ("params", f"{report['params'] / 1e6:.1f}M"),
        ("HBM per chip", f"{hbm['total'] / GIB:.2f} GiB of {report['hbm_capacity_bytes'] / GIB:.0f} GiB "
                         f"({'fits' if report['fits'] else 'does NOT fit'})"),
        ("  arguments", f"{hbm['arguments'] / GIB:.2f} GiB (outputs {hbm['outputs'] / GIB:.2f} GiB, "
                        f"{hbm['aliased'] / GIB:.2f} GiB of them donated in place)"),
        ("  temporaries", f"{hbm['temporaries'] / GIB:.2f} GiB"),
        ("  code", f"{hbm['generated_code'] / GIB:.2f} GiB"),
        ("FLOPs per step", f"{report['flops_per_step']:.3e} compiled, {report['flops_per_step_formula']:.3e} "
                           f"formula (ratio {report['flops_ratio']:.2f})"),
        ("collectives", ", ".join(f"{k} x{v}" for k, v in report["collective_counts"].items()) or "none"),
        ("Pallas kernels", str(report["pallas_kernels"])),
        ("compile", f"{report['compile_s']:.1f} s"),
    ]
    if report["while_loops"]:
        rows.append(("note", f"{report['while_loops']} loop(s) in the program: XLA counts a loop body's FLOPs once"))
    if report["pallas_kernels"]:
        rows.append(("note", f"{report['pallas_kernels']} Pallas kernel call(s): XLA counts only the FLOPs a "
                             "kernel declares (megablox's)"))
    if "mfu_needed" in report:
        rows.append(("MFU needed", f"{report['mfu_needed']:.1%} for {report['tokens_per_s']:.4g} tokens/s"))
    rows.append(("decode step", describe_decode(report["decode"])))
    rows += [("warning", w) for w in report["warnings"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def describe_decode(decode: dict | None) -> str:
    if decode is None:
        return "not compiled (--no-decode)"
    if "skipped" in decode:
        return decode["skipped"]
    head = f"batch {decode['batch']}, {decode['cache_slots']} cache slots: "
    if decode.get("refused_by_compiler"):
        return head + f"does NOT fit, needs at least {decode['hbm_per_chip_bytes'] / GIB:.2f} GiB per chip"
    fits = "fits" if decode["fits"] else "does NOT fit"
    return head + (f"{decode['hbm_per_chip_bytes'] / GIB:.2f} GiB per chip ({fits}),"
                   f" {decode['flops_per_step']:.3e} FLOPs, {', '.join(decode['collectives']) or 'no collectives'},"
                   f" {decode['compile_s']:.1f} s")
