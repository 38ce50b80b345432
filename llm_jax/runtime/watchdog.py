"""A watchdog for hung steps (`train.step_timeout_s`): when no step completes within the timeout,
print one `error:` line, dump every thread's Python stack to stderr and end the process with
EXIT_CODE, so the launcher or scheduler restarts the job (which resumes from its checkpoint).

A step that never completes is usually a collective waiting for a peer that is alive but stuck
(a wedged host, a stopped process, a device that stopped answering): the coordination service's
heartbeat sees nothing wrong, and without a watchdog the run waits forever.

Two mechanisms, because a stuck thread may or may not hold the GIL:
- a Python monitor thread prints the error line, dumps the stacks and exits with EXIT_CODE. JAX
  releases the GIL while it waits for devices (`block_until_ready`, transfers to the host), so
  this is the path taken when the main thread waits on a collective;
- `faulthandler.dump_traceback_later`, whose C thread needs no GIL, backs it up `backstop_s` later:
  if the monitor cannot run (a C call holding the GIL, a lock the monitor waits on), that thread
  dumps the stacks under faulthandler's own header `Timeout (h:mm:ss)!` and exits with code 1.

`kick()` after every completed step costs a clock read; the backstop is re-armed (one
faulthandler call, some 40 us) at most every backstop_s / 2, so it always fires between
backstop_s / 2 and backstop_s after the monitor's deadline. A threading.Timer re-armed per step
was measured at 0.6 ms a step, which is why the monitor is one long-lived thread.
faulthandler keeps one pending dump per process: a Watchdog replaces any other user's.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from typing import TextIO

# Non-zero, and distinct from 1 (an unexpected exception), 2 (a user error) and 130 (Ctrl-C), so
# a log or a scheduler's policy can tell a hang from a crash; every launcher restarts on it.
EXIT_CODE = 3
BACKSTOP_S = 10.0
THREAD_NAME = "llm-jax-watchdog"


def _fileno(stream: TextIO | None) -> int:
    """The stream's file descriptor; stderr's (2) when it has none (pytest's capture, a notebook)."""
    try:
        return stream.fileno() if stream is not None else 2
    except (AttributeError, OSError, ValueError):
        return 2


class Watchdog:
    """Ends the process when `kick()` is not called for `timeout_s` seconds after the first kick.

    Nothing runs before the first `kick()`; `close()` stops it for good (call it on every exit
    path, or use the watchdog as a context manager). `what` names the unit of progress and `key`
    the setting, both for the error line.
    """

    def __init__(self, timeout_s: float, what: str = "training step", key: str = "train.step_timeout_s",
                 stream: TextIO | None = None, exit_code: int = EXIT_CODE, backstop_s: float = BACKSTOP_S):
        if timeout_s <= 0 or backstop_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} and backstop_s={backstop_s} must be positive")
        self.timeout_s, self.what, self.key = timeout_s, what, key
        self.exit_code, self.backstop_s = exit_code, backstop_s
        self._fd = _fileno(sys.stderr if stream is None else stream)
        self._deadline = 0.0
        self._backstop_armed_at = -float("inf")
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        """A step completed: the next has `timeout_s` from now. The first call starts the watchdog."""
        if self._closed.is_set():
            return
        now = time.monotonic()
        self._deadline = now + self.timeout_s  # one float store: the monitor reads it without a lock
        if now - self._backstop_armed_at >= self.backstop_s / 2:
            faulthandler.dump_traceback_later(self.timeout_s + self.backstop_s, exit=True, file=self._fd)
            self._backstop_armed_at = now
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name=THREAD_NAME, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Disarm both mechanisms; nothing fires afterwards. Safe to call more than once."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread is not None:
            faulthandler.cancel_dump_traceback_later()
            self._thread.join()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _watch(self) -> None:
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._expire()
            if self._closed.wait(remaining):
                return

    def _expire(self) -> None:
        # os.write and faulthandler write to the descriptor directly: a Python stream's lock may
        # be held by the stuck thread. Flushing the streams comes last, as it could block on one.
        os.write(self._fd, (f"error: no {self.what} completed in {self.timeout_s:g} s ({self.key}); dumping "
                            f"every thread's stack and exiting with code {self.exit_code} so the scheduler "
                            "restarts the job\n").encode())
        faulthandler.dump_traceback(file=self._fd, all_threads=True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.exit_code)
