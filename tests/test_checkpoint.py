"""Checkpoints: keep-N, a half-written step is never picked up, restore onto another mesh. (Real
SIGKILLs during saves, damaged steps and a full disk: test_faults_checkpoint.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import load_config
from llm_jax.runtime.checkpoint import Checkpointer


def _state(mesh, spec):
    sharding = NamedSharding(mesh, spec)
    return {"params": {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)},
            "step": jax.device_put(jnp.int32(3), NamedSharding(mesh, P()))}


def _abstract(state, mesh, spec):
    return {"params": {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, spec))},
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}


def test_keep_n_and_half_written_step_is_ignored(tmp_path):
    cfg = load_config(None, ["checkpoint.keep=2", "checkpoint.async_save=true"])
    mesh = jax.make_mesh((8,), ("data",))
    state = _state(mesh, P("data", None))
    ckpt = Checkpointer(tmp_path, cfg)
    for step in (5, 10, 15):
        ckpt.save(step, state, {"next_step": step}, cfg)
    ckpt.close()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 15]  # keep=2

    # A save cut off by a kill leaves only Orbax's temporary directory behind.
    partial = tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    reopened = Checkpointer(tmp_path, cfg)
    assert reopened.newest_sound_step() == 15
    restored, data = reopened.restore(15, _abstract(state, mesh, P("data", None)))
    assert data == {"next_step": 15}
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(64.0).reshape(8, 8))
    reopened.close()


def test_restore_onto_a_different_mesh(tmp_path):
    cfg = load_config(None, [])
    ckpt = Checkpointer(tmp_path, cfg)
    ckpt.save(1, _state(jax.make_mesh((8,), ("data",)), P("data", None)), {"next_step": 1}, cfg)
    ckpt.close()
    other = jax.make_mesh((2, 4), ("a", "b"))
    restored, _ = Checkpointer(tmp_path, cfg).restore(1, _abstract(None, other, P("b", "a")))
    w = restored["params"]["w"]
    assert w.sharding.spec == P("b", "a") and len(w.addressable_shards) == 8
    np.testing.assert_array_equal(w, np.arange(64.0).reshape(8, 8))
