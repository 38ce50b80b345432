"""`llm-jax sweep`: the plan a spec gives (tokens from the budget, learning rate, warmup, counts),
the errors of bad specs, the sweep directory's bookkeeping (skip finished runs, report failed
ones, never mix two specs), and the shipped `isoflop_tiny` sweep end to end."""

from __future__ import annotations

import csv
import json
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.scaling import analysis, fit, local, sweep
from llm_jax.scaling.plan import RUN_DEFAULTS, budget_label, plan_sweep
from llm_jax.scaling.results import RESULT_COLUMNS
from llm_jax.scaling.spec import SweepSpec, load_spec


def write_spec(tmp_path: Path, **fields) -> Path:
    spec = {"base": "gpt_tiny", "budgets": [3e9, 1e10], "sizes": {"widths": [16, 32], "aspect": 16, "head_dim": 16},
            "min_steps": 10, **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --- the plan -----------------------------------------------------------------------------


def test_plan_derives_steps_from_the_budget_and_the_projects_flops(tmp_path):
    plan = plan_sweep(load_spec("isoflop_tiny"), tmp_path)
    assert len(plan.runs) == 6 and not plan.left_out
    cfg = load_config("gpt_tiny")
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    for run in plan.runs:
        assert run.tokens == run.steps * tokens_per_step
        assert run.flops == pytest.approx(run.flops_per_token * run.tokens)
        # Whole steps: the run's compute is the budget to within half a step.
        assert abs(run.flops - run.budget) <= run.flops_per_token * tokens_per_step / 2
        args = run.train_args()
        assert args[0] == "gpt_tiny" and args[1] == f"run.dir={tmp_path / 'runs' / run.name}"
        run_cfg = load_config(args[0], args[1:])  # what `llm-jax train` will be given loads as planned
        assert run_cfg.train.steps == run.steps and run_cfg.model.d_model == run.shape["d_model"]
        assert run_cfg.train.eval_every == 0 and run_cfg.train.sample_tokens == 0
    names = [r.name for r in plan.runs]
    assert names[:2] == ["gpt_C3e9_d16_L1", "gpt_C1e10_d16_L1"] and len(set(names)) == 6


def test_parameter_counts_by_hand(tmp_path):
    """d16, 1 layer, byte vocabulary padded to 384, 32 positions, tied output layer."""
    run = plan_sweep(load_spec("isoflop_tiny"), tmp_path).runs[0]
    d, ff, vocab, positions = 16, 64, 384, 32
    block = (4 * d * d + 4 * d) + (2 * d * ff + ff + d) + 2 * 2 * d  # attention, MLP (biases), two LayerNorms
    nonembed = block + 2 * d  # the final LayerNorm
    assert run.params_nonembed == nonembed
    assert run.params == nonembed + vocab * d + positions * d
    # 6 x the matmul parameters (blocks and the tied output layer) + causal attention 6 L T d.
    assert run.flops_per_token == 6 * (run.params - positions * d) + 6 * 1 * 32 * d


def test_lr_scaling_and_warmup_rule(tmp_path):
    spec = load_spec(str(write_spec(tmp_path, lr=4e-3, lr_scaling="inverse_width", warmup_max_fraction=0.1)))
    plan = plan_sweep(spec, tmp_path)
    for run in plan.runs:
        assert run.lr == pytest.approx(4e-3 * 16 / run.shape["d_model"])
        tokens_per_step = 8 * 32
        assert run.warmup_steps == min(math.ceil(run.params / tokens_per_step), int(0.1 * run.steps))
        assert f"optim.min_lr={run.lr * 0.1:.6g}" in run.overrides


def test_short_pairs_are_left_out(tmp_path):
    plan = plan_sweep(load_spec(str(write_spec(tmp_path, budgets=[1.5e9, 1e10], min_steps=50))), tmp_path)
    assert [r.name for r in plan.runs] == ["gpt_C1.5e9_d16_L1", "gpt_C1e10_d16_L1", "gpt_C1e10_d32_L2"]
    assert len(plan.left_out) == 1 and plan.left_out[0].startswith("gpt_C1.5e9_d32_L2")
    plan = plan_sweep(load_spec(str(write_spec(tmp_path, max_steps=600))), tmp_path)
    assert [r.name for r in plan.runs] == ["gpt_C3e9_d16_L1", "gpt_C3e9_d32_L2", "gpt_C1e10_d32_L2"]
    assert plan.left_out == ["gpt_C1e10_d16_L1: 653 steps > max_steps=600"]


def test_arch_axis_shares_one_spec(tmp_path):
    spec = load_spec(str(write_spec(tmp_path, archs=["gpt", "lstm"], arch_overrides={"lstm": ["optim.lr=0.01"]})))
    plan = plan_sweep(spec, tmp_path)
    lstm = [r for r in plan.runs if r.arch == "lstm"]
    assert len(lstm) == 4 and all(not any("num_heads" in o for o in r.overrides) for r in lstm)
    cfg = load_config(lstm[0].config, list(lstm[0].overrides))
    assert cfg.model.arch == "lstm" and cfg.optim.lr == pytest.approx(0.003)  # the sweep's lr rule comes last


def test_arch_axis_takes_variants_defined_by_their_overrides(tmp_path):
    """Dense, MoE and Mamba in one spec: `moe` is no model.arch, so its overrides define it on the
    base config's gpt; its runs count every expert in params but only the routed ones in FLOPs."""
    moe = ["model.moe.num_experts=4", "model.moe.top_k=1"]
    spec = load_spec(str(write_spec(tmp_path, archs=["gpt", "moe", "mamba"], arch_overrides={"moe": moe})))
    runs = {(r.arch, r.shape["d_model"], r.budget): r for r in plan_sweep(spec, tmp_path).runs}
    assert {arch for arch, _, _ in runs} == {"gpt", "moe", "mamba"}
    dense, routed = runs["gpt", 32, 1e10], runs["moe", 32, 1e10]
    cfg = load_config(routed.config, list(routed.overrides))
    assert cfg.model.arch == "gpt" and cfg.model.moe.num_experts == 4 and routed.name.startswith("moe_C1e10_d32")
    # Per layer the dense MLP (d_ff = 4 x 32, with biases) gives way to 4 bias-free experts and a router.
    dense_mlp, expert, router = 2 * 32 * 128 + 128 + 32, 2 * 32 * 128, 32 * 4
    assert routed.params - dense.params == cfg.model.num_layers * (4 * expert + router - dense_mlp)
    # Each token goes through one expert and the router: 6 FLOPs per parameter it uses.
    assert routed.flops_per_token - dense.flops_per_token == 6 * cfg.model.num_layers * (expert + router - dense_mlp)
    assert runs["mamba", 32, 1e10].flops_per_token != dense.flops_per_token


def test_arch_axis_names_an_undefined_variant(tmp_path):
    with pytest.raises(UserError, match="unknown model.arch 'moe'.*needs arch_overrides"):
        plan_sweep(load_spec(str(write_spec(tmp_path, archs=["gpt", "moe"]))), tmp_path)


def test_budget_labels():
    assert [budget_label(c) for c in (1e12, 3.2e13, 5e9, 1.25e20)] == ["1e12", "3.2e13", "5e9", "1.25e20"]


# --- bad specs: one error line --------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"budgetz": [1e10]}, "budgetz: unknown key"),
    ({"budgets": [1e5]}, "budget 1e+05 FLOPs is too small for the smallest gpt model"),
    ({"sizes": {"widths": [24], "head_dim": 16}}, "width 24 is not a multiple of head_dim=16"),
    ({"shapes": [{"d_model": 30, "num_layers": 1, "num_heads": 4}], "sizes": None}, "sweep size 0"),
    ({"shapes": [{"num_layers": 1}], "sizes": None}, "shapes[0] has no d_model"),
    ({"shapes": [{"d_model": 32}]}, "give either sizes"),
    ({"archs": ["gpt", "transformerx"]}, "unknown model.arch 'transformerx'"),
    ({"budgets": [-1.0]}, "budgets must be positive"),
    ({"arch_overrides": {"lstm": []}}, "arch_overrides names lstm"),
    ({"overrides": ["data.source=jsonl:x.jsonl", "data.format=chat"]}, "the base config sets data.format=chat"),
])
def test_bad_specs_give_one_error_line(tmp_path, capsys, fields, message):
    path = write_spec(tmp_path, **fields)
    code = main(["sweep", str(path), "--dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # nothing is created for a spec that cannot run


def test_unknown_preset_suggests_one(capsys):
    assert main(["sweep", "isoflop_tiy", "--dir", "/tmp/never"]) == 2
    assert "did you mean 'isoflop_tiny'?" in capsys.readouterr().err


def test_every_shipped_spec_plans(tmp_path):
    for path in sorted(Path(sweep.__file__).parent.parent.joinpath("sweeps").glob("*.yaml")):
        plan = plan_sweep(SweepSpec.model_validate(yaml.safe_load(path.read_text())), tmp_path)
        budgets = {r.budget for r in plan.runs}
        sizes = {r.shape["d_model"] for r in plan.runs}
        assert len(budgets) >= 2 and len(sizes) >= 3, path.name


# --- the sweep directory, with a stand-in for `llm-jax train` ------------------------------

FAKE_TRAIN = """
import json, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[2:])
if args["model.d_model"] == FAIL_WIDTH:
    sys.exit(3)
run = Path(args["run.dir"]); run.mkdir(parents=True, exist_ok=True)
steps, width = int(args["train.steps"]), int(args["model.d_model"])
loss = 1.5 + 30 / width + 40 / steps ** 0.5
with open(run / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": steps, "eval_loss": loss, "eval_bpb": loss / 0.69}) + "\\n")
"""


class FakeTrain:
    """`llm-jax train` replaced by a script that writes a final evaluation, or fails for one width."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail_width = 0

    def __call__(self, run) -> list[str]:
        self.calls.append(run.name)
        return [sys.executable, "-c", FAKE_TRAIN.replace("FAIL_WIDTH", repr(str(self.fail_width))),
                *run.train_args()]


@pytest.fixture
def fake_train(monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(local, "train_command", fake)
    return fake


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rerun_skips_finished_runs_and_failures_are_reported(tmp_path, fake_train, capsys):
    spec = write_spec(tmp_path, budgets=[3e9, 1e10, 3e10], sizes={"widths": [16, 32, 48], "aspect": 16,
                                                                  "head_dim": 16})
    out = tmp_path / "sweep"
    fake_train.fail_width = 48
    assert sweep.run_sweep(str(spec), out, parallel=2) == 1  # not fatal: the other runs ran
    text = capsys.readouterr().out
    assert "3 runs failed" in text and "exit 3" in text and "gpt_C3e9_d48_L3" in text
    rows = read_rows(out / "results.csv")
    assert tuple(rows[0]) == RESULT_COLUMNS and len(rows) == 6  # the failed width is not in the table
    assert (out / "logs" / "gpt_C3e9_d48_L3.log").is_file()
    assert len(fake_train.calls) == 9

    fake_train.fail_width = 0
    assert sweep.run_sweep(str(spec), out) == 0
    assert sorted(fake_train.calls[9:]) == ["gpt_C1e10_d48_L3", "gpt_C3e10_d48_L3", "gpt_C3e9_d48_L3"]
    assert "6 runs finished before; skipped" in capsys.readouterr().out
    rows = read_rows(out / "results.csv")
    assert len(rows) == 9
    row = next(r for r in rows if r["name"] == "gpt_C1e10_d32_L2")
    steps = json.loads((out / "runs" / row["name"] / "metrics.jsonl").read_text())["step"]
    assert float(row["loss"]) == pytest.approx(1.5 + 30 / 32 + 40 / steps ** 0.5, abs=1e-6)
    assert (out / "report.md").is_file()


def test_a_sweep_dir_belongs_to_one_spec(tmp_path, fake_train, capsys):
    out = tmp_path / "sweep"
    assert sweep.run_sweep(str(write_spec(tmp_path)), out) == 0
    other = tmp_path / "other"
    other.mkdir()
    assert main(["sweep", str(write_spec(other, budgets=[1e10])), "--dir", str(out)]) == 2
    assert "holds a sweep of a different spec" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["sweep", str(write_spec(tmp_path)), "--dir", str(tmp_path / "full")]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_collect_starts_nothing(tmp_path, fake_train):
    out = tmp_path / "sweep"
    assert main(["sweep", str(write_spec(tmp_path)), "--dir", str(out), "--collect"]) == 0
    assert fake_train.calls == [] and read_rows(out / "results.csv") == []


# --- the shipped tiny sweep, for real -------------------------------------------------------


@pytest.mark.slow
def test_isoflop_tiny_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "tiny"
    # The sweep runs in this process and starts each `llm-jax train` in its own; without the
    # forced device count each of those gets one CPU device: tiny models.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    # 20 bootstrap refits rather than 200: on this sweep's six noisy points each refit takes tens
    # of milliseconds, and the bootstrap's errors are test_fit's to check, not this test's.
    monkeypatch.setattr(analysis, "fit_all", partial(fit.fit_all, resamples=20))
    code = main(["sweep", "isoflop_tiny", "--dir", str(out), "--parallel", "2"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-2000:]
    assert "running 6 runs here" in stdout
    rows = read_rows(out / "results.csv")
    assert len(rows) == 6 and {r["name"] for r in rows} == {r.name for r in plan_sweep(load_spec("isoflop_tiny"),
                                                                                       out.resolve()).runs}
    for row in rows:
        assert 0 < float(row["loss"]) < math.log(384) and float(row["bpb"]) > 0
        assert Path(row["run_dir"]).is_dir()
    # Within a budget, training longer on the smallest model beats it at the lower budget.
    by_name = {r["name"]: float(r["loss"]) for r in rows}
    assert by_name["gpt_C1e10_d16_L1"] < by_name["gpt_C3e9_d16_L1"]
    assert (out / "report.md").is_file() and len(list(out.glob("*.png"))) >= 3

    assert main(["sweep", "isoflop_tiny", "--dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "6 runs finished before; skipped" in stdout and "running" not in stdout
    assert read_rows(out / "results.csv") == rows


def test_run_defaults_are_config_keys():
    load_config("gpt_tiny", list(RUN_DEFAULTS))
    with pytest.raises(UserError):
        load_config("gpt_tiny", ["train.eval_evry=0"])
