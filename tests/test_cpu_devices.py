"""mesh.cpu_devices: how many host devices a CPU run asks for, and when it leaves JAX alone."""

import os

import pytest

from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.parallel.cpu_devices import cpu_device_count, split_cpu_host


def cfg(*overrides):
    return load_config("gpt_tiny", list(overrides))


@pytest.mark.parametrize("overrides, cores, expected", [
    (["mesh.cpu_devices=-1", "train.batch_size=12"], 2, 2),
    (["mesh.cpu_devices=-1", "train.batch_size=12"], 8, 6),     # 8 and 7 do not divide the batch
    (["mesh.cpu_devices=-1", "train.batch_size=3"], 2, 1),
    (["mesh.cpu_devices=-1", "train.batch_size=12", "train.grad_accum=2"], 8, 6),  # microbatch 6
    (["mesh.cpu_devices=-1", "train.batch_size=12", "mesh.tensor=2"], 8, 8),  # data 4 x tensor 2
    (["mesh.cpu_devices=-1", "train.batch_size=12", "mesh.data=2"], 16, 2),    # the mesh fixes 2
    (["mesh.cpu_devices=3", "train.batch_size=12"], 2, 3),     # explicit counts are taken as given
    (["mesh.cpu_devices=0"], 4, 1),
    ([], 4, 1),                                                # the default keeps JAX's one device
])
def test_cpu_device_count(overrides, cores, expected):
    assert cpu_device_count(cfg(*overrides), cores) == expected


def test_an_explicit_count_that_does_not_fit_is_refused():
    with pytest.raises(UserError, match=r"mesh.cpu_devices=5 does not fit: train.batch_size=12 .* size 5"):
        cpu_device_count(cfg("mesh.cpu_devices=5", "train.batch_size=12"), 2)


def test_split_leaves_forced_counts_and_multiprocess_runs_alone(monkeypatch):
    split = cfg("mesh.cpu_devices=2")
    # The test session forces 8 devices through XLA_FLAGS (conftest.py), which takes precedence.
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
    assert split_cpu_host(split, single_process=True) is None
    monkeypatch.setenv("XLA_FLAGS", "")
    assert split_cpu_host(split, single_process=False) is None
    assert split_cpu_host(cfg("mesh.cpu_devices=2", "mesh.dcn_data=2"), single_process=True) is None
