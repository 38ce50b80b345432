"""Weights from elsewhere: `import-hf`, `export-hf` and `checkpoint.init_from`."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import hf
from llm_jax.config import Config, validate
from llm_jax.errors import UserError
from llm_jax.train.state import ModelDef

TOKENIZER_FILE = "tokenizer.json"
# Keys that change what the same parameter shapes compute; the shapes check covers the rest.
FUNCTION_KEYS = ("arch", "num_heads", "num_kv_heads", "position", "rope_theta", "norm", "norm_eps", "mlp",
                 "use_bias", "tie_embeddings")


def _hf_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not (path.is_dir() and hf.is_hf_dir(path)):
        raise UserError(f"{path} is not a Hugging Face checkpoint directory (config.json + model.safetensors)")
    return path


def import_hf(hf_path: str | Path, run_path: str | Path) -> str:
    """Write a new run directory holding the Hugging Face model as its step-0 checkpoint.

    `llm-jax generate RUN_DIR` and `llm_jax.load(RUN_DIR)` then use it, a new run starts from it
    with `checkpoint.init_from=RUN_DIR`, and `llm-jax train RUN_DIR/config.yaml` trains it on.
    """
    from llm_jax.api import hf_params, single_device_mesh
    from llm_jax.checkpoint import Checkpointer
    from llm_jax.run_dir import write_run_config
    from llm_jax.train.optim import make_optimizer
    from llm_jax.train.state import model_def, param_shardings

    source, run_dir = _hf_dir(hf_path), Path(run_path).expanduser()
    if run_dir.exists():
        raise UserError(f"{run_dir} already exists; import-hf writes only into a new directory")
    kind, cfg, params = hf_params(source, str(run_dir))
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
    write_run_config(cfg, run_dir)
    ckpt = Checkpointer(run_dir, cfg)
    ckpt.save(0, state, {"next_step": 0}, cfg, force=True)
    ckpt.close()
    return kind


def export_hf(run_path: str | Path, out_path: str | Path) -> str:
    """Write the newest checkpoint of a run as a Hugging Face directory (GPT-2, Llama, BERT or T5)."""
    from llm_jax.api import load

    out = Path(out_path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; export-hf writes only into a new or empty directory")
    model = load(run_path)
    cfg = model.config
    tree = cfg.to_dict()
    tree["model"]["vocab_size"] = model.vocab_size
    cfg = validate(tree)
    hf.family_of(cfg)  # refuse before writing anything
    tokenizer_json = None
    if cfg.data.tokenizer.startswith("hf:"):
        stored = Path(run_path).expanduser() / "tokenizer" / TOKENIZER_FILE
        tokenizer_json = stored if stored.is_file() else Path(cfg.data.tokenizer[3:]).expanduser()
        if hf.is_hf_dir(Path(run_path).expanduser()):
            tokenizer_json = Path(run_path).expanduser() / TOKENIZER_FILE
    eos = getattr(model.tokenizer, "eos_id", None)
    params = jax.tree.map(np.asarray, jax.device_get(model.params))
    return hf.write_hf(out, cfg, params, tokenizer_json, None if eos is None else int(eos), model.decoder_start_id)


def pretrained_params(cfg: Config, mdef: ModelDef, shardings: dict) -> dict:
    """`checkpoint.init_from`: parameters of another run's newest checkpoint or of a Hugging Face
    directory, placed on this run's shardings. The model must be the same network."""
    from llm_jax.api import hf_params
    from llm_jax.checkpoint import Checkpointer
    from llm_jax.run_dir import read_run_config

    source = Path(cfg.checkpoint.init_from).expanduser()
    if not source.is_dir():
        raise UserError(f"checkpoint.init_from: {source} is not a directory")
    if hf.is_hf_dir(source):
        _, source_cfg, params = hf_params(source)
    else:
        source_cfg, params = read_run_config(source), None
    diffs = [f"model.{k}: {getattr(source_cfg.model, k)!r} there, {getattr(cfg.model, k)!r} here"
             for k in FUNCTION_KEYS if getattr(source_cfg.model, k) != getattr(cfg.model, k)]
    if diffs:
        raise UserError(f"checkpoint.init_from {source} is a different model ({'; '.join(diffs[:4])})")
    want = jax.tree.map(lambda s: tuple(s.shape), mdef.shapes)
    if params is None:
        ckpt = Checkpointer(source, source_cfg, read_only=True)
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"checkpoint.init_from {source} has no complete checkpoint")
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                mdef.shapes, shardings)
        try:
            return ckpt.restore_params(step, abstract)
        except ValueError as exc:
            raise UserError(f"checkpoint.init_from {source}: parameters do not fit this model ({exc})") from None
        finally:
            ckpt.close()
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if got != want:
        raise UserError(f"checkpoint.init_from {source}: parameter shapes differ from this model's "
                        "(is model.vocab_size the checkpoint's?)")
    return jax.device_put(params, shardings)
