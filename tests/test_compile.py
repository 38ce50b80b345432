"""`llm-jax compile`: the real train step (and a decode step) compiled ahead of time for Cloud TPU
topologies on this CPU through libtpu, with HBM per chip, FLOPs and collectives read from the
compiled program; a config too big for its chips refused by name.

The TPU compiler takes minutes for a preset at full size on 2 cores (gpt_1b: about 7 min), so
the presets keep their architecture (attention layout, MLP, experts, Mamba blocks), their
objective and the mesh, but are narrowed to 2 layers of width 128 at sequence 128 (NARROW); the
collectives and the FLOPs ratio are those of the preset's program. The default suite compiles
every preset once and every topology once (the two-slice one included); the full grid of 4
presets x 3 topologies is marked slow. docs/tpu.md has full-size numbers.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.train.aot import collectives_of, needed_from_error, pallas_calls
from llm_jax.train.aot_decode import lower_decode_step

NARROW = ["model.num_layers=2", "train.seq_len=128", "train.batch_size=32", "model.d_model=128", "model.d_ff=256",
          "model.num_heads=4", "model.vocab_size=1024"]
# Per preset: a mesh that suits it (fsdp for the 1B dense model, experts for mixtral).
MESHES = {"gpt_1b": ["mesh.data=1", "mesh.fsdp=-1"], "llama": [], "mixtral": ["mesh.expert=4"], "mamba_small": []}
# (topology flags, extra keys): a v5e slice, a v5p slice, and two v5e slices over DCN.
TOPOLOGIES = {"v5e-16": (["--topology", "v5e-16"], []), "v5p-8": (["--topology", "v5p-8"], []),
              "2x v5e-16": (["--topology", "v5e-16", "--num-slices", "2"], ["mesh.dcn_data=2"])}
# Every preset once, every topology once: what the default suite compiles.
DEFAULT = [("gpt_1b", "v5e-16"), ("llama", "v5p-8"), ("mixtral", "2x v5e-16"), ("mamba_small", "v5p-8")]
# XLA's FLOPs over the formula's (6N + attention), docs/tpu.md#flops-per-step: near 1 for the dense
# models (elementwise work and full causal score matrices above it); with expert parallelism
# XLA counts the expert MLPs over the whole worst-case receive buffer, mesh.expert times the rows
# that arrive (mixtral's ratio is about 4 with mesh.expert=4).
FLOPS_RATIO = {"gpt_1b": (0.8, 1.5), "llama": (0.8, 1.5), "mamba_small": (0.8, 2.0), "mixtral": (3.0, 5.0)}


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def compile_report(preset: str, topology: str, *extra: str) -> dict:
    flags, keys = TOPOLOGIES[topology]
    code, out, err = run_cli("compile", preset, *flags, *NARROW, *MESHES[preset], *keys, *extra, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def reports() -> dict:
    """The default suite's compiles, shared by the assertions; llama's includes its decode step."""
    return {(p, t): compile_report(p, t, *([] if p == "llama" else ["--no-decode"])) for p, t in DEFAULT}


def param_bytes_per_chip(report: dict) -> float:
    return 4 * report["params"] / report["chips"]  # float32 master weights, split at best over every chip


def check_report(report: dict, preset: str) -> None:
    assert report["fits"] is True
    assert report["hbm_per_chip_bytes"] <= report["hbm_capacity_bytes"]
    # At least the chip's share of the weights (plus Adam's two moments and activations).
    assert report["hbm_per_chip_bytes"] > 3 * param_bytes_per_chip(report)
    low, high = FLOPS_RATIO[preset]
    assert low < report["flops_per_step"] / report["flops_per_step_formula"] < high
    assert report["compile_s"] > 0
    collectives = set(report["collectives"])
    assert collectives == set(report["collective_counts"])
    # Gradients of batch-split parameters are summed across chips.
    assert collectives & {"all-reduce", "all-reduce-start", "reduce-scatter"}
    if preset == "gpt_1b":  # fsdp: weights are gathered before use
        assert collectives & {"all-gather", "all-gather-start"}
    if preset == "mixtral":  # expert parallel: tokens travel to their experts' chips and back
        assert "all-to-all" in collectives


@pytest.mark.parametrize("preset,topology", DEFAULT)
def test_compiles_for_topology(reports, preset, topology):
    report = reports[(preset, topology)]
    # No key chose a Pallas kernel: none counted, though the TPU compiler writes Mosaic calls of its
    # own for mixtral's lax.ragged_dot (auto on TPU).
    assert report["pallas_kernels"] == 0
    check_report(report, preset)
    assert report["chips"] == {"v5e-16": 16, "v5p-8": 4, "2x v5e-16": 32}[topology]
    assert report["hbm_capacity_bytes"] == {"v5e-16": 16, "v5p-8": 95, "2x v5e-16": 16}[topology] * 2**30


def test_mesh_follows_the_keys(reports):
    assert reports[("gpt_1b", "v5e-16")]["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1, "expert": 1}
    # Two slices with mesh.dcn_data=2: the data axis spans both.
    assert reports[("mixtral", "2x v5e-16")]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 4}


def test_decode_step_is_compiled_for_decoders(reports):
    decode = reports[("llama", "v5p-8")]["decode"]
    assert decode["fits"] is True
    assert decode["batch"] == 32 and decode["cache_slots"] == 128
    # The KV cache: k and v of 2 layers x 32 rows x 128 slots x 4 KV heads x 32, bf16, rows split over 4 chips.
    cache_bytes = 2 * 2 * 32 * 128 * 4 * 32 * 2 / 4
    assert decode["hbm_per_chip_bytes"] > cache_bytes
    assert decode["flops_per_step"] > 0
    assert reports[("gpt_1b", "v5e-16")]["decode"] is None  # --no-decode


# The rest of the 4 x 3 grid (the default suite compiles the other cells).
REST = [(p, t) for p in MESHES for t in TOPOLOGIES if (p, t) not in DEFAULT]


@pytest.mark.slow
@pytest.mark.parametrize("preset,topology", REST, ids=[f"{p}-{t}" for p, t in REST])
def test_full_grid(preset, topology):
    check_report(compile_report(preset, topology, "--no-decode"), preset)


def test_too_big_is_refused_by_name():
    """A 2-layer GPT of width 8192 (1.9B parameters): weights and Adam state alone exceed one v5e chip."""
    code, out, err = run_cli("compile", "gpt_tiny", "--topology", "v5e-1", "model.d_model=8192", "model.d_ff=32768",
                             "model.num_heads=64", "--no-decode", "--json")
    assert code == 2
    line = err.strip()
    assert line.startswith("error: gpt_tiny needs ") and line.endswith("GiB more than its 16 GiB")
    assert "HBM per chip on v5e-1" in line and "\n" not in line
    report = json.loads(out)
    assert report["fits"] is False and report["hbm_per_chip_bytes"] > 16 * 2**30


@pytest.mark.parametrize("argv,message", [
    (["--topology", "v7x-8"], "unknown TPU topology 'v7x-8'"),
    (["--topology", "v5e-3"], "v5e-3: 3 is not a slice size of v5e"),
    (["--topology", "v5e-16", "train.batch_size=8"], "train.batch_size=8 (per microbatch 8) is not divisible by the "
                                                     "data-parallel size 16"),
    (["--topology", "v5e-16", "mesh.data=3"], "mesh data=3 x fsdp=1 x tensor=1 x expert=1 needs 3 devices"),
    (["--topology", "v5e-16", "--num-slices", "2", "mesh.dcn_data=3"], "32 devices do not split into 3 slices"),
])
def test_bad_input_is_one_error_line(argv, message):
    code, out, err = run_cli("compile", "gpt_tiny", *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_collectives_are_read_from_the_hlo():
    hlo = """
  %all-reduce.1 = f32[] all-reduce(f32[] %x), replica_groups={}, to_apply=%add
  %ag = (bf16[8]{0}, bf16[64]{0}) all-gather-start(bf16[8]{0} %w), dimensions={0}
  %agd = bf16[64]{0} all-gather-done((bf16[8]{0}, bf16[64]{0}) %ag)
  %a2a = bf16[4,8]{1,0} all-to-all(bf16[4,8]{1,0} %t), dimensions={0}
  %cp = (f32[2], f32[2]) collective-permute-start(f32[2] %y), source_target_pairs={{0,1}}
  %ag2 = bf16[64]{0} all-gather(bf16[8]{0} %v), dimensions={0}
  %f = f32[2] fusion(f32[2] %all-reduce.1), kind=kLoop, calls=%fused_all-reduce
"""
    assert collectives_of(hlo) == {"all-gather": 1, "all-gather-start": 1, "all-reduce": 1, "all-to-all": 1,
                                   "collective-permute-start": 1}


def test_out_of_memory_messages_give_the_bytes_needed():
    gib = 2**30
    assert needed_from_error("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm. "
                             "Exceeded hbm capacity by 4.75G.", 0) == int(20.5 * gib)
    # A message about temporaries alone: the arguments (the state) come on top.
    assert needed_from_error("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                             "temporaries (20.32G) exceeds available HBM (15.75G).", 3 * gib) == int(23.32 * gib)
    assert needed_from_error("INTERNAL: something else", gib) is None


def test_encoders_have_no_decode_step():
    why = lower_decode_step(load_config("bert_small", []), mdef=None, mesh=None)
    assert why == "none: model.arch=bert is an encoder and does not generate"


def test_overrides_may_follow_the_options():
    from llm_jax.cli import _parse
    from llm_jax.errors import UserError

    args = _parse(["compile", "gpt_1b", "mesh.data=1", "--topology", "v5p-8", "mesh.fsdp=-1", "--json"])
    assert args.overrides == ["mesh.data=1", "mesh.fsdp=-1"] and args.topology == "v5p-8" and args.json
    with pytest.raises(UserError, match="unrecognized arguments: --bogus"):
        _parse(["compile", "gpt_1b", "--topology", "v5p-8", "--bogus"])


def test_table_for_people(reports):
    from llm_jax.train.aot import format_report

    report = reports[("llama", "v5p-8")]
    lines = format_report({**report, "mfu_needed": 0.25, "tokens_per_s": 1e5}).splitlines()
    rows = {line.split("  ")[0]: line for line in lines}
    assert rows["topology"].endswith("v5p-8 x 1 slice(s): 4 chips")
    assert f"{report['hbm_per_chip_bytes'] / 2**30:.2f} GiB of 95 GiB (fits)" in rows["HBM per chip"]
    assert rows["collectives"].endswith("all-reduce x1")
    assert rows["MFU needed"].endswith("25.0% for 1e+05 tokens/s")
    assert rows["decode step"].split("  ")[-1].strip().startswith("batch 32, 128 cache slots: ")
    assert len({line.index(line.split()[-1]) > 0 for line in lines}) == 1  # every row has a value
    assert "Pallas kernel call" not in "\n".join(lines)
    assert "36 Pallas kernel call(s): XLA counts only the FLOPs a kernel declares" in format_report(
        {**report, "pallas_kernels": 36})


def test_pallas_calls_count_a_function_as_often_as_it_is_called():
    """JAX lowers a kernel used by several layers into one function called from each: a hand-made
    module, main calling `layer` twice (1 kernel and a 2-kernel function each), 1 kernel of its
    own, and a function nobody calls."""
    kernel = "stablehlo.custom_call @tpu_custom_call(%a) : (t) -> t"
    module = f"""module @jit_step {{
  func.func public @main(%a: t) -> t {{
    %0 = call @layer(%a) : (t) -> t
    %1 = func.call @layer(%0) : (t) -> t
    %2 = {kernel}
  }}
  func.func private @layer(%a: t) -> t {{
    %0 = {kernel}
    %1 = call @kernel_pair(%0) : (t) -> t
  }}
  func.func private @kernel_pair(%a: t) -> t {{
    %0 = {kernel}
    %1 = {kernel}
  }}
  func.func private @unused(%a: t) -> t {{
    %0 = {kernel}
  }}
}}"""
    assert pallas_calls(module) == 1 + 2 * (1 + 2)
    assert pallas_calls(module.replace("@tpu_custom_call", "@Sharding")) == 0
    assert pallas_calls(module.replace("@main", "@entry")) == 5  # no @main: each kernel written counts once


@pytest.mark.slow
@pytest.mark.parametrize("preset,topology,keys,kernels", [
    # The fused scan's forward and backward kernels in each of the 2 layers.
    ("mamba_small", "v5e-16", ["model.ssm.scan=pallas"], 2 * 2),
    # Per layer, splash's forward, dq and dkv kernels and megablox's 9 (gmm and tgmm of the
    # SwiGLU expert MLP's three matmuls, forward and backward).
    ("mixtral", "2x v5e-16", ["model.attention=splash", "model.moe.grouped_matmul=megablox"], (3 + 9) * 2),
], ids=["pallas-scan", "splash-megablox"])
def test_pallas_kernels_compile_for_tpu(preset, topology, keys, kernels):
    """The Pallas kernels, chosen by their keys, compile through Mosaic inside the real train step
    on the mesh (shard_map around each kernel): the program holds them and still fits."""
    report = compile_report(preset, topology, *keys, "--no-decode")
    assert report["fits"] is True
    assert report["pallas_kernels"] == kernels, report["pallas_kernels"]
