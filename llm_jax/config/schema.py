"""The config schema: one pydantic section per part of a run, every field documented.

Each field's docstring becomes its description (`llm-jax keys`, README.md's key table).
Validators here check what the config alone decides (heads against d_model, a task against
model.arch); `parallel.mesh` checks what the devices decide. Loading presets, YAML files and
KEY=VALUE overrides is `llm_jax.config`; the `model` section is `llm_jax.config.model`, the
`pref` and `rl` sections (learning from preferences and rewards) `llm_jax.config.alignment`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pydantic
from pydantic import model_validator

from llm_jax.config.alignment import PrefConfig, RLConfig
from llm_jax.config.families import TASK_OBJECTIVES, archs_where, either
from llm_jax.config.model import ModelConfig, Section


class RunConfig(Section):
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints, tokenizer."""
    name: str = "default"
    """A label for the run, shown in logs."""
    compile_cache: bool = True
    """Keep compiled XLA programs in <cache root>/xla, so a repeated run skips compiling."""


def span_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a span-corruption row of `length` tokens: fixed per row, as
    in T5, so shapes are static (the objective and the FLOP count both read it)."""
    noise = min(max(round(length * density), 1), length - 1)
    spans = min(max(round(noise / mean_span), 1), noise, length - noise)
    return noise, spans


class TrainConfig(Section):
    steps: int = pydantic.Field(1000, ge=1)
    """Optimiser steps to train for (the run ends at this step; raise it to train further)."""
    batch_size: int = pydantic.Field(32, ge=1)
    """Global batch size in sequences, over all devices and processes."""
    seq_len: int = pydantic.Field(256, ge=2)
    """Tokens per training sequence (windows of seq_len+1 give inputs and shifted targets)."""
    src_len: int = pydantic.Field(256, ge=2)
    """Encoder input length of a seq2seq data.task (end-of-text included); longer sources are cut."""
    loss_on: Literal["completion", "all"] = "completion"
    """data.format prompt_completion, chat: score the completions (assistant turns) and their EOS, or all tokens."""
    packing: bool = False
    """Decoders: documents share rows, kept apart (segment ids, positions per document); text split at EOS."""
    label_smoothing: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing of the training loss (Vaswani et al.: 0.1); evaluation reports plain cross entropy."""
    nsp: bool = False
    """bert: also train next-sentence prediction ([CLS] A [SEP] B [SEP]; docs/families.md)."""
    noise_density: float = pydantic.Field(0.15, gt=0.0, lt=1.0)
    """Span corruption (t5 pretraining): fraction of each window's tokens hidden in spans."""
    mean_span: float = pydantic.Field(3.0, ge=1.0)
    """Span corruption: mean length of a hidden span."""
    grad_accum: int = pydantic.Field(1, ge=1)
    """Microbatches per step: the global batch is split and gradients are averaged."""
    log_every: int = pydantic.Field(50, ge=1)
    """Log loss, lr, grad norm, tokens/s and MFU every this many steps."""
    eval_every: int = pydantic.Field(500, ge=0)
    """Evaluate held-out loss and bits per byte every this many steps (0: only at the end)."""
    eval_batches: int = pydantic.Field(20, ge=1)
    """Held-out batches per evaluation (the same batches every time)."""
    eval_exact_match: int = pydantic.Field(0, ge=0)
    """data.format prompt_completion, chat: at each evaluation, greedily complete this many held-out examples and log
    eval_exact_match (and per record `kind`); 0: off."""
    sample_tokens: int = pydantic.Field(200, ge=0)
    """Tokens to sample and print at the end of training (0: no sample)."""
    sample_prompt: str = "\n"
    """Prompt of the end-of-training sample."""
    progress: bool = True
    """Progress with ETA on process 0: a live bar on a terminal, a line per logged step otherwise."""
    tensorboard: bool = True
    """Write TensorBoard event files to <run.dir>/tb."""
    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    """A step whose loss or gradient norm is NaN or infinite: `stop` (exit 2 naming the step and the newest
    checkpoint; nothing from that step on is saved), `skip` (the step leaves parameters and optimizer state as they
    were; counted as `skipped_steps`), or `rollback` (restore the newest checkpoint and skip the batches from it
    through the bad one; at most 3 times to one checkpoint). RL runs: `stop` only. docs/reliability.md."""
    step_timeout_s: float = pydantic.Field(0.0, ge=0.0)
    """Watchdog: when no step completes for this many seconds (after the first, compiling step), print an `error:`
    line, dump every thread's stack to stderr and exit with code 3 so the scheduler restarts the job; 0: off. The
    time between two steps includes the evaluations and checkpoint saves run between them (a hung save is caught
    too), so it must exceed the longest of those, the first evaluation's compilation included. docs/reliability.md."""

    @model_validator(mode="after")
    def _check_accum(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
            )
        return self


class OptimConfig(Section):
    lr: float = pydantic.Field(1e-3, gt=0)
    """Peak learning rate."""
    min_lr: float = pydantic.Field(1e-4, ge=0)
    """Learning rate at the end of the decay."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to min_lr over the remaining steps, or constant."""
    warmup_steps: int = pydantic.Field(100, ge=0)
    """Linear warmup from 0 to lr."""
    decay_steps: int | None = pydantic.Field(None, ge=1)
    """Step at which the decay reaches min_lr; default train.steps."""
    b1: float = 0.9
    """AdamW beta1."""
    b2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = pydantic.Field(0.1, ge=0)
    """Decoupled weight decay; never applied to norms and biases."""
    decay_embeddings: bool = False
    """Also decay the token and position embeddings."""
    clip_norm: float = pydantic.Field(1.0, ge=0)
    """Clip gradients to this global norm (0: no clipping)."""


class CheckpointConfig(Section):
    every: int = pydantic.Field(500, ge=0)
    """Save every this many steps (0: only at the end)."""
    keep: int = pydantic.Field(2, ge=1)
    """Keep the newest this many checkpoints."""
    async_save: bool = True
    """Write checkpoints in the background while training goes on."""
    init_from: str = ""
    """A new run starts from these parameters: a run directory (newest checkpoint) or a Hugging Face directory."""


class MeshConfig(Section):
    data: int = -1
    """Data-parallel axis size; -1 fills with the devices left over."""
    fsdp: int = 1
    """Fully-sharded data-parallel axis: batch and parameters are both split over it."""
    tensor: int = 1
    """Tensor-parallel axis: heads and MLP width are split over it."""
    expert: int = 1
    """Expert-parallel axis (for MoE models; batch is split over it for dense models)."""
    cpu_devices: int = pydantic.Field(1, ge=-1)
    """CPU, one process: split the host into this many devices; -1: as many as cores, mesh and batch allow."""
    dcn_data: int = pydantic.Field(1, ge=1)
    """Multi-slice: slices along the data axis (mesh.data is then the size within a slice)."""
    dcn_fsdp: int = pydantic.Field(1, ge=1)
    """Multi-slice: slices along the fsdp axis."""
    dcn_tensor: int = pydantic.Field(1, ge=1)
    """Multi-slice: slices along the tensor axis (rarely wise: tensor parallelism is chatty)."""
    dcn_expert: int = pydantic.Field(1, ge=1)
    """Multi-slice: slices along the expert axis."""


class DistributedConfig(Section):
    timeout_s: int = pydantic.Field(60, ge=1)
    """When a process dies, the others exit with an error after about this many seconds."""
    connect_timeout_s: int = pydantic.Field(300, ge=1)
    """How long processes wait for each other at start-up."""


# What each data.task asks of the model: a target sequence or a class label.
TASK_KINDS = {"funcname": "seq2seq", "docsig": "seq2seq", "package": "classify",
              "selective_copy": "masked_causal", "induction": "masked_causal"}
# Tasks generated from a seed rather than cut from the corpus (data.source is not read).
SYNTHETIC_TASKS = ("selective_copy", "induction")
# data.format values whose JSONL records are supervised examples, and the objective each trains.
# (preference: pairs of completions, chosen and rejected, for the decoders' preference objectives.)
FORMAT_OBJECTIVES = {"prompt_completion": "masked_causal", "chat": "masked_causal", "seq2seq": "seq2seq",
                     "classify": "classify", "preference": "dpo"}
# Objectives of data.format=preference (pref.method): any decoder trains them.
PREFERENCE_OBJECTIVES = ("dpo", "reward")
SUPERVISED_FORMATS = tuple(FORMAT_OBJECTIVES)
# The embedded instruction sets (data.source=instruct:NAME) and the data.format of their records.
INSTRUCT_FORMATS = {"stdlib": "chat", "arith": "prompt_completion"}
# Every data.source form (`data/sources.py` opens them), for messages and the mixture's check.
SOURCE_KINDS = ("stdlib", "text:PATH", "jsonl:PATH", "parquet:PATH", "hf_disk:DIR", "tfds:NAME",
                *(f"instruct:{name}" for name in INSTRUCT_FORMATS))


def instruct_format(source: str) -> str | None:
    """The data.format of an instruction set's records (None: not a known instruct: source)."""
    return INSTRUCT_FORMATS.get(source.removeprefix("instruct:")) if source.startswith("instruct:") else None


def source_kind_known(source: str) -> bool:
    """Whether `source` has one of the SOURCE_KINDS forms (the path itself is checked when opened)."""
    kind, _, arg = source.partition(":")
    return source == "stdlib" or (bool(arg) and kind in {k.split(":")[0] for k in SOURCE_KINDS if ":" in k})


def default_source_name(source: str) -> str:
    """A mixture entry's name when none is given: the last part of the source's path or name,
    without suffixes (`text:/data/web.txt` -> `web`, `jsonl:code/*.jsonl.zst` -> `code`)."""
    kind, _, arg = source.partition(":")
    if kind == "tfds":  # NAME/CONFIG:VERSION: the config tells datasets apart
        arg = arg.replace("/", "_")
    arg = arg or source
    parts = [p for p in re.split(r"[/\\]", arg) if p and not any(c in p for c in "*?[")]
    name = (parts[-1] if parts else source.partition(":")[0]).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "source"


class MixtureEntry(Section):
    source: str
    """Any data.source form (stdlib, text:PATH, jsonl:PATH, parquet:PATH, hf_disk:DIR, tfds:NAME)."""
    weight: float = pydantic.Field(gt=0)
    """Relative share of the training rows; the weights are normalised to sum to 1."""
    name: str = ""
    """Label in metrics (`data/share/<name>`); default from the source's path."""

    @pydantic.field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if not source_kind_known(source):
            raise ValueError(f"unknown source {source!r}; use one of: {', '.join(SOURCE_KINDS)}")
        if source.startswith("instruct:"):
            raise ValueError(f"{source} is a supervised instruction set; a mixture interleaves text sources only")
        return source

    @pydantic.field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if name and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"name {name!r} must be letters, digits, '_', '-' or '.' (it becomes a metric key)")
        return name

    @model_validator(mode="after")
    def _default_name(self) -> MixtureEntry:
        if not self.name:
            # (object.__setattr__: assignment would validate the model again, recursively.)
            object.__setattr__(self, "name", default_source_name(self.source))
        return self


class DataConfig(Section):
    source: str = "stdlib"
    """stdlib | text:PATH | jsonl:PATH (.gz, .zst) | parquet:PATH | hf_disk:DIR | tfds:NAME | instruct:stdlib|arith."""
    task: Literal["", "funcname", "docsig", "package", "selective_copy", "induction"] = ""
    """Empty: model the corpus. Else funcname, docsig, package (stdlib) or selective_copy, induction (docs/tasks.md)."""
    synthetic_vocab: int = pydantic.Field(16, ge=2)
    """Synthetic tasks: content token ids 0..synthetic_vocab-1; the next ids are blank and markers."""
    synthetic_copies: int = pydantic.Field(16, ge=1)
    """selective_copy: tokens to remember among blanks and copy out in order after the marker."""
    synthetic_examples: int = pydantic.Field(16384, ge=1)
    """Synthetic tasks: training rows generated (validation: eval_batches * batch_size more)."""
    tokenizer: str = "byte"
    """byte | sentencepiece | hf:PATH/tokenizer.json."""
    sp_vocab_size: int = pydantic.Field(4096, ge=512)
    """Vocabulary size of the sentencepiece BPE model trained on the training split."""
    text_field: str = "text"
    """Field holding the text in JSONL records, TFDS examples and Parquet / hf_disk columns."""
    format: Literal["auto", "text", "prompt_completion", "chat", "seq2seq", "classify", "preference"] = "auto"
    """jsonl: text, prompt_completion, chat, seq2seq, classify, preference records (docs/sft.md); auto: 1st record's."""
    labels: list[str | int] = []
    """classify: class i is labels[i]; empty: the training split's labels, sorted (then kept in config.yaml)."""
    skip_bad_records: bool = False
    """Skip (and count) bad or too long supervised records, and null Parquet / hf_disk texts, instead of stopping."""
    val_fraction: float = pydantic.Field(0.05, gt=0, lt=1)
    """Held-out fraction: a single text file's tail (cut at a line start); else documents by name hash."""
    max_bytes: int = pydantic.Field(0, ge=0)
    """Use at most this many bytes of text per split (0: all); keeps first runs quick."""
    cache_dir: str = ""
    """Where tokenised arrays are cached; default ~/.cache/llm_jax (or $LLM_JAX_CACHE)."""
    tfds_data_dir: str = ""
    """data_dir for tfds sources (default TFDS's own)."""
    prefetch: int = pydantic.Field(2, ge=0)
    """Batches prepared ahead of the training step."""
    mixture: list[MixtureEntry] | None = None
    """None: train on data.source. Else several sources, a list of {source, weight, name} (docs/data.md, Mixtures)."""

    @model_validator(mode="after")
    def _check_mixture(self) -> DataConfig:
        if self.mixture is None:
            return self
        if not self.mixture:
            raise ValueError("data.mixture is empty; list at least one {source, weight} entry or leave it unset")
        if self.source != DataConfig.model_fields["source"].default:
            raise ValueError(f"data.mixture replaces data.source (set to {self.source!r}); set one of them")
        names = [entry.name for entry in self.mixture]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.mixture names {', '.join(twice)} more than once; give the entries distinct names")
        if self.task:
            raise ValueError(f"data.task={self.task} builds its own rows; it does not read a data.mixture")
        if self.format in SUPERVISED_FORMATS:
            raise ValueError(f"data.mixture mixes text sources; data.format={self.format} examples are not mixed "
                             "(use data.source=jsonl:PATH)")
        return self


class BenchConfig(Section):
    steps: int = pydantic.Field(20, ge=1)
    """Timed steps of `llm-jax bench`."""
    warmup: int = pydantic.Field(3, ge=0)
    """Untimed steps after compilation."""
    profile_dir: str | None = None
    """Trace the timed steps (not compilation, not warmup) with the JAX profiler into this new (or empty)
    directory: TensorBoard's plugins/profile/ layout plus perfetto_trace.json.gz, which
    `scripts/profile_summary.py DIR` sums by kernel. Tracing slows the steps: the result is marked
    `"profiled": true`. An existing non-empty directory is refused."""


class Config(Section):
    run: RunConfig = RunConfig()
    """Where the run lives."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    model: ModelConfig = pydantic.Field(default_factory=ModelConfig)  # validated when families are registered
    """The network."""
    train: TrainConfig = TrainConfig()
    """The training loop."""
    optim: OptimConfig = OptimConfig()
    """The optimiser and its schedule."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpointing."""
    mesh: MeshConfig = MeshConfig()
    """The device mesh."""
    data: DataConfig = DataConfig()
    """Corpus and tokenizer."""
    distributed: DistributedConfig = DistributedConfig()
    """Multi-process runs (placement itself comes from flags, environment or the cluster)."""
    bench: BenchConfig = BenchConfig()
    """`llm-jax bench` settings."""
    pref: PrefConfig = PrefConfig()
    """Learning from preference pairs (data.format=preference): DPO and its variants, reward models."""
    rl: RLConfig = RLConfig()
    """Reinforcement learning from a reward: PPO, GRPO, RLOO (docs/alignment.md)."""

    @model_validator(mode="after")
    def _check_objective(self) -> Config:
        arch, task = self.model.arch, self.data.task
        spec = self.model.spec
        fmt = self.data.format
        if self.model.score_head and spec.kind != "decoder":
            raise ValueError(f"model.score_head is a decoder's scalar head (reward model, value); model.arch={arch} "
                             f"is a {spec.kind}")
        if self.data.labels and fmt not in ("classify", "auto"):  # (auto: `resolve_format` checks it again)
            raise ValueError(f"data.labels names the classes of data.format=classify, not of data.format={fmt}")
        if len(set(map(repr, self.data.labels))) < len(self.data.labels):
            raise ValueError(f"data.labels has a label twice: {self.data.labels}")
        wanted = instruct_format(self.data.source)
        if fmt != "auto" and wanted is not None and fmt != wanted:
            raise ValueError(f"data.source={self.data.source} is an instruction set of {wanted} records: use "
                             f"data.format={wanted} or auto, not {fmt}")
        if fmt in SUPERVISED_FORMATS:
            if task:
                raise ValueError(f"data.format={fmt} reads examples from data.source; data.task={task} builds its "
                                 "own rows: set one of them")
            if not self.data.source.startswith("jsonl:") and wanted != fmt:
                sets = [f"instruct:{name}" for name, f in INSTRUCT_FORMATS.items() if f == fmt]
                also = f" (or {either(sets)})" if sets else ""
                raise ValueError(f"data.format={fmt} reads JSONL records; it needs data.source=jsonl:PATH{also}, "
                                 f"not {self.data.source!r}")
            kind = self.objective
            if kind in PREFERENCE_OBJECTIVES:
                self._check_preference()
            elif kind not in spec.objectives:
                raise ValueError(f"data.format={fmt} trains the {kind} objective: it needs model.arch="
                                 f"{either(archs_where(lambda s: kind in s.objectives))}, not {arch}")
        if self.train.eval_exact_match and fmt not in ("prompt_completion", "chat", "auto"):
            raise ValueError(f"train.eval_exact_match scores generated completions of data.format=prompt_completion "
                             f"or chat records, not data.format={fmt}")
        if task and task not in SYNTHETIC_TASKS and self.data.source != "stdlib":
            raise ValueError(f"data.task={task} is built from the stdlib corpus; it needs data.source=stdlib")
        if task and TASK_KINDS[task] not in spec.objectives:
            kind = TASK_KINDS[task]
            raise ValueError(f"data.task={task} trains the {kind} objective: it needs model.arch="
                             f"{either(archs_where(lambda s: kind in s.objectives))}, not {arch}")
        if self.train.nsp and (spec.objectives[0] != "mlm" or task):
            raise ValueError(f"train.nsp (next-sentence prediction) is for masked-LM pretraining (model.arch="
                             f"{either(archs_where(lambda s: s.objectives[0] == 'mlm'))}), without a data.task")
        if self.train.packing:
            self._check_packing()
        # (data.format=auto of a JSONL file may turn out supervised: `sft_rows.resolve_format` decides.)
        undecided = fmt == "auto" and self.data.source.startswith(("jsonl:", "instruct:"))
        if not task and fmt not in SUPERVISED_FORMATS and not undecided and spec.objectives[0] in TASK_OBJECTIVES:
            tasks = [t for t, kind in TASK_KINDS.items() if kind in spec.objectives]
            formats = [f for f, kind in FORMAT_OBJECTIVES.items() if kind in spec.objectives]
            raise ValueError(f"model.arch={arch} trains on a data.task ({either(tasks)}) or on JSONL records "
                             f"(data.format={either(formats)})")
        return self

    def _check_preference(self) -> None:
        """Preference pairs train a decoder: DPO its LM head, a reward model its score head."""
        spec = self.model.spec
        if spec.kind != "decoder":
            raise ValueError(f"data.format=preference trains a decoder (model.arch="
                             f"{either(archs_where(lambda s: s.kind == 'decoder'))}), not {self.model.arch}")
        if self.pref.method == "reward" and not self.model.score_head:
            raise ValueError("pref.method=reward reads a reward from the model's score head: set model.score_head=true")

    def _check_packing(self) -> None:
        """train.packing keeps documents apart by segment ids, which only the causal decoders read;
        synthetic task rows are not EOS-ended documents."""
        arch, spec = self.model.arch, self.model.spec
        if spec.kind != "decoder":
            raise ValueError(f"train.packing is for the causal decoders (model.arch="
                             f"{either(archs_where(lambda s: s.kind == 'decoder'))}); model.arch={arch} is an "
                             f"{spec.kind} and does not take packed rows")
        if self.data.task in SYNTHETIC_TASKS:
            raise ValueError(f"train.packing packs EOS-ended documents; data.task={self.data.task} rows hold one "
                             "generated example each")
        if self.objective not in ("causal", "masked_causal"):
            raise ValueError(f"train.packing is for the causal and masked_causal objectives, not {self.objective}")

    @model_validator(mode="after")
    def _check_lengths(self) -> Config:
        if self.model.max_seq_len is not None and self.model.max_seq_len < self.train.seq_len:
            raise ValueError(
                f"model.max_seq_len={self.model.max_seq_len} is shorter than train.seq_len={self.train.seq_len}"
            )
        return self

    @property
    def max_seq_len(self) -> int:
        """Longest position the model must embed (the encoder's input too, for encoder-decoders)."""
        longest = self.train.seq_len
        if self.model.is_encoder_decoder:  # the encoder embeds the source's positions too
            longest = max(longest, self.train.src_len)
        return self.model.max_seq_len or longest

    @property
    def objective(self) -> str:
        """What the trainer optimises, from model.arch, data.task and data.format: `causal` (next
        token), `mlm` (bert's masked LM), `span` (t5's span corruption), `seq2seq` (a task's
        target given its source, of a task or a seq2seq record), `classify` (a task's or a record's
        label) or `masked_causal` (next token, scored only where a synthetic task's answers or a
        supervised example's completion are), `dpo` or `reward` (preference pairs, by
        pref.method). data.format=auto counts as text until training resolves it
        (`data.sft_rows.resolve_format`)."""
        if self.data.format == "preference":
            return "reward" if self.pref.method == "reward" else "dpo"
        if self.data.format in SUPERVISED_FORMATS:
            return FORMAT_OBJECTIVES[self.data.format]
        if self.data.task:
            return TASK_KINDS[self.data.task]
        return self.model.spec.objectives[0]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
