"""Supervised JSONL for the encoder-decoders and BERT (data.format seq2seq, classify): exact rows,
format detection, arch errors, bad records, the label list (recorded, stable on resume, used by
`llm_jax.load`), and tiny models that learn a word mapping and a keyword's label."""

import json
import random

import numpy as np
import pytest

import llm_jax
from llm_jax.cli import main
from llm_jax.config import load_config, read_run_config
from llm_jax.data.build import build_data
from llm_jax.data.formats import BadRecord
from llm_jax.data.jsonl_files import jsonl_held_out_lines
from llm_jax.data.sft_rows import resolve_format
from llm_jax.data.task_formats import encode_classify_line, encode_seq2seq_line
from llm_jax.data.tasks import PACKAGE_LABELS, PAD, classes_of, labels_of
from llm_jax.errors import UserError

EOS = 256
# Tiny models at the sizes the other tests use: gpt_tiny's 2 x 64 blocks (4 heads) with each
# family's layout (test_encdec's TRANSFORMER and T5 keys, without their data.task).
TRANSFORMER = ["model.arch=transformer", "model.position=sinusoidal", "model.mlp=relu"]
T5 = ["model.arch=t5", "model.position=relative", "model.norm=rmsnorm", "model.use_bias=false", "model.mlp=relu",
      "model.relative_buckets=8", "model.relative_max_distance=16"]
BERT = ["model.arch=bert"]
QUIET = ["train.sample_tokens=0", "checkpoint.every=0", "train.tensorboard=false", "train.progress=false"]


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def write_jsonl(path, records) -> str:
    """Records (dicts, or raw strings written as they are) one per line; returns the source spec."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return f"jsonl:{path}"


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Rows


def test_seq2seq_row_is_the_tasks_row():
    line = json.dumps({"source": "abcdef", "target": "xy", "id": 3})  # extra fields are ignored
    row = encode_seq2seq_line(line, byte_ids, src_len=4, tgt_len=5, eos_id=EOS, start_id=EOS)
    # The source cut to src_len - 1 and end-of-text; then start, target, end-of-text, padding.
    assert row.tolist() == [*byte_ids("abc"), EOS, EOS, *byte_ids("xy"), EOS, PAD, PAD]
    # A target of tgt_len - 1 tokens still fits; one more is refused, not cut.
    assert encode_seq2seq_line(json.dumps({"source": "a", "target": "wxyz"}), byte_ids, 4, 5, EOS, 0)[-1] == EOS
    with pytest.raises(BadRecord, match="target of 5 tokens, longer than train.seq_len-1=4"):
        encode_seq2seq_line(json.dumps({"source": "a", "target": "vwxyz"}), byte_ids, 4, 5, EOS, 0)


def test_classify_row_is_the_tasks_row():
    index = {3: 0, "neg": 1, "pos": 2}
    row = encode_classify_line(json.dumps({"body": "hello", "label": "pos"}), "body", index, byte_ids, 4, EOS)
    assert row.tolist() == [*byte_ids("hel"), EOS, 2]  # text cut to seq_len - 1, end-of-text, the class
    row = encode_classify_line(json.dumps({"body": "hi", "label": 3}), "body", index, byte_ids, 4, EOS)
    assert row.tolist() == [*byte_ids("hi"), EOS, PAD, 0]
    with pytest.raises(BadRecord, match="label '3' is not one of the training split's labels"):
        encode_classify_line(json.dumps({"body": "hi", "label": "3"}), "body", index, byte_ids, 4, EOS)


@pytest.mark.parametrize(("fmt", "record", "reason"), [
    ("seq2seq", "{not json", "not valid JSON"),
    ("seq2seq", "[1]", "a JSON list, not an object"),
    ("seq2seq", {"source": "a"}, "no field 'target'"),
    ("seq2seq", {"source": 1, "target": "b"}, "field 'source' is int, not text"),
    ("seq2seq", {"source": "", "target": "b"}, "empty source"),
    ("seq2seq", {"source": "a", "target": ""}, "empty target"),
    ("classify", {"label": "pos"}, "no field 'text'"),
    ("classify", {"text": "", "label": "pos"}, "empty text"),
    ("classify", {"text": "a"}, "no field 'label'"),
    ("classify", {"text": "a", "label": 1.5}, "field 'label' is float, not text or an integer"),
    ("classify", {"text": "a", "label": True}, "field 'label' is bool"),
    ("classify", {"text": "a", "label": "meh"}, "label 'meh' is not one of"),
])
def test_bad_records_are_refused(fmt, record, reason):
    line = record if isinstance(record, str) else json.dumps(record)
    with pytest.raises(BadRecord, match=reason):
        if fmt == "seq2seq":
            encode_seq2seq_line(line, byte_ids, 8, 8, EOS, EOS)
        else:
            encode_classify_line(line, "text", {"neg": 0, "pos": 1}, byte_ids, 8, EOS)


# ---------------------------------------------------------------------------------------------
# Config: detection, arch errors, labels


def labelled(n: int, labels=("neg", "pos")) -> list[dict]:
    return [{"text": f"t{i}", "label": labels[i % len(labels)]} for i in range(n)]


def pairs(n: int) -> list[dict]:
    return [{"source": f"s{i}", "target": f"t{i}"} for i in range(n)]


def test_auto_detection_labels_and_arch_errors(tmp_path):
    s2s = write_jsonl(tmp_path / "s2s.jsonl", pairs(20))
    cls = write_jsonl(tmp_path / "cls.jsonl", labelled(40, labels=(10, 2, "b", "a")))
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": f"x{i}", "label": i % 2} for i in range(10)])
    for preset_keys, source, fmt, objective in [(TRANSFORMER, s2s, "seq2seq", "seq2seq"),
                                                (T5, s2s, "seq2seq", "seq2seq"), (BERT, cls, "classify", "classify")]:
        cfg = resolve_format(load_config("gpt_tiny", [*preset_keys, f"data.source={source}"]))
        assert (cfg.data.format, cfg.objective) == (fmt, objective)
    cfg = resolve_format(load_config("gpt_tiny", [*BERT, f"data.source={cls}", "data.val_fraction=0.2"]))
    assert cfg.data.labels == [2, 10, "a", "b"] and classes_of(cfg) == 4  # integers by value, then strings
    assert labels_of(cfg) == [2, 10, "a", "b"]
    # The built-in task's classes are its packages; models without a classifier have no labels.
    assert labels_of(load_config("bert_package", ["checkpoint.init_from="])) == list(PACKAGE_LABELS)
    assert labels_of(load_config("gpt_tiny", [*BERT])) == []
    with pytest.raises(UserError, match="data.labels is empty; it is filled from the training split"):
        classes_of(load_config("gpt_tiny", [*BERT, f"data.source={cls}", "data.format=classify"]))
    # `label` beside data.text_field, whatever it is called.
    assert resolve_format(load_config("gpt_tiny", [*BERT, f"data.source={body}", "data.text_field=body"])
                          ).data.labels == [0, 1]
    # The labels are the training split's: a label only in validation lines is not one.
    held_out = sorted(jsonl_held_out_lines(tmp_path / "cls.jsonl", 0.2))
    records = labelled(40)
    records[held_out[0]]["label"] = "rare"
    rare = write_jsonl(tmp_path / "rare.jsonl", records)
    assert resolve_format(load_config("gpt_tiny", [*BERT, f"data.source={rare}", "data.val_fraction=0.2"])
                          ).data.labels == ["neg", "pos"]
    # Formats an arch cannot take name the archs that can.
    with pytest.raises(UserError, match="data.format=seq2seq trains the seq2seq objective: it needs model.arch="
                                        "transformer or t5, not gpt"):
        load_config("gpt_tiny", [f"data.source={s2s}", "data.format=seq2seq"])
    with pytest.raises(UserError, match="data.format=classify trains the classify objective: it needs model.arch="
                                        "bert, not t5"):
        load_config("gpt_tiny", [*T5, f"data.source={cls}", "data.format=classify"])
    with pytest.raises(UserError, match=r"needs model.arch=bert, not gpt .*data.format=auto found classify"):
        resolve_format(load_config("gpt_tiny", [f"data.source={cls}"]))
    with pytest.raises(UserError, match=r"needs model.arch=transformer or t5, not bert .*found seq2seq"):
        resolve_format(load_config("gpt_tiny", [*BERT, f"data.source={s2s}"]))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    with pytest.raises(UserError, match=r"model.arch=transformer trains on a data.task .* or on JSONL records "
                                        r"\(data.format=seq2seq\) .*found text"):
        resolve_format(load_config("gpt_tiny", [*TRANSFORMER, f"data.source={text}"]))
    with pytest.raises(UserError, match="data.labels names the classes of data.format=classify, not of "
                                        "data.format=seq2seq"):
        load_config("gpt_tiny", [*TRANSFORMER, f"data.source={s2s}", "data.format=seq2seq", "data.labels=[a, b]"])
    with pytest.raises(UserError, match=r"not of data.format=seq2seq .*data.format=auto found seq2seq"):
        resolve_format(load_config("gpt_tiny", [*TRANSFORMER, f"data.source={s2s}", "data.labels=[a, b]"]))
    one = write_jsonl(tmp_path / "one.jsonl", labelled(9, ("x",)))
    with pytest.raises(UserError, match="at least two labels in the training split"):
        resolve_format(load_config("gpt_tiny", [*BERT, f"data.source={one}"]))


# ---------------------------------------------------------------------------------------------
# Learning

WORDS = {"red": "rot", "blue": "blau", "green": "gruen", "black": "schwarz", "white": "weiss", "grey": "grau"}


def translations(path, n: int = 300) -> str:
    """Sources of two colour words among noise letters; the target translates the two words (a
    fixed mapping that only reading the source can give)."""
    rng = random.Random(0)
    records = []
    for _ in range(n):
        a, b = rng.sample(sorted(WORDS), 2)
        noise = "".join(rng.choice("xyzq") for _ in range(4))
        records.append({"source": f"{noise} {a} {b}", "target": f"{WORDS[a]} {WORDS[b]}"})
    return write_jsonl(path, records)


def train_run(tmp_path, name: str, arch_keys: list[str], source: str, *overrides: str) -> list[dict]:
    run = tmp_path / name
    assert main(["train", "gpt_tiny", f"run.dir={run}", *arch_keys, f"data.source={source}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1", *QUIET, *overrides]) == 0
    return metrics(run)


KEYWORDS = {"cat": "animal", "dog": "animal", "red": "colour", "blue": "colour", "oak": "tree", "elm": "tree"}


def keyword_texts(path, n: int = 300) -> str:
    """Texts of random noise words and one keyword, whose group is the label."""
    rng = random.Random(0)
    records = []
    for _ in range(n):
        words = ["".join(rng.choice("qwxzjkv") for _ in range(3)) for _ in range(4)]
        keyword = rng.choice(sorted(KEYWORDS))
        words.insert(rng.randrange(5), keyword)
        records.append({"text": " ".join(words), "label": KEYWORDS[keyword]})
    return write_jsonl(path, records)


@pytest.mark.slow  # trains (about 13 s here)
def test_a_tiny_transformer_learns_to_translate_words(tmp_path):
    records = train_run(tmp_path, "run", TRANSFORMER, translations(tmp_path / "tr.jsonl"), "train.steps=100",
                        "train.eval_every=0", "train.log_every=10", "train.src_len=24", "train.seq_len=16",
                        "optim.lr=1e-2")
    first, final = records[0], records[-1]
    # From about ln(384) = 5.95 to well under 1 nat per target token on held-out sources.
    assert first["step"] == 10 and final["step"] == 100 and final["eval_loss"] < first["loss"] / 5, records
    assert final["eval_accuracy"] > 0.7, final


@pytest.mark.slow  # trains (about 17 s here)
def test_a_tiny_t5_learns_to_translate_words(tmp_path):
    records = train_run(tmp_path, "run", [*T5, "model.init_std=0.3"], translations(tmp_path / "tr.jsonl"),
                        "train.steps=100", "train.eval_every=0", "train.log_every=10", "train.src_len=24",
                        "train.seq_len=16", "optim.lr=1e-2")
    first, final = records[0], records[-1]
    assert final["step"] == 100 and final["eval_loss"] < first["loss"] / 3, records
    assert final["eval_accuracy"] > 0.6, final


BERT_RUN = ["train.seq_len=24", "optim.lr=1e-3", "optim.warmup_steps=10", "train.log_every=10"]


@pytest.mark.slow  # trains (about 11 s here)
def test_a_tiny_bert_learns_the_label_of_a_keyword(tmp_path):
    path = tmp_path / "kw.jsonl"
    records = train_run(tmp_path, "run", BERT, keyword_texts(path), "train.steps=150", "train.eval_every=0",
                        *BERT_RUN)
    final = records[-1]
    assert final["step"] == 150 and final["eval_accuracy"] >= 0.9 and final["eval_loss"] < 0.5, final
    # The run recorded its labels; llm_jax.load maps class i to the same label.
    assert read_run_config(tmp_path / "run").data.labels == ["animal", "colour", "tree"]
    model = llm_jax.load(tmp_path / "run")
    assert model.labels == ["animal", "colour", "tree"]
    lines = path.read_text().splitlines()
    held_out = [json.loads(lines[i]) for i in sorted(jsonl_held_out_lines(path, 0.1))]
    cls_id, eos = 258, model.tokenizer.eos_id  # [CLS]: the byte vocabulary's padding row after [MASK]
    rows = [[cls_id, *model.tokenizer.encode(r["text"]), eos] for r in held_out]
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    predicted = [model.labels[i] for i in model.logits(ids, attention_mask=mask).argmax(-1)]
    hits = np.mean([p == r["label"] for p, r in zip(predicted, held_out, strict=True)])
    assert hits >= 0.9, (predicted, held_out)


@pytest.mark.slow  # trains (about 8 s here)
def test_the_label_list_is_stable_across_a_resume(tmp_path, capsys):
    source = keyword_texts(tmp_path / "kw.jsonl", n=120)

    def losses(name: str, steps: int, config: str = "gpt_tiny") -> list[tuple[int, float]]:
        run = tmp_path / name
        assert main(["train", config, f"run.dir={run}", *BERT, f"data.source={source}",
                     f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1", *QUIET, *BERT_RUN,
                     f"train.steps={steps}", "train.log_every=1", "train.eval_every=0", "optim.decay_steps=20"]) == 0
        return [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]

    whole = losses("a", 8)
    assert losses("b", 4) == whole[:4]
    assert losses("b", 8) == whole  # resolves the same labels, so the run resumes
    assert "resumed from checkpoint at step 4" in capsys.readouterr().err
    # Resuming from the run's own config.yaml reads the recorded labels.
    run_config = str(tmp_path / "b" / "config.yaml")
    assert main(["train", run_config, "train.steps=9"]) == 0
    assert read_run_config(tmp_path / "b").data.labels == ["animal", "colour", "tree"]
    # A file whose training split now has another label would map classes differently: refused.
    with open(tmp_path / "kw.jsonl", "a") as f:
        f.write("".join(json.dumps({"text": f"fish {i}", "label": "fish"}) + "\n" for i in range(20)))
    capsys.readouterr()
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'b'}", *BERT, f"data.source={source}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1", *QUIET, *BERT_RUN,
                 "train.steps=12"]) == 2
    err = capsys.readouterr().err
    assert "was made with a different config (data.labels: ['animal', 'colour', 'tree'] -> " in err, err


# ---------------------------------------------------------------------------------------------
# Bad records through the CLI


def test_cli_names_the_file_and_line_of_a_bad_record_and_writes_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    path = tmp_path / "cls.jsonl"
    records = labelled(20)
    write_jsonl(path, records)
    held_out = sorted(jsonl_held_out_lines(path, 0.2))
    records[held_out[0]]["label"] = "unseen"
    records[held_out[-1]] = {"text": "", "label": "pos"}
    source = write_jsonl(path, records)
    base = ["train", "gpt_tiny", *BERT, f"run.dir={tmp_path / 'run'}", f"data.source={source}",
            f"data.cache_dir={cache}", "data.val_fraction=0.2"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert (f"error: {path}:{held_out[0] + 1}: label 'unseen' is not one of the training split's labels "
            "(data.labels: 'neg', 'pos') (data.skip_bad_records=true skips such records)") in err, err
    assert "Traceback" not in err
    s2s = tmp_path / "s2s.jsonl"
    source = write_jsonl(s2s, [*pairs(3), {"source": "a", "target": "x" * 40}])
    assert main(["train", "gpt_tiny", *TRANSFORMER, f"run.dir={tmp_path / 'run'}", f"data.source={source}",
                 f"data.cache_dir={cache}"]) == 2
    assert f"error: {s2s}:4: target of 40 tokens, longer than train.seq_len-1=31" in capsys.readouterr().err
    assert not [p for p in (cache / "sft").iterdir() if not p.name.startswith(".")]
    assert not (tmp_path / "run").exists()
    # Skipped and counted instead, after the split is decided.
    cfg = resolve_format(load_config("gpt_tiny", [*base[2:], "data.skip_bad_records=true"]))
    bundle = build_data(cfg, tmp_path / "run")
    err = capsys.readouterr().err
    assert f"2 bad records skipped (line {held_out[0] + 1}: label 'unseen'" in err, err
    assert "(classify):" in err and "2 labels (neg, pos)" in err
    assert len(bundle.train_tokens) + len(bundle.val_tokens) == 18
    rows = np.asarray(bundle.train_tokens)
    assert rows.shape[1] == 33 and set(rows[:, -1].tolist()) == {0, 1}
    # data.labels given in another order: the classes follow it (a new cache entry, not the old rows).
    flipped = build_data(resolve_format(load_config("gpt_tiny", [*base[2:], "data.skip_bad_records=true",
                                                                 "data.labels=[pos, neg]"])), tmp_path / "run2")
    np.testing.assert_array_equal(np.asarray(flipped.train_tokens)[:, -1], 1 - rows[:, -1])
    np.testing.assert_array_equal(np.asarray(flipped.train_tokens)[:, :-1], rows[:, :-1])
