"""`llm-jax sweep --launcher slurm|gke|tpu`: a planned sweep (the shipped isoflop_tiny) is
submitted against stub `sbatch`, `srun`, `kubectl` and `gcloud` commands that record their argv
(tests/launch_stubs.py), and every job must end in `llm-jax train` with exactly the arguments the
plan made for its run, which the real config loader accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch_stubs import BASH, LAUNCH, ROOT, flag, make_stub_bin, read_calls, shell_words, train_args

from llm_jax import cli
from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.scaling import launchers, sweep
from llm_jax.scaling.launchers import MOUNT_POINT, job_name, submit_runs
from llm_jax.scaling.plan import PlannedRun, plan_sweep
from llm_jax.scaling.spec import load_spec

SWEEP_DIR = Path(MOUNT_POINT) / "sweeps" / "tiny"  # plan_sweep creates nothing; the files go to tmp
BUCKET = "test-bucket"
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Everything the launchers read from the environment: each test starts without the caller's.
SETTINGS = ("BUCKET", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "REPO_URL", "SPOT", "NODE_COUNT",
            "PYTHON_VERSION", "LLM_JAX_DIR", "SWEEP_MAX_PARALLEL", "SWEEP_SBATCH_ARGS", "SWEEP_GKE_TEMPLATE",
            "SWEEP_TPU_KEEP", "SWEEP_TPU_POLL", "STUB_EXIT", "STUB_STDOUT")


@pytest.fixture(scope="module")
def runs() -> list[PlannedRun]:
    plan = plan_sweep(load_spec("isoflop_tiny"), SWEEP_DIR)
    assert len(plan.runs) == 6
    return plan.runs


class Stubs:
    def __init__(self, log: Path, monkeypatch: pytest.MonkeyPatch):
        self.log = log
        self.monkeypatch = monkeypatch

    def calls(self, tool: str | None = None) -> list[dict]:
        return [c for c in read_calls(self.log) if tool is None or c["tool"] == tool]

    def reply(self, **by_call: str) -> None:
        """What the stubs print: reply(sbatch="42") or reply(**{"gcloud describe": "ACTIVE"})."""
        self.monkeypatch.setenv("STUB_STDOUT", json.dumps(by_call))


@pytest.fixture
def stubs(tmp_path, monkeypatch) -> Stubs:
    """The stubs first on PATH, for this process and the scripts it starts."""
    bin_dir = make_stub_bin(tmp_path / "stub_bin")
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing from the user's gcloud or kubectl set-up
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "calls.jsonl"))
    return Stubs(tmp_path / "calls.jsonl", monkeypatch)


def loads_as_planned(args: list[str], run: PlannedRun) -> None:
    cfg = load_config(args[0], args[1:])
    assert cfg.run.dir == str(run.run_dir) and cfg.run.name == run.name
    assert cfg.train.steps == run.steps


# --- SLURM ------------------------------------------------------------------------------------


def submit_slurm(runs: list[PlannedRun], stubs: Stubs, files: Path) -> tuple[dict, Path]:
    stubs.reply(sbatch="4242")
    submit_runs("slurm", runs, SWEEP_DIR, files)
    (call,) = stubs.calls()
    assert call["tool"] == "sbatch"
    return call, Path(call["argv"][-1])


def fake_checkout(tmp_path: Path) -> Path:
    """What sweep.sbatch needs of the checkout: an executable .venv/bin/llm-jax, and a python."""
    venv = tmp_path / "checkout" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "llm-jax").write_text("#!/bin/sh\n")
    (venv / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    for name in ("llm-jax", "python"):
        (venv / name).chmod(0o755)
    return tmp_path / "checkout"


def run_task(runs_file: Path, task: int, checkout: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list]:
    """One array task of sweep.sbatch, as SLURM would start it."""
    log = tmp_path / f"task-{task}.jsonl"
    env = {**os.environ, "STUB_LOG": str(log), "SLURM_ARRAY_TASK_ID": str(task), "SLURM_SUBMIT_DIR": str(checkout),
           "SLURM_GPUS_ON_NODE": "8"}
    proc = subprocess.run([BASH, str(LAUNCH / "slurm" / "sweep.sbatch"), str(runs_file)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    return proc, read_calls(log)


def test_slurm_one_array_whose_tasks_train_the_planned_runs(runs, stubs, tmp_path, capsys):
    call, runs_file = submit_slurm(runs, stubs, tmp_path / "slurm")
    argv = call["argv"]
    assert "--array=0-5" in argv and "--job-name=llm-jax-sweep" in argv
    assert argv[-2:] == ["launch/slurm/sweep.sbatch", str(tmp_path / "slurm" / "runs-1.txt")]
    # From the checkout, so that the tasks find .venv through SLURM_SUBMIT_DIR.
    assert call["cwd"] == str(ROOT)
    assert flag(argv, "output").startswith(str(tmp_path / "slurm" / "logs") + "/")
    assert runs_file.read_text().splitlines() == [shlex.join(r.train_args()) for r in runs]
    out = capsys.readouterr().out
    assert "job array 4242" in out and all(f"4242_{i} {r.name}" in out for i, r in enumerate(runs))

    checkout = fake_checkout(tmp_path)
    for task, run in enumerate(runs):
        proc, calls = run_task(runs_file, task, checkout, tmp_path)
        assert proc.returncode == 0, proc.stderr
        (srun,) = calls
        assert srun["tool"] == "srun" and "--kill-on-bad-exit=1" in srun["argv"]
        assert srun["cwd"] == str(checkout)
        assert srun["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
        args = train_args(srun["argv"])
        assert args == run.train_args(), f"task {task}"
        loads_as_planned(args, run)


def test_slurm_arguments_arrive_verbatim(runs, stubs, tmp_path):
    """The list of runs is split by shlex, never evaluated: quotes, spaces and shell syntax in an
    argument reach llm-jax as they were."""
    odd = "train.sample_prompt=it's $(touch pwned) `x` \"q\" a  b;"
    run = dataclasses.replace(runs[0], overrides=(*runs[0].overrides, odd))
    _, runs_file = submit_slurm([run], stubs, tmp_path / "slurm")
    proc, calls = run_task(runs_file, 0, fake_checkout(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert train_args(calls[0]["argv"]) == run.train_args()
    assert not list(tmp_path.rglob("pwned"))


def test_slurm_task_without_a_run_fails(runs, stubs, tmp_path):
    _, runs_file = submit_slurm(runs[:2], stubs, tmp_path / "slurm")
    proc, calls = run_task(runs_file, 2, fake_checkout(tmp_path), tmp_path)
    assert proc.returncode != 0 and "lists 2 runs" in proc.stderr and calls == []


def test_slurm_settings(runs, stubs, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_MAX_PARALLEL", "2")
    monkeypatch.setenv("SWEEP_SBATCH_ARGS", "--nodes=2 --partition='gpu a'")
    call, _ = submit_slurm(runs, stubs, tmp_path / "slurm")
    assert "--array=0-5%2" in call["argv"]
    assert call["argv"][-4:-2] == ["--nodes=2", "--partition=gpu a"]
    # A second submission keeps the first one's list of runs.
    stubs.log.unlink()
    _, second = submit_slurm(runs[:1], stubs, tmp_path / "slurm")
    assert second.name == "runs-2.txt" and (tmp_path / "slurm" / "runs-1.txt").is_file()

    monkeypatch.setenv("SWEEP_MAX_PARALLEL", "0")
    with pytest.raises(UserError, match="SWEEP_MAX_PARALLEL"):
        submit_runs("slurm", runs, SWEEP_DIR, tmp_path / "slurm")


def test_slurm_refuses_line_breaks(runs, stubs, tmp_path):
    run = dataclasses.replace(runs[0], overrides=(*runs[0].overrides, "train.sample_prompt=a\nb"))
    with pytest.raises(UserError, match="line break"):
        submit_runs("slurm", [run], SWEEP_DIR, tmp_path / "slurm")
    assert stubs.calls() == []


# --- GKE --------------------------------------------------------------------------------------


def filled_template(tmp_path: Path, name: str = "jobset-gpu.yaml") -> Path:
    """A shipped manifest with its image placeholder replaced, as a user's copy would be."""
    path = tmp_path / name
    path.write_text((LAUNCH / "gke" / name).read_text().replace("PROJECT_ID", "my-project"))
    return path


def test_gke_one_jobset_per_run(runs, stubs, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_GKE_TEMPLATE", str(filled_template(tmp_path)))
    monkeypatch.setenv("BUCKET", f"gs://{BUCKET}")
    stubs.reply(kubectl="jobset.jobset.x-k8s.io/applied")
    submit_runs("gke", runs, SWEEP_DIR, tmp_path / "gke")

    calls = stubs.calls()
    manifests = sorted((tmp_path / "gke").glob("*.yaml"))
    assert len(manifests) == len(runs) == len(calls)
    assert [c["argv"] for c in calls] == [["apply", "-f", str(tmp_path / "gke" / f"{job_name(r.name)}.yaml")]
                                          for r in runs]
    names = set()
    for run in runs:
        path = tmp_path / "gke" / f"{job_name(run.name)}.yaml"
        (doc,) = list(yaml.safe_load_all(path.read_text()))
        name = doc["metadata"]["name"]
        assert doc["kind"] == "JobSet" and DNS_LABEL.fullmatch(name) and len(name) <= 63, name
        assert doc["metadata"]["labels"]["llm-jax/sweep"] == "tiny"
        names.add(name)
        (replicated,) = doc["spec"]["replicatedJobs"]
        pod = replicated["template"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["llm-jax", "train"] and container["args"] == run.train_args()
        loads_as_planned(container["args"], run)
        # Pod 0 of this JobSet coordinates, under its own headless service.
        env = {e["name"]: e for e in container["env"]}
        assert env["LLM_JAX_COORDINATOR"]["value"] == f"{name}-{replicated['name']}-0-0.{name}:1234"
        (bucket,) = [v for v in pod["volumes"] if "csi" in v]
        assert bucket["csi"]["volumeAttributes"]["bucketName"] == BUCKET
        mount = [m for m in container["volumeMounts"] if m["name"] == bucket["name"]]
        assert mount[0]["mountPath"] == MOUNT_POINT and str(run.run_dir).startswith(MOUNT_POINT + "/")
    assert len(names) == len(runs)


def test_gke_tpu_template(runs, stubs, tmp_path, monkeypatch):
    """The TPU JobSet: the template's own arguments (config, run.dir, mesh) all give way to the run's."""
    template = filled_template(tmp_path, "jobset-tpu.yaml")
    template.write_text(template.read_text().replace("bucketName: BUCKET", f"bucketName: {BUCKET}"))
    monkeypatch.setenv("SWEEP_GKE_TEMPLATE", str(template))
    submit_runs("gke", runs[:1], SWEEP_DIR, tmp_path / "gke")
    (doc,) = yaml.safe_load_all((tmp_path / "gke" / f"{job_name(runs[0].name)}.yaml").read_text())
    (container,) = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    assert container["args"] == runs[0].train_args() and "network" not in doc["spec"]
    assert doc["metadata"]["annotations"]  # the template's exclusive-topology annotation stays


@pytest.mark.parametrize("bucket,match", [("", "placeholder bucket BUCKET"), (BUCKET, "PROJECT_ID")])
def test_gke_refuses_placeholders(runs, stubs, tmp_path, monkeypatch, bucket, match):
    """The shipped manifest as it is would make JobSets that can never start."""
    monkeypatch.setenv("BUCKET", bucket)
    with pytest.raises(UserError, match=match):
        submit_runs("gke", runs, SWEEP_DIR, tmp_path / "gke")
    assert stubs.calls() == [] and not (tmp_path / "gke").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda text: text.replace("kind: JobSet", "kind: Pod"), "is not a JobSet"),
    (lambda text: text.replace('command: ["llm-jax", "train"]', 'command: ["bash", "-c"]'), "needs one container"),
], ids=["not-a-jobset", "no-trainer"])
def test_gke_refuses_unusable_templates(runs, stubs, tmp_path, monkeypatch, edit, match):
    template = filled_template(tmp_path)
    template.write_text(edit(template.read_text()))
    monkeypatch.setenv("SWEEP_GKE_TEMPLATE", str(template))
    monkeypatch.setenv("BUCKET", BUCKET)
    with pytest.raises(UserError, match=match):
        submit_runs("gke", runs, SWEEP_DIR, tmp_path / "gke")
    assert stubs.calls() == []


@pytest.mark.parametrize("launcher", ["gke", "tpu"])
def test_bucket_launchers_need_the_sweep_under_the_mount(runs, stubs, tmp_path, monkeypatch, launcher):
    monkeypatch.setenv("SWEEP_GKE_TEMPLATE", str(filled_template(tmp_path)))
    monkeypatch.setenv("BUCKET", BUCKET)
    here = tmp_path / "sweep"
    moved = [dataclasses.replace(r, overrides=(f"run.dir={here}/runs/{r.name}", *r.overrides[1:])) for r in runs]
    with pytest.raises(UserError, match=f"under the bucket mount {MOUNT_POINT}") as exc:
        submit_runs(launcher, moved, here)
    assert "\n" not in str(exc.value) and str(here) in str(exc.value)
    assert stubs.calls() == [] and not (here / launcher).exists()


def test_job_names():
    assert job_name("gpt_C3e9_d16_L1") == "llm-jax-gpt-c3e9-d16-l1"
    assert job_name("gpt_C3.2e13_d64_L3") == "llm-jax-gpt-c3-2e13-d64-l3"
    long_a, long_b = "mamba2_hybrid_" * 5 + "C1e20_d4096_L48", "mamba2_hybrid_" * 5 + "C1e20_d4096_L64"
    cut = {job_name(long_a), job_name(long_b)}
    assert len(cut) == 2 and all(len(n) == 63 and DNS_LABEL.fullmatch(n) for n in cut)
    assert len(job_name(long_a, limit=40)) <= 40 and job_name(long_a) == job_name(long_a)


# --- TPU --------------------------------------------------------------------------------------


def wait_for(path: Path, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.2)
    pytest.fail(f"{path} never said {text!r}:\n{content}")


@pytest.fixture
def tpu_env(stubs, monkeypatch):
    """The chains run in the background; whatever a failing test leaves running is stopped."""
    monkeypatch.setenv("BUCKET", BUCKET)
    monkeypatch.setenv("ZONE", "us-west4-a")
    monkeypatch.setenv("ACCELERATOR_TYPE", "v5litepod-8")
    # Cloned on the workers: no tarball of this checkout per run.
    monkeypatch.setenv("REPO_URL", "https://example.com/llm-jax.git")
    stubs.reply(**{"gcloud describe": "ACTIVE"})  # `wait` polls describe until ACTIVE
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def submit_tpu(runs: list[PlannedRun], stubs: Stubs, tmp_path: Path, pids: list[int], capsys) -> None:
    submit_runs("tpu", runs, SWEEP_DIR, tmp_path / "tpu")
    out = capsys.readouterr().out
    pids += [int(p) for p in re.findall(r"\(pid (\d+),", out)]
    assert len(pids) == len(runs), out
    for run in runs:
        wait_for(tmp_path / "tpu" / f"{job_name(run.name)}.log", f"sweep run {run.name}: training started")


def test_tpu_one_queued_resource_per_run(runs, stubs, tmp_path, tpu_env, capsys):
    submit_tpu(runs, stubs, tmp_path, tpu_env, capsys)
    calls = stubs.calls("gcloud")
    for run in runs:
        name = job_name(run.name)
        mine = [c["argv"] for c in calls if c["argv"][4:5] == [name]]
        assert [a[:4] for a in mine] == [["compute", "tpus", "queued-resources", verb]
                                         for verb in ("create", "describe", "ssh", "ssh")], mine
        create, describe, setup, train = mine
        assert flag(create, "accelerator-type") == "v5litepod-8" and flag(create, "node-id") == name
        assert all(flag(a, "zone") == "us-west4-a" for a in mine)
        assert "--format=value(state.state)" in describe
        setup_command = flag(setup, "command")
        assert "git clone https://example.com/llm-jax.git" in setup_command
        assert f"gcsfuse --implicit-dirs --rename-dir-limit=200000 {BUCKET} {MOUNT_POINT}" in setup_command
        # Every worker trains, with the run's arguments: run.dir once, from RUN_DIR, where planned.
        assert "--node=all" in train and "--worker=all" in train
        args = train_args(train)
        assert args == run.train_args()
        assert [a for a in args if a.startswith("run.dir=")] == [f"run.dir={run.run_dir}"]
        loads_as_planned(args, run)
        words = shell_words(flag(train, "command"))
        assert words.index("gcsfuse") < words.index(".venv/bin/llm-jax")  # mounted before training


def test_tpu_chain_script(runs, stubs, tmp_path, tpu_env, capsys):
    """DIR/tpu/NAME.sh passes shellcheck, and with arguments is tpu_queued.sh for its run."""
    submit_tpu(runs[:1], stubs, tmp_path, tpu_env, capsys)
    name = job_name(runs[0].name)
    script = tmp_path / "tpu" / f"{name}.sh"
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if shellcheck.is_file():
        proc = subprocess.run([str(shellcheck), "-s", "bash", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    stubs.log.unlink()
    proc = subprocess.run([BASH, str(script), "delete"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (call,) = stubs.calls()
    assert call["argv"][:5] == ["compute", "tpus", "queued-resources", "delete", name]
    assert "--force" in call["argv"] and flag(call["argv"], "zone") == "us-west4-a"


def test_tpu_chain_deletes_the_queued_resource_once_its_run_finished(stubs, tmp_path, tpu_env, monkeypatch, capsys):
    """The chain polls the run directory (the bucket, mounted here too) and deletes the queued
    resource when the run's final evaluation is there: not before."""
    mount = tmp_path / "mnt"
    monkeypatch.setattr(launchers, "MOUNT_POINT", str(mount))
    monkeypatch.setenv("SWEEP_TPU_POLL", "0.2")
    (run,) = plan_sweep(load_spec("isoflop_tiny"), mount / "sweeps" / "tiny").runs[:1]
    submit_tpu([run], stubs, tmp_path, tpu_env, capsys)
    name = job_name(run.name)
    log = tmp_path / "tpu" / f"{name}.log"
    run.run_dir.mkdir(parents=True)
    metrics = run.run_dir / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": run.steps, "loss": 3.0}) + "\n"  # a train line: not finished
                       + json.dumps({"step": run.steps - 1, "eval_loss": 2.9}) + "\n")
    time.sleep(1.0)  # five polls
    assert "deleted" not in log.read_text()
    assert not any("delete" in c["argv"] for c in stubs.calls("gcloud"))
    with metrics.open("a") as handle:
        handle.write(json.dumps({"step": run.steps, "eval_loss": 2.5}) + "\n")
    wait_for(log, f"sweep run {run.name}: finished; queued resource {name} deleted")
    deletes = [c["argv"] for c in stubs.calls("gcloud") if "delete" in c["argv"]]
    assert [a[:5] for a in deletes] == [["compute", "tpus", "queued-resources", "delete", name]]


def test_tpu_keep_leaves_the_queued_resource(runs, stubs, tmp_path, tpu_env, monkeypatch, capsys):
    monkeypatch.setenv("SWEEP_TPU_KEEP", "1")
    submit_tpu(runs[:1], stubs, tmp_path, tpu_env, capsys)
    chain = (tmp_path / "tpu" / f"{job_name(runs[0].name)}.sh").read_text()
    assert "delete" not in chain.split("set -euo pipefail", 1)[1].replace('"$@"', "")


def test_tpu_needs_a_bucket(runs, stubs, tmp_path):
    with pytest.raises(UserError, match="BUCKET"):
        submit_runs("tpu", runs, SWEEP_DIR, tmp_path / "tpu")
    assert stubs.calls() == []


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher,command", [("slurm", "sbatch"), ("gke", "kubectl"), ("tpu", "gcloud")])
def test_missing_command(runs, stubs, tmp_path, monkeypatch, launcher, command):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=f"the {launcher} launcher needs the `{command}` command"):
        submit_runs(launcher, runs, SWEEP_DIR, tmp_path / launcher)


@pytest.mark.parametrize("launcher", ["slurm", "gke", "tpu"])
def test_failing_submission(runs, stubs, tmp_path, monkeypatch, launcher):
    monkeypatch.setenv("SWEEP_GKE_TEMPLATE", str(filled_template(tmp_path)))
    monkeypatch.setenv("BUCKET", BUCKET)
    monkeypatch.setenv("STUB_EXIT", "1")
    submitted = []
    with pytest.raises(UserError, match="failed \\(exit 1\\): .*: error: the stub fails as asked") as exc:
        submit_runs(launcher, runs, SWEEP_DIR, tmp_path / launcher, submitted=submitted.append)
    assert "\n" not in str(exc.value)
    assert len(stubs.calls()) == 1  # the first submission failed; nothing after it was tried
    assert submitted == []  # so no run counts as submitted


@pytest.mark.parametrize("launcher", ["gke", "tpu"])
def test_submission_failing_part_way_reports_the_jobs_it_made(runs, stubs, tmp_path, monkeypatch, launcher):
    monkeypatch.setenv("SWEEP_GKE_TEMPLATE", str(filled_template(tmp_path)))
    monkeypatch.setenv("BUCKET", BUCKET)
    monkeypatch.setattr(launchers, "start_detached", lambda *args: 0)  # no TPU chains in the background
    real_command, commands = launchers.run_command, []

    def third_refused(argv, what, **kwargs):
        commands.append(argv)
        if len(commands) == 3:
            raise UserError(f"{what} failed (exit 1): quota exceeded")
        return real_command(argv, what, **kwargs)

    monkeypatch.setattr(launchers, "run_command", third_refused)
    submitted = []
    with pytest.raises(UserError, match="quota exceeded \\(2 of 6 runs were submitted before it\\)"):
        submit_runs(launcher, runs, SWEEP_DIR, tmp_path / launcher, submitted=submitted.append)
    assert submitted == runs[:2]


# --- the command ------------------------------------------------------------------------------


def test_cli_sweep_on_slurm(stubs, tmp_path, monkeypatch, capsys):
    def no_local_runs(*args):
        raise AssertionError("a cluster sweep trained here")

    monkeypatch.setattr(sweep, "_run_local", no_local_runs)
    stubs.reply(sbatch="777")
    sweep_dir = tmp_path / "tiny"
    assert cli.main(["sweep", "isoflop_tiny", "--dir", str(sweep_dir), "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "submitted 6 runs through the slurm launcher" in out
    assert f"llm-jax sweep isoflop_tiny --dir {sweep_dir} --collect" in out
    assert "job array 777" in out
    (call,) = stubs.calls()  # one sbatch, no srun or anything else
    assert call["tool"] == "sbatch" and "--array=0-5" in call["argv"]
    lines = (sweep_dir / "slurm" / "runs-1.txt").read_text().splitlines()
    assert len(lines) == 6
    assert all(f"run.dir={sweep_dir.resolve()}/runs/" in line for line in lines)
    assert not (sweep_dir / "runs").exists()


def test_launchers_module_knows_the_launchers():
    assert set(sweep.LAUNCHERS) - {"local"} == {"slurm", "gke", "tpu"}
    with pytest.raises(UserError, match="no cluster launcher"):
        launchers.submit_runs("local", [], SWEEP_DIR)


def test_a_later_sweep_leaves_submitted_runs_to_their_jobs(stubs, tmp_path, monkeypatch, capsys):
    """Submitted runs are recorded; the same command again, on the cluster or here, starts none of
    them a second time (two jobs would train into one run directory) until --resubmit."""
    def no_local_runs(*args):
        raise AssertionError("a run submitted to the cluster was started here")

    monkeypatch.setattr(sweep, "_run_local", no_local_runs)
    stubs.reply(sbatch="777")
    sweep_dir = tmp_path / "tiny"
    command = ["sweep", "isoflop_tiny", "--dir", str(sweep_dir)]
    assert cli.main([*command, "--launcher", "slurm"]) == 0
    records = [json.loads(line) for line in (sweep_dir / sweep.SUBMITTED_RECORD).read_text().splitlines()]
    assert sorted(r["run"] for r in records) == sorted(r.name for r in plan_sweep(load_spec("isoflop_tiny"),
                                                                                    sweep_dir.resolve()).runs)
    assert {r["launcher"] for r in records} == {"slurm"}
    capsys.readouterr()
    assert cli.main([*command, "--launcher", "slurm"]) == 0
    assert cli.main(command) == 0
    assert capsys.readouterr().out.count("6 runs were submitted before") == 2
    assert len(stubs.calls("sbatch")) == 1
    assert cli.main([*command, "--launcher", "slurm", "--resubmit"]) == 0
    assert len(stubs.calls("sbatch")) == 2 and (sweep_dir / "slurm" / "runs-2.txt").is_file()
