"""The cluster launchers of `llm-jax sweep --launcher slurm|gke|tpu`: every planned run becomes a
job through the scripts and manifests in launch/ (launch/README.md, "Sweeps on a cluster").

- slurm: the whole batch is one job array of launch/slurm/sweep.sbatch; task i trains the run on
  line i of DIR/slurm/runs-N.txt.
- gke: one JobSet per run, made from launch/gke/jobset-gpu.yaml (or $SWEEP_GKE_TEMPLATE), written
  to DIR/gke/NAME.yaml and applied with kubectl.
- tpu: one queued resource per run through launch/tpu_queued.sh: `create` here and now, then
  `wait`, `setup` and `train` chained in DIR/tpu/NAME.sh, started in the background, which deletes
  the queued resource once the run has finished.

The sweep only submits; `llm-jax sweep SPEC --dir DIR --collect` reads the results later. So run
directories must be where both the jobs and this machine see them: a shared filesystem for
SLURM, the bucket mounted at /mnt/llm-jax for GKE and TPU.
"""

from __future__ import annotations

import copy
import hashlib
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from llm_jax.config.loader import read_yaml
from llm_jax.errors import UserError
from llm_jax.scaling.plan import PlannedRun

# Where the TPU scripts and the GKE manifests mount the bucket (launch/tpu_common.sh).
MOUNT_POINT = "/mnt/llm-jax"
# The checkout this package is imported from: launch/ sits beside llm_jax/ (an editable install).
PACKAGE_CHECKOUT = Path(__file__).resolve().parents[2]
# JobSet and queued-resource names are DNS-1123 labels: at most 63 lowercase alphanumerics and
# '-'; the prefix also makes them start with a letter and tells them apart from other jobs.
NAME_PREFIX = "llm-jax-"
DNS_LABEL_MAX = 63
SWEEP_LABEL = "llm-jax/sweep"
# tpu_queued.sh's settings, written into each run's chain script so that it (and a later
# `DIR/tpu/NAME.sh delete`) reaches the same zone, project and bucket as the submission did.
TPU_SETTINGS = ("ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "BUCKET", "REPO_URL", "SPOT",
                "NODE_COUNT", "PYTHON_VERSION")
# A bare bucket name, as tpu_common.sh's require_bucket accepts it.
BUCKET_NAME = re.compile(r"[a-z0-9._-]+")


# Told of each run as soon as its job is submitted (the sweep records it; see sweep.py).
Submitted = Callable[[PlannedRun], None]


def submit_runs(launcher: str, runs: list[PlannedRun], sweep_dir: Path, files_dir: Path | None = None,
                submitted: Submitted | None = None) -> None:
    """Submit one job per run (one job array for SLURM). The job files (SLURM's list of runs,
    the manifests, the TPU chain scripts and logs) go to `files_dir`, by default DIR/LAUNCHER.
    `submitted(run)` is called for each run once its job is in, also when a later one fails."""
    submitters = {"slurm": submit_slurm, "gke": submit_gke, "tpu": submit_tpu}
    if launcher not in submitters:
        raise UserError(f"no cluster launcher {launcher!r}; choose one of {', '.join(submitters)}")
    if runs:
        submitters[launcher](runs, sweep_dir, files_dir or sweep_dir.resolve() / launcher,
                             submitted or (lambda run: None))


# --- shared -----------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def checkout() -> Path:
    """The llm-jax checkout whose launch/ directory submits the jobs: $LLM_JAX_DIR, as in the
    sbatch scripts, else the one this package comes from. A wheel install has no launch/."""
    root = Path(os.environ.get("LLM_JAX_DIR") or PACKAGE_CHECKOUT)
    if not (root / "launch").is_dir():
        raise UserError(f"no launch/ directory in {root}: cluster sweeps need the llm-jax source checkout "
                        "(pip install -e .), or LLM_JAX_DIR set to one")
    return root


def require_command(name: str, launcher: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"the {launcher} launcher needs the `{name}` command, which is not on PATH")
    return path


def run_command(argv: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a submission command and return its stdout; a failure is a UserError that quotes the
    last line of its stderr (where sbatch, kubectl and gcloud say what went wrong)."""
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise UserError(f"{what} failed (exit {proc.returncode}): {lines[-1].strip()}")
    return proc.stdout


def next_free(directory: Path, pattern: str) -> Path:
    """directory/pattern with the first counter 1, 2, ... not taken: each submission keeps its own file."""
    n = 1
    while (directory / pattern.format(n)).exists():
        n += 1
    return directory / pattern.format(n)


def under_mount(path: Path) -> bool:
    # normpath, so that /mnt/llm-jax/../x does not pass for a path in the bucket.
    return posixpath.normpath(str(path)).startswith(MOUNT_POINT + "/")


def require_mount(runs: list[PlannedRun], sweep_dir: Path, launcher: str) -> None:
    """GKE pods and TPU workers see the bucket at MOUNT_POINT only, so every run directory must lie
    there; and --collect reads them on this machine, so the bucket must be mounted here too."""
    if not all(under_mount(run.run_dir) for run in runs):
        raise UserError(f"the {launcher} launcher needs the sweep directory under the bucket mount {MOUNT_POINT}, "
                        f"where its jobs write (got {sweep_dir}); mount the bucket at {MOUNT_POINT} here too "
                        "(gcsfuse), so that --collect can read the results, and use --dir "
                        f"{MOUNT_POINT}/sweeps/NAME")


def job_name(run_name: str, limit: int = DNS_LABEL_MAX) -> str:
    """A DNS-1123 label for a run's JobSet or queued resource: llm-jax-gpt-c3e9-d16-l1. The same
    run always gets the same name, so a resubmission finds the job it made before. Too long a
    name is cut and given a hash of the whole run name, which keeps cut names apart."""
    name = NAME_PREFIX + re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")
    if len(name) > limit:
        digest = hashlib.sha1(run_name.encode()).hexdigest()[:8]
        name = f"{name[: limit - len(digest) - 1].rstrip('-')}-{digest}"
    return name


def job_names(runs: list[PlannedRun], limit: int = DNS_LABEL_MAX) -> list[str]:
    names = [job_name(run.name, limit) for run in runs]
    seen: dict[str, str] = {}
    for run, name in zip(runs, names):
        if name in seen:  # only run names differing in case or punctuation, which plans do not make
            raise UserError(f"runs {seen[name]} and {run.name} would both be submitted as {name}")
        seen[name] = run.name
    return names


def failed_after(exc: UserError, done: int, total: int) -> UserError:
    """The error of a submission that stopped part-way: the earlier runs are already submitted."""
    return UserError(f"{exc} ({done} of {total} runs were submitted before it)")


# --- SLURM ------------------------------------------------------------------------------------


def slurm_array(count: int) -> str:
    """0-(count-1), throttled to SWEEP_MAX_PARALLEL tasks at once when that is set."""
    limit = os.environ.get("SWEEP_MAX_PARALLEL", "").strip()
    if not limit:
        return f"0-{count - 1}"
    if not limit.isdigit() or int(limit) < 1:
        raise UserError(f"SWEEP_MAX_PARALLEL must be a positive whole number of SLURM tasks, got {limit!r}")
    return f"0-{count - 1}%{int(limit)}"


def write_runs_file(runs: list[PlannedRun], files_dir: Path) -> Path:
    """One line per run: its `llm-jax train` arguments, shell-quoted (shlex.join), so a line can
    be read, or pasted after `llm-jax train`. sweep.sbatch splits it back with shlex.split."""
    for run in runs:
        if any("\n" in arg for arg in run.train_args()):
            raise UserError(f"run {run.name}: an argument holds a line break, which the SLURM list of runs "
                            "(one line per run) cannot carry")
    path = next_free(files_dir, "runs-{}.txt")
    path.write_text("".join(shlex.join(run.train_args()) + "\n" for run in runs), encoding="utf-8")
    return path


def submit_slurm(runs: list[PlannedRun], sweep_dir: Path, files_dir: Path, submitted: Submitted) -> None:
    sbatch = require_command("sbatch", "slurm")
    root = checkout()
    logs = files_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs_file = write_runs_file(runs, files_dir)
    # From the checkout: sweep.sbatch finds .venv through the submit directory, as train.sbatch
    # does. Task logs go beside the list of runs rather than into the checkout.
    argv = [sbatch, "--parsable", f"--array={slurm_array(len(runs))}", "--job-name=llm-jax-sweep",
            f"--output={logs / '%x-%A_%a.out'}", *shlex.split(os.environ.get("SWEEP_SBATCH_ARGS", "")),
            "launch/slurm/sweep.sbatch", str(runs_file)]
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    job = run_command(argv, "sbatch (slurm launcher)", cwd=root).strip().split(";")[0]
    say(f"slurm: job array {job or '(no id printed)'}: {len(runs)} runs listed in {runs_file}, logs in {logs}")
    for i, run in enumerate(runs):
        submitted(run)
        say(f"  {job}_{i} {run.name}" if job else f"  task {i} {run.name}")


# --- GKE --------------------------------------------------------------------------------------


def load_template(path: Path) -> dict[str, Any]:
    """The JobSet every run's manifest is made from, checked for what the sweep changes in it."""
    if not path.is_file():
        raise UserError(f"GKE JobSet template {path} does not exist (SWEEP_GKE_TEMPLATE)")
    doc = read_yaml(path)
    found: list[dict[str, Any]] = []
    try:
        # Walk every part the sweep reads or changes, so that a malformed template is one error.
        if doc["kind"] == "JobSet" and doc["metadata"]["name"] and doc["spec"]["replicatedJobs"]:
            jobset_name_limit(doc)
            bucket_volumes(doc)
            found = containers(doc)
    except (KeyError, TypeError, IndexError, AttributeError):
        found = []
    if not found:
        raise UserError(f"GKE template {path} is not a JobSet with metadata.name and replicatedJobs of pod "
                        "templates with containers")
    if len([c for c in found if c.get("command") == ["llm-jax", "train"]]) != 1:
        raise UserError(f"GKE template {path} needs one container with command: [\"llm-jax\", \"train\"] "
                        "(the sweep sets its args)")
    return doc


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for rj in doc["spec"]["replicatedJobs"]
            for c in rj["template"]["spec"]["template"]["spec"].get("containers", [])]


def trainer(doc: dict[str, Any]) -> dict[str, Any]:
    """The container that runs `llm-jax train` (load_template checked there is one): the sweep
    replaces its args with a run's."""
    return next(c for c in containers(doc) if c.get("command") == ["llm-jax", "train"])


def bucket_volumes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """volumeAttributes of every Cloud Storage FUSE CSI volume."""
    return [v["csi"].setdefault("volumeAttributes", {}) for rj in doc["spec"]["replicatedJobs"]
            for v in rj["template"]["spec"]["template"]["spec"].get("volumes", [])
            if v.get("csi", {}).get("driver") == "gcsfuse.csi.storage.gke.io"]


def fill_placeholders(doc: dict[str, Any], path: Path) -> None:
    """Put $BUCKET (the TPU launchers' setting) into the bucket volumes, and refuse a template
    still holding the shipped placeholders: each of its JobSets would fail on the cluster."""
    bucket = os.environ.get("BUCKET", "").removeprefix("gs://").rstrip("/")
    for attributes in bucket_volumes(doc):
        if bucket:
            attributes["bucketName"] = bucket
        if attributes.get("bucketName") in (None, "", "BUCKET"):
            raise UserError(f"GKE template {path} mounts the placeholder bucket BUCKET: set BUCKET=NAME, or edit it "
                            "(or a copy named by SWEEP_GKE_TEMPLATE)")
    for container in containers(doc):
        if "PROJECT_ID" in str(container.get("image", "")):
            raise UserError(f"GKE template {path} runs the placeholder image {container['image']}: replace "
                            "PROJECT_ID there, or in a copy named by SWEEP_GKE_TEMPLATE")


def jobset_name_limit(doc: dict[str, Any]) -> int:
    """The longest JobSet name whose pod hostnames, <jobset>-<replicatedJob>-<job>-<pod>, are
    still DNS labels: the GPU template reaches its coordinator through pod 0's hostname."""
    suffixes = [f"-{rj['name']}-{rj.get('replicas', 1) - 1}-{rj['template']['spec'].get('parallelism', 1) - 1}"
                for rj in doc["spec"]["replicatedJobs"]]
    return DNS_LABEL_MAX - max(len(s) for s in suffixes)


def sweep_label(sweep_dir: Path) -> str:
    """A label value naming the sweep (its directory's name), so that `kubectl get jobset -l
    llm-jax/sweep=NAME` lists its jobs; label values allow [A-Za-z0-9_.-], 63 at most."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", sweep_dir.resolve().name)[:DNS_LABEL_MAX].strip("-_.") or "sweep"


def rename_coordinator(doc: dict[str, Any], name: str) -> None:
    """Point LLM_JAX_COORDINATOR (the GPU template's pod 0, <jobset>-<job>-0-0.<subdomain>:PORT)
    at the renamed JobSet, whose pods and headless service are renamed with it."""
    network = doc["spec"].get("network", {})
    if "subdomain" in network:  # one headless service per JobSet: a shared name would clash
        network["subdomain"] = name
    first_job = doc["spec"]["replicatedJobs"][0]["name"]
    for container in containers(doc):
        for var in container.get("env", []):
            if var.get("name") == "LLM_JAX_COORDINATOR" and "value" in var:
                port = var["value"].rsplit(":", 1)[1] if ":" in var["value"] else "1234"
                var["value"] = f"{name}-{first_job}-0-0.{network.get('subdomain', name)}:{port}"


def jobset_for(template: dict[str, Any], run: PlannedRun, name: str, label: str) -> dict[str, Any]:
    """The template with the run's name and `llm-jax train` arguments. The template's own args
    (its config, run.dir, mesh) all go: a sweep's settings, batch size included, are the spec's,
    since the plan counted tokens with them; hardware settings belong in the spec's overrides."""
    doc = copy.deepcopy(template)
    doc["metadata"]["name"] = name
    doc["metadata"].setdefault("labels", {})[SWEEP_LABEL] = label
    rename_coordinator(doc, name)
    trainer(doc)["args"] = run.train_args()
    return doc


def submit_gke(runs: list[PlannedRun], sweep_dir: Path, files_dir: Path, submitted: Submitted) -> None:
    kubectl = require_command("kubectl", "gke")
    require_mount(runs, sweep_dir, "gke")
    path = Path(os.environ.get("SWEEP_GKE_TEMPLATE") or checkout() / "launch" / "gke" / "jobset-gpu.yaml")
    template = load_template(path)
    fill_placeholders(template, path)
    names = job_names(runs, jobset_name_limit(template))
    label = sweep_label(sweep_dir)
    files_dir.mkdir(parents=True, exist_ok=True)
    for i, (run, name) in enumerate(zip(runs, names)):
        manifest = files_dir / f"{name}.yaml"
        manifest.write_text(f"# {run.name}: written by `llm-jax sweep` from {path}\n"
                            + yaml.safe_dump(jobset_for(template, run, name, label), sort_keys=False))
        try:
            out = run_command([kubectl, "apply", "-f", str(manifest)], f"kubectl apply -f {manifest}")
        except UserError as exc:
            raise failed_after(exc, i, len(runs)) from None
        submitted(run)
        say(f"gke: {run.name}: {out.strip() or f'jobset {name} applied'}")


# --- TPU --------------------------------------------------------------------------------------


def require_bucket() -> None:
    """`setup` and `train` mount $BUCKET and stop without it; they run in the background, so
    check it before anything is created rather than in a log."""
    bucket = os.environ.get("BUCKET", "").removeprefix("gs://").rstrip("/")
    if not BUCKET_NAME.fullmatch(bucket):
        raise UserError(f"the tpu launcher needs BUCKET set to the Cloud Storage bucket the workers mount at "
                        f"{MOUNT_POINT} (BUCKET=my-bucket or gs://my-bucket); got {os.environ.get('BUCKET', '')!r}")


def tpu_train_args(run: PlannedRun) -> list[str]:
    """The run's arguments without its run.dir: tpu_queued.sh puts run.dir=$RUN_DIR right after
    the config itself, and RUN_DIR carries the run directory."""
    if not run.overrides or run.overrides[0] != f"run.dir={run.run_dir}":
        raise UserError(f"run {run.name}: its overrides do not start with run.dir")
    return [run.config, *run.overrides[1:]]


def chain_script(run: PlannedRun, name: str, script: Path) -> str:
    """DIR/tpu/NAME.sh: the rest of the run's life after `create`. With no arguments it waits for
    the queued resource, sets its workers up and starts training; with arguments it is
    tpu_queued.sh for this run (describe, logs, stop, delete, create), with the same settings."""
    settings = {"QR_NAME": name, "TPU_NAME": name, "RUN_DIR": str(run.run_dir),
                **{k: os.environ[k] for k in TPU_SETTINGS if os.environ.get(k)}}
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in settings.items())
    return (f"#!/usr/bin/env bash\n"
            f"# Sweep run {run.name} on the TPU queued resource {name}, written by `llm-jax sweep`.\n"
            f"# No arguments: wait until it is ACTIVE, set up its workers, start training.\n"
            f"# Arguments: a command of launch/tpu_queued.sh for this run (logs, stop, delete, ...).\n"
            f"set -euo pipefail\n{exports}"
            f"launcher={shlex.quote(str(script))}\n"
            f'if [ $# -gt 0 ]; then exec bash "$launcher" "$@"; fi\n'
            f'bash "$launcher" wait\nbash "$launcher" setup\n'
            f'bash "$launcher" train {shlex.join(tpu_train_args(run))}\n'
            f"echo {shlex.quote(f'sweep run {run.name}: training started on {name}')}\n"
            f"{delete_when_finished(run, name)}")


# How the chain script tells that its run has finished: the run's final evaluation is in its
# metrics.jsonl, which the bucket mount shows on this machine (the sweep's own test, final_eval).
FINISHED_CHECK = ("import sys; from pathlib import Path; from llm_jax.scaling.results import final_eval_in; "
                  "sys.exit(final_eval_in(Path(sys.argv[1]), int(sys.argv[2])) is None)")


def delete_when_finished(run: PlannedRun, name: str) -> str:
    """The chain's last part: poll the run directory (every $SWEEP_TPU_POLL seconds, default 300)
    until the run's final evaluation is there, then delete the queued resource, whose TPUs cost
    until then. SWEEP_TPU_KEEP=1 at submission keeps them; a run that crashes is never finished,
    so its queued resource stays for `DIR/tpu/NAME.sh logs`, and the chain keeps polling."""
    if os.environ.get("SWEEP_TPU_KEEP") == "1":
        return ""
    probe = shlex.join([sys.executable, "-c", FINISHED_CHECK, str(run.run_dir), str(run.steps)])
    return (f"echo {shlex.quote(f'waiting for {run.name} to finish, then deleting {name}')}\n"
            f"until {probe}; do sleep \"${{SWEEP_TPU_POLL:-300}}\"; done\n"
            f'bash "$launcher" delete\n'
            f"echo {shlex.quote(f'sweep run {run.name}: finished; queued resource {name} deleted')}\n")


def start_detached(script: Path, log: Path, cwd: Path) -> int:
    """Run `script` in the background, in its own session: it outlives the sweep command and a
    closed terminal (no SIGHUP), as `nohup` would. Its pid."""
    with open(log, "a") as out:  # appended: a rerun keeps the earlier attempt's output
        proc = subprocess.Popen(["bash", str(script)], cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def submit_tpu(runs: list[PlannedRun], sweep_dir: Path, files_dir: Path, submitted: Submitted) -> None:
    require_command("gcloud", "tpu")
    require_mount(runs, sweep_dir, "tpu")
    require_bucket()
    root = checkout()
    script = root / "launch" / "tpu_queued.sh"
    names = job_names(runs)
    files_dir.mkdir(parents=True, exist_ok=True)
    for i, (run, name) in enumerate(zip(runs, names)):
        chain = files_dir / f"{name}.sh"
        chain.write_text(chain_script(run, name, script))
        chain.chmod(0o755)
        env = {**os.environ, "QR_NAME": name, "TPU_NAME": name, "RUN_DIR": str(run.run_dir)}
        # `create` in the foreground: a refusal (quota, zone, a name still taken) shows now.
        try:
            run_command(["bash", str(script), "create"], f"tpu_queued.sh create {name}", cwd=root, env=env)
        except UserError as exc:
            raise failed_after(exc, i, len(runs)) from None
        submitted(run)  # the queued resource exists: submitting again would only be refused
        log = files_dir / f"{name}.log"
        pid = start_detached(chain, log, root)
        say(f"tpu: {run.name}: queued resource {name} created; wait, setup, train go on in the background "
            f"(pid {pid}, log {log})")
    if os.environ.get("SWEEP_TPU_KEEP") == "1":  # then nothing deletes them, and their TPUs cost until then
        say(f"tpu: SWEEP_TPU_KEEP=1: each queued resource keeps its TPUs after training; delete it with "
            f"{files_dir}/NAME.sh delete once --collect lists its run")
    else:
        say("tpu: each chain deletes its queued resource once its run has finished (the final evaluation is in "
            "its run directory); keep this machine up until then, or delete them yourself with "
            f"{files_dir}/NAME.sh delete")
