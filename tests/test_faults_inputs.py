"""Untrusted inputs (issue 20): configs load with safe YAML only, HF weights never go through
pickle, chat templates render in a sandbox, names from configs and datasets cannot lead a path
out of its directory; and a fuzz of the config loader (through the CLI) and of the JSONL readers:
every bad input is one `error:` line and exit 2 (a UserError naming FILE:LINE for a record),
never a traceback.

Hypothesis runs derandomized (the same examples on every machine) with small example counts
(`FUZZ_EXAMPLES`), so the file stays within seconds on a 2-core CI machine."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_chat_template import CHAT, FIXTURES, write_tokenizer

import llm_jax
from llm_jax.alignment.best_of_n import read_prompts
from llm_jax.alignment.prompts import jsonl_prompts
from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.config.loader import all_keys
from llm_jax.config.schema import Config
from llm_jax.data.sft_rows import resolve_format, supervised_rows
from llm_jax.data.sources import open_corpus
from llm_jax.data.store import MANIFEST, STORE_FORMAT_VERSION, TokenStore
from llm_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from llm_jax.errors import UserError
from llm_jax.interop.convert import read_hf_model
from llm_jax.paths import safe_child
from llm_jax.scaling.plan import plan_sweep
from llm_jax.scaling.spec import load_spec

pytestmark = pytest.mark.faults

# Examples per fuzz test: (config bytes, config trees, overrides, JSONL files per reader).
FUZZ_EXAMPLES = {"config_bytes": 60, "config_trees": 60, "overrides": 60, "jsonl": 25}
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HOSTILE_NAMES = ["../../x", "/etc/x", "a/../../b", "..", ".", "", "a\\..\\b", "x\0y", "runs/x"]


def assert_one_error_line(capsys, args: list[str]) -> str:
    """Run the CLI in-process: it must exit 2 with exactly one `error:` line on stderr."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code} for {args!r}: {err[-2000:]}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    return lines[0]


def assert_load_is_one_error_line(capsys, config: Path, *overrides: str) -> str:
    """The loader through a command that stops right after it: `compile` loads and validates the
    config, then refuses the unknown topology (so even a valid config exits 2, trained nowhere)."""
    return assert_one_error_line(capsys, ["compile", str(config), *overrides, "--topology", "no-such-tpu"])


def assert_cli_reports_the_loader(capsys, config: Path, *overrides: str) -> None:
    """The CLI's one line is exactly the loader's own verdict: its UserError when `load_config`
    (called directly here; any other exception fails the test) refuses the config, else the
    unknown topology that `compile` reports only after accepting one."""
    line = assert_load_is_one_error_line(capsys, config, *overrides)
    try:
        load_config(str(config), list(overrides))
    except UserError as exc:
        assert line == "error: " + " ".join(str(exc).splitlines())
    else:
        assert line.startswith("error: unknown TPU topology 'no-such-tpu'"), line


# --- safe YAML ------------------------------------------------------------------------------


def test_yaml_python_tags_are_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payloads = [f"seed: !!python/object/apply:os.system ['touch {marker}']",
                f"seed: !!python/object/new:os.system ['touch {marker}']",
                "seed: !!python/name:os.system", "seed: !!python/module:os",
                f"train: !!python/object/apply:subprocess.check_call [['touch', '{marker}']]"]
    for text in payloads:
        config = tmp_path / "evil.yaml"
        config.write_text(text + "\n")
        line = assert_load_is_one_error_line(capsys, config)
        assert f"cannot parse YAML in {config}" in line and "could not determine a constructor" in line
    # The same text through an override stays a string, which the schema refuses.
    line = assert_load_is_one_error_line(capsys, Path("gpt_tiny"),
                                         f"seed=!!python/object/apply:os.system ['touch {marker}']")
    assert "seed: Input should be a valid integer" in line
    assert not marker.exists()
    # The payload is live: the unsafe loader (never used by llm-jax) runs it.
    live = tmp_path / "live"
    yaml.unsafe_load(f"seed: !!python/object/apply:os.system ['touch {live}']")
    assert live.exists()


# --- fuzz: the config loader through the CLI -------------------------------------------------

# "Billion laughs": each level an alias list of 9 uses of the one before.
ALIAS_BOMB = "[&a0 [x,x,x,x,x,x,x,x,x], " + ", ".join(
    f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)) + "]"

# Hand-picked hostile configs: huge numbers, deep nesting (YAML and JSON, 10^4 and 10^5 levels),
# bytes that are not UTF-8, NUL, a bare scalar, an alias bomb, keys of other types.
HOSTILE_CONFIGS = {
    "int_over_python_limit": "seed: " + "9" * 5000,
    "negative_int_over_limit": "seed: -" + "9" * 5000,
    "float_over_range": "optim:\n  lr: 1.0e+400",
    "tiny_float": "optim:\n  lr: 1.0e-400",
    "nan": "optim:\n  lr: .nan",
    "yaml_flow_1e4": "seed: " + "[" * 10_000 + "]" * 10_000,
    "yaml_flow_1e5": "seed: " + "[" * 100_000 + "]" * 100_000,
    "yaml_block_1e4": "".join(" " * i + f"k{i}:\n" for i in range(10_000)),
    "json_1e4": '{"seed": ' + '{"a": ' * 10_000 + "1" + "}" * 10_000 + "}",
    "json_1e5": '{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "json_deep_unclosed": '{"train": ' + "[" * 100_000,
    "not_utf8": b"seed: \xff\xfe\x80\n",
    "utf16": "seed: 1\n".encode("utf-16"),
    "nul": "seed: \x00\n",
    "scalar": "42",
    "list": "- 1\n- 2",
    "alias_bomb": "seed: " + ALIAS_BOMB,  # 9^10 values in 300 bytes
    "int_key": "1: 2",
    "unhashable_key": "? [1, 2]\n: 3",
    "newline_in_key": '"train\\nsteps": 1',
    "unknown_key": "trian:\n  steps: 5",
    "section_as_scalar": "train: 5",
    "section_as_null": "model: null",
    "binary_tag": "seed: !!binary AAAA",
    "timestamp": "seed: 2001-12-14t21:59:43.10-05:00",
    "set_tag": "seed: !!set {a, b}",
}


# What each hostile config's one line must say: the loader's own refusal, never the unknown
# topology that `compile` reports after a config it accepted.
HOSTILE_CONFIG_ERRORS = {
    "int_over_python_limit": "Exceeds the limit (4300 digits)",
    "negative_int_over_limit": "Exceeds the limit (4300 digits)",
    "float_over_range": "optim.lr: Input should be a finite number (got inf)",
    "tiny_float": "optim.lr: Input should be greater than 0 (got 0.0)",
    "nan": "optim.lr: Input should be a finite number",
    "yaml_flow_1e4": "nested too deeply", "yaml_flow_1e5": "nested too deeply", "yaml_block_1e4": "nested too deeply",
    "json_1e4": "nested too deeply", "json_1e5": "nested too deeply", "json_deep_unclosed": "nested too deeply",
    "not_utf8": "is not UTF-8 text", "utf16": "is not UTF-8 text", "nul": "unacceptable character #x0000",
    "scalar": "must hold a mapping of config keys", "list": "must hold a mapping of config keys",
    "alias_bomb": "its aliases expand to more than 100,000 values", "int_key": "unknown config key '1'",
    "unhashable_key": "found unhashable key", "newline_in_key": "unknown config key 'train steps'",
    "unknown_key": "unknown config key 'trian'", "section_as_scalar": "config key 'train' is a section",
    "section_as_null": "config key 'model' is a section", "binary_tag": "seed: Input should be a valid integer",
    "timestamp": "seed: Input should be a valid integer", "set_tag": "seed: Input should be a valid integer",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_hostile_config_files_are_one_error_line(tmp_path, capsys, name):
    config = tmp_path / "c.yaml"
    text = HOSTILE_CONFIGS[name]
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = assert_load_is_one_error_line(capsys, config)
    assert HOSTILE_CONFIG_ERRORS[name] in line and "no-such-tpu" not in line, line


def test_a_config_that_is_not_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "dir.yaml").mkdir()
    line = assert_load_is_one_error_line(capsys, tmp_path / "dir.yaml")
    assert f"cannot read {tmp_path / 'dir.yaml'}: Is a directory" in line


SECTIONS = sorted(name for name, f in Config.model_fields.items()
                  if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields"))


@pytest.mark.parametrize("section", SECTIONS)
def test_every_section_refuses_wrong_types(tmp_path, capsys, section):
    config = tmp_path / "c.yaml"
    for wrong in (5, "x", [1, 2], True):
        config.write_text(yaml.safe_dump({section: wrong}))
        assert f"config key '{section}' is a section" in assert_load_is_one_error_line(capsys, config)
    keys = [k for k in all_keys() if k.startswith(section + ".")]
    for key in keys:  # every leaf of the section: a value of no type it takes
        tree: dict = {}
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = {"not": ["a", {"value": 1}]}
        config.write_text(yaml.safe_dump(tree))
        assert_load_is_one_error_line(capsys, config)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
KEYS = st.sampled_from(sorted({k.split(".")[0] for k in all_keys()} | set(all_keys()) | {"x", "train.nope"}))


@settings(max_examples=FUZZ_EXAMPLES["config_bytes"], **FUZZ)
@given(data=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_fuzz_config_bytes(tmp_path, capsys, data):
    config = tmp_path / "c.yaml"
    config.write_bytes(data)
    assert_cli_reports_the_loader(capsys, config)


@settings(max_examples=FUZZ_EXAMPLES["config_trees"], **FUZZ)
@given(tree=st.dictionaries(KEYS, JSONISH | st.dictionaries(KEYS, JSONISH, max_size=4), max_size=5),
       as_json=st.booleans())
def test_fuzz_config_trees(tmp_path, capsys, tree, as_json):
    """Known and unknown keys with values of every JSON type, as nested sections or dotted keys."""
    config = tmp_path / ("c.json" if as_json else "c.yaml")
    config.write_text(json.dumps(tree) if as_json else yaml.safe_dump(tree))
    assert_cli_reports_the_loader(capsys, config)


HOSTILE_VALUES = [ALIAS_BOMB, "9" * 5000, "[" * 100_000, "{a: " * 10_000, "1e400", "-.inf", ".nan",
                  "!!python/name:os.system", "\x00", "\udcff"]


@pytest.mark.parametrize("key", ["seed", "optim.lr", "data.mixture", "run.dir"])
def test_hostile_override_values_are_one_error_line(capsys, key):
    for value in HOSTILE_VALUES:
        line = assert_load_is_one_error_line(capsys, Path("gpt_tiny"), f"{key}={value}")
        if value == ALIAS_BOMB:
            assert line == f"error: override {key}: its YAML aliases expand to more than 100,000 values"


@settings(max_examples=FUZZ_EXAMPLES["overrides"], **FUZZ)
@given(key=KEYS | st.text(max_size=15), value=st.text(max_size=40) | st.sampled_from(HOSTILE_VALUES))
def test_fuzz_overrides(capsys, key, value):
    # An argument that starts with '-' is an option to argparse, not an override (its own error line).
    assume(not key.startswith("-"))
    assert_cli_reports_the_loader(capsys, Path("gpt_tiny"), f"{key}={value}")


# --- fuzz: the JSONL readers -----------------------------------------------------------------

def _rows(path: Path, cache: Path, fmt: str, preset: str = "gpt_tiny") -> None:
    """A supervised source's rows, as `llm-jax train` builds them (format resolved, then rows)."""
    cfg = resolve_format(load_config(preset, [f"data.source=jsonl:{path}", f"data.format={fmt}",
                                              f"data.cache_dir={cache}", "train.seq_len=32", "train.src_len=16"]))
    supervised_rows(cfg, ByteTokenizer(), cache)


def _text(path: Path, cache: Path) -> None:
    cfg = load_config("gpt_tiny", [f"data.source=jsonl:{path}", "data.format=text"])
    corpus = open_corpus(cfg.data, cache)
    for split in ("train", "validation"):
        list(corpus.documents(split))


def _rl_prompts(path: Path, cache: Path) -> None:
    jsonl_prompts(load_config("gpt_tiny", [f"data.source=jsonl:{path}"]))


def _best_of_n_prompts(path: Path, cache: Path) -> None:
    read_prompts(path, 100)


READERS = {"text": _text, "prompt_completion": lambda p, c: _rows(p, c, "prompt_completion"),
           "chat": lambda p, c: _rows(p, c, "chat"), "preference": lambda p, c: _rows(p, c, "preference"),
           "auto": lambda p, c: _rows(p, c, "auto"), "seq2seq": lambda p, c: _rows(p, c, "seq2seq", "t5_small"),
           "classify": lambda p, c: _rows(p, c, "classify", "bert_small"),
           "rl_prompts": _rl_prompts, "best_of_n_prompts": _best_of_n_prompts}

# Lines that are no record: huge numbers, deep nesting, not UTF-8, wrong types of the fields.
HOSTILE_LINES = {
    "int_over_python_limit": b'{"prompt": "a", "completion": ' + b"9" * 5000 + b"}",
    "float_over_range": b'{"prompt": 1e400, "completion": "b", "text": 1e400}',
    "nested_1e4": b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "nested_1e5": b"[" * 100_000 + b"]" * 100_000,
    "objects_1e5": b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    "not_utf8": b'{"prompt": "\xff\xfe", "completion": "\x80"}',
    "not_json": b"{'prompt': 'a'}",
    "wrong_types": b'{"prompt": ["a"], "completion": {"b": 1}, "text": 5, "messages": "hi", "chosen": 1, '
                   b'"rejected": null, "source": 1, "target": 2, "label": [1]}',
    "bad_messages": b'{"messages": [{"role": "root", "content": 1}, 5, null]}',
    "array": b"[1, 2, 3]",
    "nul": b'{"prompt": "a\\u0000", "completion": "\x00"}',
}


def _check_reader_error(exc: UserError, path: Path, lines: int) -> None:
    """A reader's UserError names the file, and the line when it blames one."""
    message = str(exc)
    assert str(path) in message, message
    after = message.split(f"{path}:", 1)
    if len(after) == 2 and after[1].split(":", 1)[0].isdigit():
        assert 1 <= int(after[1].split(":", 1)[0]) <= lines, message


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_hostile_jsonl_lines_name_the_file_and_line(tmp_path, reader, name):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b", "text": "t"}).encode()
    path.write_bytes(HOSTILE_LINES[name] + b"\n" + good + b"\n")
    try:
        READERS[reader](path, tmp_path / "cache")
    except UserError as exc:
        _check_reader_error(exc, path, 2)
        if name in ("nested_1e4", "nested_1e5", "objects_1e5", "int_over_python_limit", "not_json") and (
                reader not in ("auto", "classify")):
            # (auto reads a first line that is no record as text; classify first gathers the labels
            # of the good records, and one good line has none)
            assert f"{path}:1: " in str(exc)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_empty_jsonl_files_are_user_errors_or_empty(tmp_path, reader):
    for content in (b"", b"\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        try:
            READERS[reader](path, tmp_path / "cache")
        except UserError as exc:
            _check_reader_error(exc, path, 3)


LINE = (st.binary(max_size=60) | JSONISH.map(lambda v: json.dumps(v).encode())
        | st.fixed_dictionaries({}, optional={f: JSONISH for f in ("prompt", "completion", "text", "messages",
                                                                    "chosen", "rejected", "source", "target", "label")}
                                ).map(lambda v: json.dumps(v).encode()))


@settings(max_examples=FUZZ_EXAMPLES["jsonl"], **FUZZ)
@given(lines=st.lists(LINE.map(lambda b: b.replace(b"\n", b" ")), max_size=6), reader=st.sampled_from(sorted(READERS)))
def test_fuzz_jsonl_readers(tmp_path, lines, reader):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        READERS[reader](path, tmp_path / "cache")
    except UserError as exc:
        _check_reader_error(exc, path, max(len(lines), 1))


def test_the_cli_reports_a_hostile_jsonl_line(tmp_path, capsys):
    source = tmp_path / "data.jsonl"
    source.write_bytes(b'{"prompt": "a", "completion": "b"}\n' + HOSTILE_LINES["nested_1e5"] + b"\n")
    line = assert_one_error_line(capsys, ["train", "gpt_tiny", f"run.dir={tmp_path / 'run'}",
                                          f"data.source=jsonl:{source}", "data.format=prompt_completion",
                                          f"data.cache_dir={tmp_path / 'cache'}"])
    assert line == f"error: {source}:2: not readable JSON (nested too deeply) (data.skip_bad_records=true skips " \
                   "such records)"


# --- sandboxed chat templates ----------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "mro_subclasses": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "attribute '__class__' of 'str'"),
    "function_globals": ("{{ raise_exception.__globals__['os'] }}", "attribute '__globals__'"),
    "printed_globals": ("{{ raise_exception.__globals__ }}", "attribute '__globals__'"),
    "cycler_os": ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "attribute '__init__'"),
    "attr_filter": ("{{ messages|attr('__class__') }}", "attribute '__class__' of 'list'"),
    "format_string": ("{{ '{0.__class__}'.format(messages) }}", "attribute '__class__'"),
    "mutation": ("{{ messages.append(1) }}", "attribute 'append' of 'list'"),
    "huge_range": ("{% for i in range(10**9) %}x{% endfor %}", "ranges larger than MAX_RANGE (100000)"),
    "huge_repeat": ("{{ 'a' * 10**12 }}", "a repetition of more than 1,000,000 items"),
    "huge_power": ("{{ 9 ** 1000000000 }}", "a power of more than 100,000 bits"),
    "recursive_macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_chat_templates_are_refused_through_the_cli(tmp_path, capsys, name):
    template, reason = HOSTILE_TEMPLATES[name]
    tokenizer = write_tokenizer(tmp_path / "tok", template)
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": CHAT[1:3]}) + "\n")
    line = assert_one_error_line(capsys, ["train", "gpt_tiny", f"run.dir={tmp_path / 'run'}",
                                          f"data.source=jsonl:{source}", "data.format=chat",
                                          f"data.tokenizer=hf:{tokenizer}", f"data.cache_dir={tmp_path / 'cache'}"])
    kept = tmp_path / "run" / "tokenizer" / "tokenizer_config.json"  # (the run keeps its own copy)
    assert line.startswith(f"error: {source}:1: the chat_template of {kept} ")
    assert reason in line


def test_a_template_nested_too_deeply_to_compile_is_refused(tmp_path):
    deep = "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"
    with pytest.raises(UserError, match="chat_template is nested too deeply to compile"):
        HFTokenizer(write_tokenizer(tmp_path / "tok", deep))


# --- no pickle -------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates `path`: what a hostile pytorch_model.bin could do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def pickled_hf_dir(folder: Path, marker: Path) -> Path:
    """A Hugging Face directory whose only weights are a pickle that creates `marker`."""
    folder.mkdir()
    shutil.copyfile(FIXTURES / "gpt2" / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return folder


def test_pytorch_pickles_are_never_loaded(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    hf = pickled_hf_dir(tmp_path / "hf", marker)
    expected = "pytorch_model.bin), which llm-jax does not load since unpickling runs code; convert the weights " \
               "to safetensors"
    assert expected in assert_one_error_line(capsys, ["import-hf", str(hf), str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    assert expected in assert_one_error_line(capsys, ["export-hf", str(hf), str(tmp_path / "out")])
    for load in (llm_jax.load, read_hf_model):  # (read_hf_model: what checkpoint.init_from=HF_DIR calls)
        with pytest.raises(UserError, match="only PyTorch pickle weights"):
            load(hf)
    # An index that lists pickle shards is refused too, before any is opened.
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model.bin"}}))
    with pytest.raises(UserError, match="lists pytorch_model.bin, not safetensors files"):
        read_hf_model(hf)
    assert not marker.exists()
    # The payload is live: unpickling a copy creates its marker.
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live))).close()
    assert live.exists()


# --- paths confined to their directory ---------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_safe_child_refuses_names_that_leave_the_directory(tmp_path, name):
    with pytest.raises(UserError, match="is not a plain file name"):
        safe_child(tmp_path, name, "thing")


def test_safe_child_keeps_plain_names(tmp_path):
    for name in ("a", "run_C3e9_d16_L1", "x.log", "...", "a..b"):
        assert safe_child(tmp_path, name, "thing") == tmp_path / name


@pytest.mark.parametrize("name", ["../../x", "/etc/x", "a/../../b"])
def test_hostile_names_in_sweeps_indexes_and_stores_do_not_leave_their_directory(tmp_path, name):
    sweep = tmp_path / "sweep"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": "gpt_tiny", "budgets": [3e9], "sizes": {"widths": [16], "aspect": 16,
                                    "head_dim": 16}, "min_steps": 10, "archs": [name],
                                    "arch_overrides": {name: ["model.arch=gpt"]}}))
    with pytest.raises(UserError, match="sweep run name .* is not a plain file name"):
        plan_sweep(load_spec(str(spec)), sweep)
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copyfile(FIXTURES / "gpt2" / "config.json", hf / "config.json")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name + ".safetensors"}}))
    with pytest.raises(UserError, match="shard .* is not a plain file name"):
        read_hf_model(hf)
    store = tmp_path / "store"
    store.mkdir()
    (store / MANIFEST).write_text(json.dumps({"format": STORE_FORMAT_VERSION, "dtype": "uint16", "tokens": 1,
                                              "chunk_tokens": 1, "shard_tokens": 1, "shards": [{"file": name}]}))
    with pytest.raises(UserError, match="token store shard .* is not a plain file name"):
        TokenStore(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "spec.yaml", "store"]


# --- Hugging Face config.json of the wrong types ----------------------------------------------


# Keys whose wrong values once escaped as TypeError, ValueError or AttributeError tracebacks.
HF_CRASHERS = {"vocab_size": None, "n_positions": "x", "max_position_embeddings": [1], "rope_parameters": 1.5,
               "num_key_value_heads": None, "intermediate_size": None, "hidden_size": 10**30, "n_embd": 10**30}


@pytest.mark.parametrize("family", sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file()))
def test_hf_configs_of_wrong_types_are_user_errors(tmp_path, family):
    """Keys of a fixture's config.json set to values of another type or size (those above, and 6
    more drawn with a fixed seed): a UserError naming the problem, or (where the key does not
    matter) a model; never another exception."""
    base = json.loads((FIXTURES / family / "config.json").read_text())
    hf = tmp_path / "hf"
    shutil.copytree(FIXTURES / family, hf)
    drawn = random.Random(family).sample([(k, w) for k in sorted(base) for w in ("x", None, [1], 10**30)], 6)
    for key, wrong in ((k, w) for k, w in HF_CRASHERS.items() if k in base):  # each crashed the adapters once
        (hf / "config.json").write_text(json.dumps({**base, key: wrong}))
        with pytest.raises(UserError):
            read_hf_model(hf)
    for key, wrong in drawn:  # a value the model ignores may load; any exception but a UserError fails the test
        (hf / "config.json").write_text(json.dumps({**base, key: wrong}))
        try:
            loaded = read_hf_model(hf)
        except UserError as exc:
            assert str(exc), (key, wrong)
        else:
            assert loaded is not None, (key, wrong)


def test_damaged_store_manifests_are_user_errors(tmp_path):
    good = {"format": STORE_FORMAT_VERSION, "dtype": "uint16", "tokens": 1, "chunk_tokens": 1, "shard_tokens": 1,
            "shards": [{"file": "shard-0"}]}
    for manifest in ([1, 2], {**good, "dtype": "O"}, {**good, "chunk_tokens": 0}, {**good, "shards": [3]},
                     {k: v for k, v in good.items() if k != "tokens"}, "[" * 100_000):
        (tmp_path / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        with pytest.raises(UserError, match=f"{MANIFEST}.*(damaged|maximum recursion)"):
            TokenStore(tmp_path)
