# shellcheck shell=bash
# Helpers shared by tpu_vm.sh and tpu_queued.sh; sourced, never run on its own.
#
# Both launchers do the same thing on every TPU host (worker) and differ only in how they reach
# the hosts (`gcloud compute tpus tpu-vm ssh` vs `gcloud compute tpus queued-resources ssh`), so
# the remote commands are built here once. Everything stays bash 3.2 compatible because these
# scripts run on the user's laptop, and macOS still ships bash 3.2.

# The checkout that gets copied to the workers: the repository this file lives in.
LAUNCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Where things live on each worker, relative to the remote user's home directory. The log and
# pid files sit outside the checkout so that re-running `setup` never touches a live run.
REMOTE_DIR="llm-jax"
REMOTE_LOG="llm-jax-train.log"
REMOTE_PID="llm-jax-train.pid"

# jax 0.10 needs Python >= 3.11 and the TPU VM images are Ubuntu 22.04 (Python 3.10), so setup
# fetches a standalone Python with uv instead of relying on the system one.
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"

# Optional: clone this URL on the workers instead of copying the local checkout.
REPO_URL="${REPO_URL:-}"

# llm-jax writes its run directory (config, metrics, TensorBoard, tokenizer, Orbax checkpoints)
# with ordinary file calls and refuses a gs:// run.dir, yet every host must write into the same
# directory. So every worker mounts the bucket with Cloud Storage FUSE at the same fixed path, and
# run.dir lives under it. Fixed rather than configurable so that a run directory has the same
# name on every host, in every launcher (the GKE manifests mount at this path too) and in docs.
MOUNT_POINT="/mnt/llm-jax"

# The bucket to mount: BUCKET=NAME or BUCKET=gs://NAME; checked by require_bucket.
BUCKET="${BUCKET:-}"

# Orbax writes each checkpoint into a temporary directory and renames it when complete. A FUSE
# mount of a flat-namespace bucket refuses to rename directories unless they have fewer
# descendants than this limit (the default is 0: never); a checkpoint has a few files per host.
# Buckets with hierarchical namespace rename folders natively and atomically and need no limit.
GCSFUSE_RENAME_DIR_LIMIT=200000

# Pack the local checkout (tracked and untracked-but-not-ignored files, so uncommitted edits
# travel too, while .venv and runs/ stay behind) into the tarball $1.
make_tarball() {
  local out="$1"
  (
    cd "$LAUNCH_ROOT" || exit 1
    # `git ls-files` also lists tracked files deleted in the working tree; tar would fail on
    # them, so keep only paths that exist.
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [ -e "$f" ]; then printf '%s\0' "$f"; fi
      done |
      tar --null -T - -czf "$out"
  )
}

# Sets BUCKET_NAME from BUCKET (gs:// prefix and trailing slash dropped) or exits with an error.
# Only a bare bucket name is accepted: gcsfuse mounts whole buckets, and the name goes into a
# remote shell command, so restricting it to bucket-name characters also keeps that safe.
require_bucket() {
  BUCKET_NAME="${BUCKET#gs://}"
  BUCKET_NAME="${BUCKET_NAME%/}"
  case "$BUCKET_NAME" in
    "" | *[!a-z0-9._-]*)
      echo "error: set BUCKET to the Cloud Storage bucket every worker mounts at $MOUNT_POINT," \
        "e.g. BUCKET=my-bucket or BUCKET=gs://my-bucket (a bucket name, no path); got '${BUCKET}'" >&2
      exit 2
      ;;
  esac
}

# Installs Cloud Storage FUSE from Google's apt repository, as its install guide does, unless it
# is already there (re-running setup must be cheap). DPkg::Lock::Timeout waits for the
# unattended upgrades a freshly booted TPU VM runs instead of failing on the apt lock. The
# explicit `|| exit` matters: `set -e` ignores a failure early in an && chain.
remote_install_gcsfuse_command() {
  printf '%s' \
    "if ! command -v gcsfuse >/dev/null; then " \
    "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && " \
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && " \
    "sudo apt-get -o DPkg::Lock::Timeout=600 update -q && " \
    "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse " \
    "|| { echo \"cannot install gcsfuse on \$(hostname)\" >&2; exit 1; }; fi"
}

# Mounts the bucket at MOUNT_POINT unless it is mounted already, so setup and every train may run
# it; a VM that was restarted (maintenance, Spot preemption of a queued resource that comes back)
# has lost its mounts. A mount whose gcsfuse process died reads as not mounted (its directory
# answers "Transport endpoint is not connected"), so it is detached first. gcsfuse runs as the
# login user, who then owns the files and is the one running llm-jax, and daemonizes, so the mount
# outlives the ssh session. Call require_bucket first.
remote_mount_command() {
  printf '%s' \
    "if ! mountpoint -q $MOUNT_POINT; then " \
    "if ! command -v gcsfuse >/dev/null; then echo \"gcsfuse is not installed on \$(hostname); run setup first\" >&2; exit 1; fi; " \
    "sudo umount -l $MOUNT_POINT 2>/dev/null || true; " \
    "sudo mkdir -p $MOUNT_POINT && sudo chown \"\$(id -u):\$(id -g)\" $MOUNT_POINT && " \
    "gcsfuse --implicit-dirs --rename-dir-limit=$GCSFUSE_RENAME_DIR_LIMIT $BUCKET_NAME $MOUNT_POINT " \
    "|| { echo \"cannot mount gs://$BUCKET_NAME at $MOUNT_POINT on \$(hostname)\" >&2; exit 1; }; fi"
}

# The shell script each worker runs for `setup`: install gcsfuse and mount the bucket, get the
# code, then make .venv with the TPU extra. $1 is "clone" (use REPO_URL) or "tarball" (unpack
# ~/llm-jax.tar.gz, copied by scp). The mount comes first so that a wrong BUCKET or missing
# bucket permissions fail within seconds, not after the install. Call require_bucket first.
remote_setup_command() {
  local fetch
  if [ "$1" = clone ]; then
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; else git clone $(printf '%q' "$REPO_URL") $REMOTE_DIR; fi"
  else
    fetch="mkdir -p $REMOTE_DIR && tar -xzf llm-jax.tar.gz -C $REMOTE_DIR && rm llm-jax.tar.gz"
  fi
  # `set -e` so a failed step stops the worker instead of installing into a half-made tree;
  # the venv is created only once, so re-running setup just updates the code and the install.
  printf '%s\n' \
    "set -e" \
    "$(remote_install_gcsfuse_command)" \
    "$(remote_mount_command)" \
    "$fetch" \
    "cd $REMOTE_DIR" \
    "if ! command -v uv >/dev/null && [ ! -x \"\$HOME/.local/bin/uv\" ]; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi" \
    "export PATH=\"\$HOME/.local/bin:\$PATH\"" \
    "if [ ! -x .venv/bin/python ]; then uv venv --seed --python $PYTHON_VERSION .venv; fi" \
    ".venv/bin/pip install --quiet -e '.[tpu]'" \
    ".venv/bin/llm-jax --help >/dev/null && echo \"llm-jax installed on \$(hostname)\""
}

# The command each worker runs for `train`: `llm-jax train CONFIG OVERRIDES...`, started in the
# background under nohup so that a dropped ssh connection (a laptop going to sleep) does not kill
# a run that lasts hours. The bucket is mounted first (run.dir lives there) and a failed mount
# stops the worker before training. Arguments are quoted with printf %q because gcloud hands the
# string to the remote login shell, which would otherwise split values such as
# `train.sample_prompt=def f`. The log is appended to, so the output of earlier attempts survives
# a resume. Call require_bucket first.
remote_train_command() {
  local args
  args="$(printf '%q ' "$@")"
  printf '%s' \
    "cd $REMOTE_DIR || exit 1; " \
    "if [ -f ~/$REMOTE_PID ] && kill -0 \"\$(cat ~/$REMOTE_PID)\" 2>/dev/null; then " \
    "echo \"llm-jax is already running on \$(hostname); stop it first\" >&2; exit 1; fi; " \
    "$(remote_mount_command); " \
    "nohup .venv/bin/llm-jax train ${args}>> ~/$REMOTE_LOG 2>&1 < /dev/null & " \
    "echo \$! > ~/$REMOTE_PID"
}

# SIGTERM makes llm-jax save a checkpoint and exit cleanly; re-running `train` resumes from it.
remote_stop_command() {
  printf '%s' \
    "if [ -f ~/$REMOTE_PID ] && kill -0 \"\$(cat ~/$REMOTE_PID)\" 2>/dev/null; then " \
    "kill -TERM \"\$(cat ~/$REMOTE_PID)\" && echo \"sent SIGTERM on \$(hostname)\"; " \
    "else echo \"not running on \$(hostname)\"; fi"
}

remote_logs_command() {
  printf '%s' "tail -n 100 -F ~/$REMOTE_LOG"
}

# `train`'s arguments: CONFIG (default gpt_small), run.dir, the launcher's own overrides ($2:
# space-separated words such as "mesh.dcn_data=2", or ""), then the user's overrides, which come
# last so that they win (a later override replaces an earlier one). run.dir is RUN_DIR, by default
# $MOUNT_POINT/runs/$1-CONFIG ($1: the TPU or queued resource's name): fixed for a given launcher
# and config, so running the same command again resumes. Fills the global array TRAIN_ARGS; $3...
# are the user's arguments after `train`.
build_train_args() {
  local run_prefix="$1" launcher_overrides="$2"
  shift 2
  local config="${1:-gpt_small}"
  if [ $# -gt 0 ]; then shift; fi
  local config_name="${config##*/}"
  config_name="${config_name%.yaml}"
  config_name="${config_name%.yml}"
  local run_dir="${RUN_DIR:-$MOUNT_POINT/runs/${run_prefix}-${config_name}}"
  case "$run_dir" in
    *://*)
      # llm-jax would refuse it only after the hosts started; say so here, with the fix.
      echo "error: RUN_DIR $run_dir is a URL, but llm-jax writes run.dir with ordinary file calls;" \
        "use a path under the bucket's mount on the workers, e.g. $MOUNT_POINT/runs/NAME" >&2
      exit 2
      ;;
    /*) ;;
    *)
      # A relative path would resolve inside ~/llm-jax on each worker's own disk: not shared.
      echo "error: RUN_DIR $run_dir must be an absolute path every worker shares, e.g. $MOUNT_POINT/runs/NAME" >&2
      exit 2
      ;;
  esac
  case "$run_dir" in
    "$MOUNT_POINT"/*) ;;
    *) echo "warning: RUN_DIR $run_dir is outside the bucket mount $MOUNT_POINT; it must be a" \
         "directory every worker shares (e.g. NFS you mounted yourself), or checkpoints break" >&2 ;;
  esac
  # SC2206: word splitting is wanted, the launcher's overrides hold no spaces; SC2034: the
  # callers read TRAIN_ARGS.
  # shellcheck disable=SC2206,SC2034
  TRAIN_ARGS=("$config" "run.dir=${run_dir}" $launcher_overrides "$@")
}
