"""Multi-process start-up and the agreements processes need: jax.distributed, stops, barriers.

A run is one process per host (or per launcher slot), all running the same `llm-jax train`.
How a process learns its place, first match wins:
1. flags `--coordinator HOST:PORT --num-processes N --process-id I`;
2. environment `LLM_JAX_COORDINATOR`, `LLM_JAX_NUM_PROCESSES`, `LLM_JAX_PROCESS_ID`;
3. a cluster JAX recognises (Cloud TPU VM or GKE TPU, SLURM, Open MPI, or JAX's own
   `JAX_COORDINATOR_ADDRESS`): `jax.distributed.initialize()` reads it;
4. otherwise a single process, and jax.distributed is not started.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm_jax.errors import UserError

ENV_COORDINATOR = "LLM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LLM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLM_JAX_PROCESS_ID"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where this process sits; `auto` leaves every field to JAX's cluster detection."""
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    source: str = "single process"

    @property
    def single_process(self) -> bool:
        """No coordinator and no cluster detection: jax.distributed is not started."""
        return not self.auto and self.coordinator is None


def _as_int(value: str | int | None, what: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{what} must be an integer, got {value!r}") from None


def _explicit(coordinator, num_processes, process_id, source: str, names: tuple[str, str, str]) -> Placement:
    given = dict(zip(names, (coordinator, num_processes, process_id)))
    missing = [name for name, value in given.items() if value is None]
    num = _as_int(num_processes, names[1])
    pid = _as_int(process_id, names[2])
    if num == 1 and coordinator is None and pid in (None, 0):
        return Placement(source=source)
    if missing:
        raise UserError(f"{', '.join(missing)} missing: a multi-process run needs all of {', '.join(names)}")
    if num < 1 or not 0 <= pid < num:
        raise UserError(f"{names[2]}={pid} must be in [0, {names[1]}={num})")
    if ":" not in coordinator:
        raise UserError(f"{names[0]}={coordinator!r} must be HOST:PORT")
    return Placement(coordinator, num, pid, source=source)


def cluster_detected() -> str | None:
    """The name of the cluster environment JAX would configure itself from, if any."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    try:
        from jax._src.clusters import ClusterEnv  # JAX's own registry of cluster environments
    except ImportError:  # moved in a newer JAX: fall back to the schedulers' variables
        return "SLURM" if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 else None
    for env in ClusterEnv._cluster_types:
        try:
            if not env.opt_in_only_method and env.is_env_present():
                return env.__name__
        except Exception:  # a probe that cannot run here (no metadata server, no mpi4py) is absent
            continue
    return None


def resolve_placement(coordinator: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None, environ: dict[str, str] | None = None) -> Placement:
    env = os.environ if environ is None else environ
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        return _explicit(coordinator, num_processes, process_id, "flags",
                         ("--coordinator", "--num-processes", "--process-id"))
    values = [env.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)]
    if any(v is not None for v in values):
        return _explicit(*values, "environment", (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))
    detected = cluster_detected() if environ is None else None
    if detected:
        return Placement(auto=True, source=f"auto-detected {detected}")
    return Placement()


def initialize(placement: Placement, timeout_s: int, connect_timeout_s: int) -> None:
    """Start jax.distributed for a multi-process placement (before any JAX computation).

    `timeout_s` is the heartbeat timeout: when a process dies, the coordination service tells
    the others within about that long, and they exit with an error instead of waiting in a
    collective forever. CPU processes exchange collectives with gloo.
    """
    if placement.single_process:
        return

    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=placement.coordinator, num_processes=placement.num_processes,
            process_id=placement.process_id, initialization_timeout=connect_timeout_s,
            heartbeat_timeout_seconds=timeout_s, shutdown_timeout_seconds=max(timeout_s, 30))
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot join the multi-process run ({placement.source}): {first_line}") from None


def is_multiprocess() -> bool:
    return jax.distributed.is_initialized() and jax.process_count() > 1


def broadcast_flag(value: bool) -> bool:
    """Process 0's value of `value`, on every process (so all take the same branch)."""
    if not is_multiprocess():
        return value

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def broadcast_int(value: int) -> int:
    """Process 0's integer `value`, on every process."""
    if not is_multiprocess():
        return value
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def all_processes(value: bool) -> bool:
    """Whether `value` is true on every process (each process passes its own)."""
    if not is_multiprocess():
        return value
    return bool(np.all(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if is_multiprocess():
        multihost_utils.sync_global_devices(name)


class StopRequest:
    """SIGTERM (a preemption notice, `kill`, a scheduler's time limit) as a step all processes agree on.

    Multi-process: JAX's preemption service catches SIGTERM on any process and the processes
    agree on the first step they all reach after it. Single process: a Python handler sets a
    flag that the next step sees. `reached(step)` must be called after every step on every process.
    """

    def __init__(self) -> None:
        self._signalled = False
        self._previous = None
        self._multi = is_multiprocess()
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
