"""Loading the typed config tree (`config_schema`): YAML presets plus dotted KEY=VALUE
overrides, validated by pydantic; and the keys that make a run directory's identity.

Unknown keys are rejected with a suggestion; values are checked by the schema's validators where
the config alone decides, and in `parallel.mesh` where devices decide.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel

from llm_jax.config.schema import Config
from llm_jax.errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"  # packaged: wheels carry the presets
CONFIG_FILE = "config.yaml"  # a run directory's record of its config


# Keys that fix the meaning of a run directory's checkpoints; a different value means a
# different run, so resuming with it is refused rather than silently mixing the two.
RUN_IDENTITY_KEYS = ("seed", "model", "train.batch_size", "train.seq_len", "train.src_len", "train.loss_on",
                     "data.source", "data.mixture", "data.task", "data.format", "data.tokenizer", "data.sp_vocab_size",
                     "data.val_fraction", "data.max_bytes", "data.text_field", "data.labels", "data.synthetic_vocab",
                     "data.synthetic_copies", "data.synthetic_examples",
                     # an RL run's prompts and reward (its order of prompts is part of the run)
                     "rl.method", "rl.reward", "rl.num_prompts", "rl.prompts_per_step", "rl.group_size")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def _read_yaml(spec: str) -> dict[str, Any]:
    path = Path(spec)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = CONFIGS_DIR / f"{spec}.yaml"
        if not path.exists():
            hint = difflib.get_close_matches(spec, preset_names(), n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; presets: {', '.join(preset_names())}"
            raise UserError(f"no config preset or YAML file named '{spec}'{extra}")
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    return read_yaml_mapping(path)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; parse problems become one-line user errors."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return data


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a file that cannot be read, is not UTF-8 or is not YAML is one
    UserError naming it.

    Only `yaml.safe_load`: a config may come from anywhere, and the full loader would run the
    Python that tags such as !!python/object/apply name."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); YAML files are text") from None
    return safe_yaml(text, str(path))


def safe_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, with every way hostile text makes it fail as one UserError naming
    `where`: deep nesting exhausts Python's recursion (RecursionError) and an integer of more
    than 4300 digits hits Python's int-string limit (ValueError); neither is a YAMLError."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse YAML in {where}: {exc}".replace("\n", " ")) from None
    except RecursionError:
        raise UserError(f"cannot parse YAML in {where}: nested too deeply") from None
    except ValueError as exc:
        raise UserError(f"cannot parse YAML in {where}: {exc}".replace("\n", " ")) from None
    if _expands_beyond(data, MAX_YAML_VALUES):
        raise UserError(f"cannot use the YAML in {where}: its aliases expand to more than {MAX_YAML_VALUES:,} "
                        "values")
    return data


# The most values (counting each use of an alias) a YAML document may expand to. Aliases let a
# few hundred bytes stand for billions of values ("billion laughs"); safe_load shares them, but
# validating or printing such a tree walks every use.
MAX_YAML_VALUES = 100_000


def _expands_beyond(data: Any, limit: int) -> bool:
    """Whether `data` holds more than `limit` values, each use of a shared one counted; stops
    counting at the limit, so a bomb costs no more than `limit` steps."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend(node)
    return False


def _check_known(data: dict[str, Any], model: type[BaseModel] = None, prefix: str = "") -> None:
    """Reject unknown keys anywhere in `data`, suggesting the closest known key."""
    model = model or Config
    for key, value in data.items():
        full = f"{prefix}{key}"
        fields = model.model_fields
        if key not in fields:
            candidates = [f"{prefix}{k}" for k in fields] + all_keys()
            hint = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
            raise UserError(f"unknown config key '{full}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))
        ann = fields[key].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}' is a section; give it a mapping, not {value!r}")
            _check_known(value, ann, f"{full}.")


def all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree."""
    model = model or Config
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += all_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def key_docs() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key, for docs and `llm-jax keys`."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                out.append((f"{prefix}{name}", repr(field.default), field.description or ""))

    walk(Config, "")
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override '{item}' is not KEY=VALUE (for example train.steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key not in all_keys():
        hint = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
        raise UserError(f"unknown config key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:  # (not YAMLErrors: see `safe_yaml`)
        raise UserError(f"override {key}: the value is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        raise UserError(f"override {key}: {exc}") from None
    if _expands_beyond(value, MAX_YAML_VALUES):
        raise UserError(f"override {key}: its YAML aliases expand to more than {MAX_YAML_VALUES:,} values")
    # Strings stay strings: '1e-3' is a float, 'abc' stays 'abc' for pydantic to judge.
    return key.split("."), value


def _format_validation(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if loc and not isinstance(got, dict):
            parts.append(f"{loc}: {msg} (got {_short_repr(got)})")
        else:
            parts.append(msg if not loc else f"{loc}: {msg}")
    return "; ".join(parts)


def _short_repr(value: Any, limit: int = 200) -> str:
    """repr(value) cut to `limit` characters: a hostile value may be deeply nested (repr
    recurses) or huge, and the message must stay one readable line."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # ValueError: an int too long for a decimal string
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[:limit] + "..."


def validate(data: dict[str, Any]) -> Config:
    _check_known(data)
    try:
        return Config.model_validate(data)
    except pydantic.ValidationError as exc:
        raise UserError(f"invalid config: {_format_validation(exc)}") from None


def read_run_config(run_dir: str | Path) -> Config:
    """The config a run directory was made with (its config.yaml)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not an llm-jax run directory (no {CONFIG_FILE})")
    return validate(read_yaml_mapping(path))


def load_config(spec: str | None, overrides: list[str] = ()) -> Config:
    """Read a preset name or YAML path (or nothing: all defaults) and apply dotted overrides."""
    data = _read_yaml(spec) if spec else {}
    _check_known(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return validate(data)


# How a run executes, not what it computes: free to change between invocations of one run.
EXECUTION_KEYS = ("model.dtype", "model.remat", "model.scan_layers", "model.attention", "model.attention_block",
                  "model.ssm.scan", "model.ssm.chunk", "model.moe.grouped_matmul")


def identity(cfg: Config) -> dict[str, Any]:
    """The values of RUN_IDENTITY_KEYS (less EXECUTION_KEYS), flattened to dotted keys."""
    flat = _flatten(cfg.to_dict())
    return {k: v for k, v in flat.items()
            if any(k == p or k.startswith(p + ".") for p in RUN_IDENTITY_KEYS) and k not in EXECUTION_KEYS}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(saved: Config, new: Config, run_dir: str) -> None:
    """Refuse to resume `run_dir` (made with `saved`) under a config that changes the run."""
    a, b = identity(saved), identity(new)
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise UserError(
            f"run directory {run_dir} was made with a different config ({'; '.join(diffs[:4])}); "
            "use a new run.dir or the original values"
        )


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
