"""A family registered here, in a test file, trains, shards and generates through the real CLI
without any other module knowing it: the registry is the only place families are named.

The family is a bigram LM (the next token depends on the current one only): an embedding, an MLP
and a tied output layer. It needs no cache, so `CausalDecoding` runs it with an empty one.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import TINY, losses

import llm_jax
from llm_jax.cli import main
from llm_jax.config import ModelConfig
from llm_jax.config import families as config_families
from llm_jax.config.families import ArchSpec
from llm_jax.models import base
from llm_jax.models.base import Dims, Family, ModelOutput, register
from llm_jax.models.decoding import CausalDecoding
from llm_jax.models.layers import MLP, Embed
from llm_jax.models.stack import matmul_params
from llm_jax.parallel.rules import constrain


class BigramLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, dims: Dims, rngs: nnx.Rngs):
        self.compute_dtype = dims.compute_dtype
        self.embed = Embed(dims.vocab_size, cfg.d_model, ("vocab", "embed"), rngs=rngs, std=cfg.init_std)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, "gelu", rngs=rngs, std=cfg.init_std, out_std=cfg.init_std,
                       use_bias=True)

    def init_cache(self, batch: int, slots: int, dtype) -> dict:
        return {}  # the next token depends on this one only: nothing to carry

    def __call__(self, tokens_BT, *, positions_BT=None, mask_BTS=None, cache=None, cache_index=None,
                 dropout_key=None) -> ModelOutput:
        dtype = jnp.dtype(self.compute_dtype)
        x_BTD = constrain(self.embed(tokens_BT, dtype), ("batch", "length", "embed"))
        logits_BTV = self.embed.attend(x_BTD + self.mlp(x_BTD), dtype)
        return ModelOutput(constrain(logits_BTV, ("batch", "length", "vocab")), cache, {})


BIGRAM = Family("bigram", {"bigram": ArchSpec(kind="decoder", objectives=("causal",), attends=lambda m: False)},
                build=BigramLM, flops_per_token=lambda cfg, shapes: 6 * matmul_params(cfg, shapes),
                decoding=CausalDecoding(), describe="a bigram LM registered by a test")


@pytest.fixture
def bigram_registered(monkeypatch):
    """The family registered for this test only (the registries are restored afterwards)."""
    monkeypatch.setattr(base, "_FAMILIES", dict(base._FAMILIES))
    monkeypatch.setattr(base, "_BY_ARCH", dict(base._BY_ARCH))
    monkeypatch.setattr(config_families, "ARCHS", dict(config_families.ARCHS))
    register(BIGRAM)


RUN = [*TINY, "model.arch=bigram", "model.d_model=32", "model.d_ff=64", "train.batch_size=8", "train.seq_len=32",
       "train.steps=12", "optim.warmup_steps=2", "optim.lr=1e-2", "checkpoint.every=0", "train.eval_batches=2"]


@pytest.mark.slow
def test_a_family_registered_in_a_test_file_trains_shards_and_generates(bigram_registered, tmp_path, capsys):
    data_parallel, sharded = tmp_path / "dp", tmp_path / "sharded"
    assert main(["train", "gpt_tiny", f"run.dir={data_parallel}", "mesh.data=8", *RUN]) == 0
    assert main(["train", "gpt_tiny", f"run.dir={sharded}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *RUN]) == 0
    ref, got = losses(data_parallel), losses(sharded)
    assert sorted(ref) == list(range(1, 13))
    assert np.mean([ref[11], ref[12]]) < ref[1] - 0.5, ref  # it learns the bigram statistics
    np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=1e-4)

    model = llm_jax.load(sharded)
    ids = model.tokenizer.encode("def ")
    greedy = model.generate(ids, max_new_tokens=6, temperature=0.0)
    # A bigram model's greedy continuation: each next token is the argmax after the previous one.
    want, token = [], ids[-1]
    for _ in range(6):
        token = int(np.argmax(model.logits([token])[0, -1, :model.tokenizer.vocab_size]))
        if token == model.tokenizer.eos_id:
            break
        want.append(token)
    assert greedy == want
    capsys.readouterr()
    assert main(["generate", str(sharded), "--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == ("def " + model.tokenizer.decode(want)).strip()


def test_an_unregistered_arch_is_refused_with_the_registered_ones(tmp_path, capsys):
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path}", "model.arch=bigram"]) == 2
    err = capsys.readouterr().err
    assert "unknown model.arch 'bigram'" in err and "gpt" in err and "mamba" in err
