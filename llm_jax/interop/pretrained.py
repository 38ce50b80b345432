"""Weights from elsewhere, through the adapters: `export-hf` (a run, or a Hugging Face directory,
written as a Hugging Face directory) and `checkpoint.init_from` (a new run's parameters from
another run or a Hugging Face directory). `import-hf` writes a train state: `llm_jax.train.import_hf`."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from llm_jax.config import Config, read_run_config, validate
from llm_jax.data.tasks import classes_of
from llm_jax.data.tokenizer import HFTokenizer, decoder_start_id
from llm_jax.errors import UserError
from llm_jax.interop.convert import read_hf_model, write_hf_model
from llm_jax.interop.files import TOKENIZER_FILE, is_hf_dir
from llm_jax.models.definition import ModelDef, model_def, param_shardings
from llm_jax.parallel.rules import sharded_shapes
from llm_jax.runtime.checkpoint import Checkpointer
from llm_jax.runtime.restore import restore_params

# Keys that change what the same parameter shapes compute; the shapes check covers the rest.
FUNCTION_KEYS = ("arch", "num_heads", "num_kv_heads", "position", "rope_theta", "norm", "norm_eps", "mlp",
                 "use_bias", "tie_embeddings")


def export_hf(run_path: str | Path, out_path: str | Path) -> str:
    """Write a run's newest checkpoint (or a Hugging Face directory, re-written) as a Hugging Face
    directory; returns the adapter's name. A config no adapter exports is refused before anything
    is written."""
    out = Path(out_path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; export-hf writes only into a new or empty directory")
    source = Path(run_path).expanduser()
    tokenizer_json: Path | None = None
    if source.is_dir() and is_hf_dir(source):
        _, cfg, params = read_hf_model(source)
        if (source / TOKENIZER_FILE).is_file():
            tokenizer_json = source / TOKENIZER_FILE
        tokenizer = None if tokenizer_json is None else HFTokenizer(tokenizer_json)
    else:
        cfg, tokenizer, _, params, _ = restore_params(source)
        if cfg.data.tokenizer.startswith("hf:"):
            stored = source / "tokenizer" / TOKENIZER_FILE
            tokenizer_json = stored if stored.is_file() else Path(cfg.data.tokenizer[3:]).expanduser()
    tree = cfg.to_dict()
    tree["model"]["vocab_size"] = int(params["embed"]["embedding"].shape[0])  # the padded table, as trained
    cfg = validate(tree)
    eos = None if tokenizer is None else int(tokenizer.eos_id)
    start = 0 if tokenizer is None else decoder_start_id(tokenizer.eos_id, getattr(tokenizer, "token_id", None))
    params = jax.tree.map(np.asarray, jax.device_get(params))
    return write_hf_model(out, cfg, params, tokenizer_json, eos, start)


def check_init_from(cfg: Config) -> None:
    """A UserError unless checkpoint.init_from is a directory (a run or a Hugging Face checkpoint)."""
    source = Path(cfg.checkpoint.init_from).expanduser()
    if not source.is_dir():
        raise UserError(f"checkpoint.init_from: {source} is not a directory (a run directory to start from, "
                        "or a Hugging Face checkpoint); pretrain that run first or point init_from at one")


def pretrained_params(cfg: Config, mdef: ModelDef, shardings: dict, fresh: dict) -> tuple[dict, list[str]]:
    """`checkpoint.init_from`: parameters of another run's newest checkpoint or of a Hugging Face
    directory, placed on this run's shardings, and the names of this model's parameters that the
    source lacks (they keep their `fresh` initialisation).

    The networks must agree in FUNCTION_KEYS and in the shapes of every parameter they share;
    heads that only one side has are where they may differ: a masked-LM BERT starts a classifier
    (its MLM head is dropped, the pooler and classifier start fresh), as transformers'
    from_pretrained does.
    """
    check_init_from(cfg)
    source = Path(cfg.checkpoint.init_from).expanduser()
    if is_hf_dir(source):
        _, source_cfg, params = read_hf_model(source)
    else:
        source_cfg, params = read_run_config(source), None
    diffs = [f"model.{k}: {getattr(source_cfg.model, k)!r} there, {getattr(cfg.model, k)!r} here"
             for k in FUNCTION_KEYS if getattr(source_cfg.model, k) != getattr(cfg.model, k)]
    if diffs:
        raise UserError(f"checkpoint.init_from {source} is a different model ({'; '.join(diffs[:4])})")
    if params is None:
        ckpt = Checkpointer(source, source_cfg, read_only=True)
        try:
            step = ckpt.newest_sound_step()  # newer damaged steps are named in a warning, left in place
            if step is None:
                raise UserError(f"checkpoint.init_from {source} has no complete checkpoint")
            source_mdef = model_def(source_cfg, mdef.dims.vocab_size, classes_of(source_cfg))
            mesh = jax.tree.leaves(shardings)[0].mesh
            abstract = sharded_shapes(source_mdef.shapes, param_shardings(source_mdef, mesh))
            params = ckpt.restore_params(step, abstract)
        except ValueError as exc:
            raise UserError(f"checkpoint.init_from {source}: its checkpoint does not fit its config ({exc})") from None
        finally:
            ckpt.close()
    return _transfer(params, fresh, shardings, source)


def _transfer(source: dict, fresh: dict, shardings: dict, where: Path) -> tuple[dict, list[str]]:
    """`fresh` with every parameter `source` also has replaced by the source's, on `shardings`."""
    theirs = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(source)}
    missing, shared = [], 0

    def take(path, mine, sharding):
        nonlocal shared
        name = jax.tree_util.keystr(path)
        if name not in theirs:
            missing.append(name)
            return mine
        if tuple(theirs[name].shape) != tuple(mine.shape):
            raise UserError(f"checkpoint.init_from {where}: parameter {name} has shape {tuple(theirs[name].shape)} "
                            f"there, {tuple(mine.shape)} here (is model.vocab_size the checkpoint's?)")
        shared += 1
        return jax.device_put(theirs[name], sharding)

    params = jax.tree_util.tree_map_with_path(take, fresh, shardings)
    if not shared:
        raise UserError(f"checkpoint.init_from {where} shares no parameter with this model")
    return params, missing
