"""Learning-rate schedules and the weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import load_config
from llm_jax.train.optim import decay_mask, make_schedule


def test_warmup_then_cosine_to_min_lr():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=10", "train.steps=110"])
    lr = make_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # half-way down the cosine
    assert float(lr(110)) == pytest.approx(1e-4)
    assert float(lr(500)) == pytest.approx(1e-4)  # holds min_lr after decay_steps


@pytest.mark.parametrize("schedule, mid", [("linear", 1e-4 + 0.5 * 9e-4), ("constant", 1e-3)])
def test_linear_and_constant(schedule, mid):
    cfg = load_config(None, [f"optim.schedule={schedule}", "optim.lr=1e-3", "optim.min_lr=1e-4",
                             "optim.warmup_steps=0", "train.steps=100"])
    assert float(make_schedule(cfg)(50)) == pytest.approx(mid, rel=1e-5)


def test_decay_mask_spares_norms_biases_and_embeddings():
    params = {"embed": {"embedding": jnp.ones((4, 2))},
              "blocks": {"mlp": {"up": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}},
                         "norm1": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}}
    mask = decay_mask(params, decay_embeddings=False)
    assert mask["blocks"]["mlp"]["up"] == {"kernel": True, "bias": False}
    assert mask["blocks"]["norm1"] == {"scale": False, "bias": False}
    assert mask["embed"]["embedding"] is False
    assert decay_mask(params, decay_embeddings=True)["embed"]["embedding"] is True
    assert np.all(np.asarray(params["embed"]["embedding"]) == 1)


def test_clip_by_norm_scales_to_the_limit_only_when_above():
    from llm_jax.train.optim import clip_by_norm

    grads = {"a": jnp.array([3.0, 4.0])}  # global norm 5
    np.testing.assert_allclose(clip_by_norm(grads, jnp.float32(5.0), 1.0)["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(clip_by_norm(grads, jnp.float32(5.0), 10.0)["a"], [3.0, 4.0])
    np.testing.assert_allclose(clip_by_norm(grads, jnp.float32(5.0), 0.0)["a"], [3.0, 4.0])
