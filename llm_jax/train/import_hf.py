"""`llm-jax import-hf`: a Hugging Face checkpoint as a new run directory whose step-0 train state
(parameters and fresh optimiser moments) is the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from llm_jax.config import validate
from llm_jax.data.chat_template import CONFIG_FILE as CHAT_CONFIG
from llm_jax.errors import UserError
from llm_jax.interop.convert import read_hf_model
from llm_jax.interop.files import TOKENIZER_FILE, hf_dir
from llm_jax.models.definition import model_def, param_shardings
from llm_jax.parallel.mesh import single_device_mesh
from llm_jax.runtime.checkpoint import Checkpointer
from llm_jax.runtime.run_dir import write_run_config
from llm_jax.train.optim import make_optimizer


def import_hf(hf_path: str | Path, run_path: str | Path) -> str:
    """Write a new run directory holding the Hugging Face model as its step-0 checkpoint; returns
    the adapter's name.

    `llm-jax generate RUN_DIR` and `llm_jax.load(RUN_DIR)` then use it, a new run starts from it
    with `checkpoint.init_from=RUN_DIR`, and `llm-jax train RUN_DIR/config.yaml` trains it on.
    """
    source, run_dir = hf_dir(hf_path), Path(run_path).expanduser()
    if run_dir.exists():
        raise UserError(f"{run_dir} already exists; import-hf writes only into a new directory")
    name, cfg, params = read_hf_model(source, str(run_dir))
    tokenizer = source / TOKENIZER_FILE
    if tokenizer.is_file():
        tree = cfg.to_dict()
        tree["data"]["tokenizer"] = f"hf:{tokenizer.resolve()}"
        cfg = validate(tree)
    mdef = model_def(cfg, cfg.model.vocab_size)
    params = jax.device_put(params, param_shardings(mdef, single_device_mesh()))
    state = {"params": params, "opt_state": jax.jit(make_optimizer(cfg).init)(params),
             "step": jnp.zeros((), jnp.int32)}
    run_dir.mkdir(parents=True)
    if tokenizer.is_file():
        (run_dir / "tokenizer").mkdir()
        shutil.copyfile(tokenizer, run_dir / "tokenizer" / TOKENIZER_FILE)
        if (source / CHAT_CONFIG).is_file():  # the chat template and special tokens
            shutil.copyfile(source / CHAT_CONFIG, run_dir / "tokenizer" / CHAT_CONFIG)
    write_run_config(cfg, run_dir)
    ckpt = Checkpointer(run_dir, cfg)
    ckpt.save(0, state, {"next_step": 0}, cfg, force=True)
    ckpt.close()
    return name
