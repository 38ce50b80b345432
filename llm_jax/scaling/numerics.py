"""What the fits share: the bootstrap's defaults, one BLAS thread for their small linear algebra,
and None in place of the numbers JSON cannot hold."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, TypeVar

from threadpoolctl import threadpool_limits

# Approaches 2 and 3 resample alike, so one seed makes the whole fit deterministic.
DEFAULT_RESAMPLES = 200
DEFAULT_SEED = 0

Fitted = TypeVar("Fitted")


def one_blas_thread(fit: Callable[..., Fitted]) -> Callable[..., Fitted]:
    """Run `fit` with OpenBLAS on one thread. L-BFGS-B's and polyfit's linear algebra is on 5x5
    matrices, and OpenBLAS's threads then cost far more than the work: on a busy 2-core machine
    one L-BFGS-B run took 0.8 s threaded and 12 ms on one thread."""

    @functools.wraps(fit)
    def limited(*args: Any, **kwargs: Any) -> Fitted:
        with threadpool_limits(limits=1, user_api="blas"):
            return fit(*args, **kwargs)

    return limited


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def exp_or_none(log_value: float | None) -> float | None:
    """e^log_value; None when unavailable or beyond the float range (e^710 overflows)."""
    if log_value is None or not log_value < 700:
        return None
    return math.exp(log_value)
