"""End-to-end: the real CLI trains, shards with the same losses, resumes exactly, samples."""

import json
import signal
import time

import numpy as np
import pytest
from runs import TINY, cli_subprocess, losses

from llm_jax.cli import main


@pytest.mark.slow
def test_entry_trains_and_generates(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "gpt_tiny", f"run.dir={run}", "train.steps=30", "train.log_every=5",
                 "train.sample_tokens=16", "train.sample_prompt=def "]) == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "--- sample" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert key in train_records[-1]
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.5  # it learns
    evals = [r for r in records if "eval_loss" in r]
    assert evals and evals[-1]["step"] == 30 and evals[-1]["eval_loss"] < 4.5
    assert list((run / "tb").iterdir()), "TensorBoard events written"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "30"]

    assert main(["generate", str(run), "--prompt", "import ", "--prompt", "class",
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    lines = capsys.readouterr().out
    assert lines.startswith("import ") and "class" in lines


@pytest.mark.slow
def test_same_losses_data_parallel_as_on_one_device(tmp_path):
    """mesh.data=8 against one device. (data=2 x fsdp=2 x tensor=2 against one device, for every
    family's preset, gpt2 and llama among them: test_families.)"""
    steps = ["train.steps=6", "train.batch_size=8", "checkpoint.every=0"]
    single = cli_subprocess(["train", "gpt_tiny", f"run.dir={tmp_path / 'one'}", "mesh.data=1", *TINY, *steps],
                            devices=1)
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'dp'}", "mesh.data=8", *TINY, *steps]) == 0
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "dp")
    assert sorted(ref) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=1e-4)


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_exactly(tmp_path):
    args = ["train", "gpt_tiny", "train.steps=60", "checkpoint.every=10", "checkpoint.keep=3", *TINY]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    assert main([*args[:2], f"run.dir={ref_dir}", *args[2:]]) == 0

    proc = cli_subprocess([*args[:2], f"run.dir={run_dir}", *args[2:]])
    first = run_dir / "checkpoints" / "10"
    deadline = time.time() + 240
    while not first.is_dir() and time.time() < deadline:  # Orbax renames the step dir when complete
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = max(losses(run_dir))
    assert done < 60

    resumed = cli_subprocess([*args[:2], f"run.dir={run_dir}", *args[2:]])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from checkpoint" in err
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == sorted(ref)
    assert got[60] == ref[60]  # exact, not approximately equal
    assert all(got[s] == ref[s] for s in ref)


@pytest.mark.slow
def test_sigterm_checkpoints_stops_cleanly_and_resumes_exactly(tmp_path):
    args = ["train", "gpt_tiny", "train.steps=60", "checkpoint.every=0", *TINY]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "stopped"
    assert main([*args[:2], f"run.dir={ref_dir}", *args[2:]]) == 0

    proc = cli_subprocess([*args[:2], f"run.dir={run_dir}", *args[2:]])
    for line in proc.stderr:
        if line.startswith("step 20/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stop_step = int(out.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 20 <= stop_step < 60
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [stop_step]

    resumed = cli_subprocess([*args[:2], f"run.dir={run_dir}", *args[2:]])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from checkpoint at step {stop_step}" in err
    assert losses(run_dir) == losses(ref_dir)  # exactly


@pytest.mark.slow
def test_checkpoint_resumes_on_another_mesh(tmp_path):
    base = ["train", "gpt_tiny", *TINY, "checkpoint.every=5"]
    assert main([*base, f"run.dir={tmp_path / 'ref'}", "train.steps=10", "mesh.data=8"]) == 0
    run = tmp_path / "moved"
    assert main([*base, f"run.dir={run}", "train.steps=5", "mesh.data=8"]) == 0
    # Same run directory, longer run, a different mesh: restored onto data=2, fsdp=2, tensor=2.
    assert main([*base, f"run.dir={run}", "train.steps=10", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]) == 0
    ref, got = losses(tmp_path / "ref"), losses(run)
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in range(6, 11)], [ref[s] for s in range(6, 11)], rtol=1e-4)


def _error_of(args, capsys) -> str:
    code = main(args)
    # With a cold cache, progress lines of the data layer (tokenising, TFDS preparing the stdlib
    # corpus) may come first: the error is the last line, the only one starting "error:".
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert lines and lines[-1].startswith("error: "), lines
    assert not any(line.startswith("error: ") or "Traceback" in line for line in lines[:-1]), lines
    return lines[-1]


@pytest.mark.parametrize("override, message", [
    ("train.stpes=5", "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
    ("data.source=text:/no/such/file.txt", "/no/such/file.txt"),
    ("mesh.data=3", "mesh data=3"),
    ("train.batch_size=12", "not divisible by the data-parallel size 8"),
    ("model.num_heads=3", "model.num_heads=3 does not divide model.d_model=64"),
    ("train.steps=ten", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("run.dir=gs://bucket/run", "run.dir gs://bucket/run is a URL"),
    ("mesh.dcn_data=2", "mesh.dcn_* asks for 2 slices but there are 1 processes"),
    ("model.vocab_size=10", "model.vocab_size=10 is smaller than the tokenizer's 257 ids"),
])
def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys, override, message):
    err = _error_of(["train", "gpt_tiny", f"run.dir={tmp_path / 'r'}", override], capsys)
    assert message in err
    assert not (tmp_path / "r" / "config.yaml").exists()  # nothing recorded for a refused run


def test_run_directories_are_never_clobbered(tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    assert "not an llm-jax run directory" in _error_of(["train", "gpt_tiny", f"run.dir={foreign}"], capsys)
    assert (foreign / "thesis.txt").read_text() == "precious"

    run = tmp_path / "run"
    assert main(["train", "gpt_tiny", f"run.dir={run}", "train.steps=2", *TINY]) == 0
    capsys.readouterr()
    err = _error_of(["train", "gpt_tiny", f"run.dir={run}", "model.d_model=128", *TINY], capsys)
    assert "different config" in err and "model.d_model" in err
    assert len(losses(run)) == 2

    assert "missing" in _error_of(["generate", str(tmp_path / "missing"), "--prompt", "x"], capsys)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    base = ["train", "gpt_tiny", *TINY, "train.steps=4", "train.batch_size=16", "checkpoint.every=0", "mesh.data=8"]
    assert main([*base, f"run.dir={tmp_path / 'full'}"]) == 0
    assert main([*base, f"run.dir={tmp_path / 'accum'}", "train.grad_accum=2"]) == 0
    full, accum = losses(tmp_path / "full"), losses(tmp_path / "accum")
    np.testing.assert_allclose([accum[s] for s in full], list(full.values()), rtol=1e-5)


@pytest.mark.slow
def test_cpu_host_split_into_devices_matches_one_device(tmp_path):
    # mesh.cpu_devices=2 makes two CPU devices of this host (no forced count in XLA_FLAGS), and
    # 400 steps run with no log in between: an unbounded dispatch queue deadlocked XLA:CPU's
    # all-reduce there, so this also checks that the loop keeps only a few steps in flight.
    args = ["train", "gpt_tiny", *TINY, "train.steps=400", "train.log_every=400", "checkpoint.every=0"]
    split = cli_subprocess([*args, f"run.dir={tmp_path / 'split'}", "mesh.cpu_devices=2"], devices=None)
    one = cli_subprocess([*args, f"run.dir={tmp_path / 'one'}"], devices=1)
    for proc in (split, one):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        if proc is split:
            assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 1}, 2 cpu devices" in err
    got, ref = losses(tmp_path / "split"), losses(tmp_path / "one")
    assert list(got) == list(ref) == [400]
    np.testing.assert_allclose(got[400], ref[400], rtol=1e-4)
