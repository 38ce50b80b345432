"""Where a process learns its place in a multi-process run: flags, then environment, then cluster."""

import pytest

from llm_jax.errors import UserError
from llm_jax.parallel.distributed import Placement, resolve_placement

ENV = {"LLM_JAX_COORDINATOR": "10.0.0.1:1234", "LLM_JAX_NUM_PROCESSES": "4", "LLM_JAX_PROCESS_ID": "3"}


def test_flags_win_over_the_environment():
    placement = resolve_placement("host:99", 2, 1, environ=ENV)
    assert placement == Placement("host:99", 2, 1, source="flags")


def test_environment_gives_the_placement():
    assert resolve_placement(environ=ENV) == Placement("10.0.0.1:1234", 4, 3, source="environment")


def test_nothing_set_is_a_single_process():
    placement = resolve_placement(environ={})
    assert placement.coordinator is None and not placement.auto


def test_one_process_needs_no_coordinator():
    assert resolve_placement(num_processes=1, environ={}).coordinator is None


@pytest.mark.parametrize("flags, message", [
    (("host:1", 2, None), "--process-id missing"),
    ((None, 2, 0), "--coordinator missing"),
    (("host:1", 2, 2), "--process-id=2 must be in [0, --num-processes=2)"),
    (("host", 2, 0), "--coordinator='host' must be HOST:PORT"),
])
def test_incomplete_or_wrong_flags_are_named(flags, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        resolve_placement(*flags, environ={})


def test_a_non_numeric_environment_value_is_named():
    with pytest.raises(UserError, match="LLM_JAX_NUM_PROCESSES must be an integer"):
        resolve_placement(environ={**ENV, "LLM_JAX_NUM_PROCESSES": "four"})
