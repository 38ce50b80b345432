"""Weights from elsewhere: `import-hf`, `export-hf` and `checkpoint.init_from`."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import Config, validate
from llm_jax.errors import UserError
from llm_jax.interop import hf
from llm_jax.models.definition import ModelDef

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
    from llm_jax.inference.api import hf_params
    from llm_jax.models.definition import model_def, param_shardings
    from llm_jax.parallel.mesh import single_device_mesh
    from llm_jax.runtime.checkpoint import Checkpointer
    from llm_jax.runtime.run_dir import write_run_config
    from llm_jax.train.optim import make_optimizer
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
    from llm_jax.inference.api import load
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


def pretrained_params(cfg: Config, mdef: ModelDef, shardings: dict, fresh: dict) -> tuple[dict, list[str]]:
    """`checkpoint.init_from`: parameters of another run's newest checkpoint or of a Hugging Face
    directory, placed on this run's shardings, and the names of this model's parameters that the
    source lacks (they keep their `fresh` initialisation).

    The networks must agree in FUNCTION_KEYS and in the shapes of every parameter they share;
    heads that only one side has are where they may differ: a masked-LM BERT starts a classifier
    (its MLM head is dropped, the pooler and classifier start fresh), as transformers'
    from_pretrained does.
    """
    from llm_jax.config import read_run_config
    from llm_jax.inference.api import hf_params
    from llm_jax.models.definition import model_def, param_shardings
    from llm_jax.runtime.checkpoint import Checkpointer
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
    if params is None:
        ckpt = Checkpointer(source, source_cfg, read_only=True)
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"checkpoint.init_from {source} has no complete checkpoint")
        source_mdef = model_def(source_cfg, mdef.shapes["embed"]["embedding"].shape[0])
        mesh = jax.tree.leaves(shardings)[0].mesh
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                source_mdef.shapes, param_shardings(source_mdef, mesh))
        try:
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
