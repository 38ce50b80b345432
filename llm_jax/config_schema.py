"""The config schema: one pydantic section per part of a run, every field documented.

Each field's docstring becomes its description (`llm-jax keys`, README.md's key table).
Validators here check what the config alone decides (heads against d_model, a task against
model.arch); `parallel.mesh` checks what the devices decide. Loading presets, YAML files and
KEY=VALUE overrides is `llm_jax.config`.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RunConfig(_Section):
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints, tokenizer."""
    name: str = "default"
    """A label for the run, shown in logs."""
    compile_cache: bool = True
    """Keep compiled XLA programs in <cache root>/xla (see data.cache_dir), so a repeated run skips compiling."""


class MoEConfig(_Section):
    num_experts: int = pydantic.Field(0, ge=0)
    """Experts per MoE layer; 0 = a dense model. MoE layers replace the MLP of every `model.moe.every`-th block (gpt, bert)."""
    top_k: int = pydantic.Field(2, ge=1)
    """Experts each token is sent to."""
    every: int = pydantic.Field(1, ge=1)
    """Every this many blocks is an MoE block (the last of each group of `every`); must divide model.num_layers. 1 = all (Mixtral), 2 = alternate (GShard, Switch)."""
    capacity_factor: float = -1.0
    """-1: dropless (tokens sorted by expert, grouped matmul with lax.ragged_dot). Else capacity mode: each expert takes at most ceil(capacity_factor * top_k * seq_len / num_experts) tokens of each sequence (top-1 choices first, then in order); the rest are dropped (the residual carries them) and counted in `moe_dropped`."""
    grouped_matmul: Literal["auto", "ragged_dot", "blocked", "looped"] = "auto"
    """Dropless mode's grouped matmul: ragged_dot (jax.lax.ragged_dot), blocked (each expert's rows padded to whole blocks of 64-1024 rows, one batched matmul against per-block copies of the expert weights), looped (a loop over the used blocks of 64-512 rows, each multiplied by its expert's weights in place, with a hand-written backward pass), or auto: ragged_dot on TPU, looped on CPU, blocked elsewhere (XLA computes ragged_dot on CPU and GPU as one dense product per expert, E times the work; on an H200 it ran 2.8x slower than blocked)."""
    num_shared_experts: int = pydantic.Field(0, ge=0)
    """Experts every token goes through besides its routed ones (DeepSeekMoE): one dense MLP of width num_shared_experts * expert_d_ff."""
    expert_d_ff: int | None = None
    """Hidden width of each expert; default model.d_ff (its default)."""
    router_jitter: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    """Training only: multiply the router's input by uniform noise in [1-jitter, 1+jitter] (Switch Transformer)."""
    routing: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    """softmax_topk: softmax over all experts, keep the top k (renormalised when model.moe.renormalize; Mixtral). topk_softmax: softmax over the top-k logits only (the same gates as softmax_topk with renormalisation, computed from fewer exponentials)."""
    renormalize: bool = True
    """softmax_topk: rescale the kept gates to sum to 1 (Mixtral); false keeps the raw probabilities (Switch, DeepSeek-V2)."""
    aux_loss_coef: float = pydantic.Field(0.01, ge=0.0)
    """Weight of the Switch/GShard load-balancing loss E * sum_i f_i * P_i (f_i: share of token-expert assignments to expert i, P_i: mean router probability of i; 1 when balanced), averaged over MoE layers."""
    z_loss_coef: float = pydantic.Field(0.001, ge=0.0)
    """Weight of the ST-MoE router z-loss mean(logsumexp(router logits)^2), averaged over MoE layers."""
    bias_update_rate: float = pydantic.Field(0.0, ge=0.0)
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for choosing experts (not to the gates), moved by this much per step towards balance, up for underloaded experts and down for overloaded ones. 0 = off; 1e-3 is DeepSeek-V3's value."""

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.num_experts and self.top_k > self.num_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} exceeds model.moe.num_experts={self.num_experts}")
        if self.capacity_factor != -1 and self.capacity_factor <= 0:
            raise ValueError(f"model.moe.capacity_factor={self.capacity_factor} must be -1 (dropless) or positive")
        return self

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def dropless(self) -> bool:
        return self.capacity_factor == -1


class SSMConfig(_Section):
    d_state: int = pydantic.Field(16, ge=1)
    """Mamba: state size N per channel."""
    d_conv: int = pydantic.Field(4, ge=1)
    """Mamba: width of the causal depthwise convolution."""
    expand: int = pydantic.Field(2, ge=1)
    """Mamba: d_inner = expand * d_model channels."""
    dt_rank: int | None = None
    """Mamba: rank of the delta projection; default ceil(d_model / 16)."""
    scan: Literal["auto", "associative", "chunked", "sequential"] = "auto"
    """How the selective scan runs over the sequence: auto (sequential on CPU, where the parallel forms only add work; chunked on GPU/TPU), associative (jax.lax.associative_scan over the whole sequence: parallel, memory L*D*N), chunked (sequential over chunks of model.ssm.chunk, associative inside, each chunk rematerialised: memory bounded by the chunk), sequential (lax.scan one step at a time: the reference)."""
    chunk: int = pydantic.Field(64, ge=1)
    """Chunk length of model.ssm.scan=chunked."""
    selective: bool = True
    """false: the S4-like ablation: delta, B and C are learned constants instead of functions of the input."""


class ModelConfig(_Section):
    arch: Literal["gpt", "bert", "transformer", "t5", "rnn", "lstm", "gru", "mamba"] = "gpt"
    """Model family. `gpt`: decoder-only Transformer. `transformer`: the original encoder-decoder (Vaswani et al. 2017: post-LayerNorm blocks, shared source/target embeddings scaled by sqrt(d_model) and tied to the output, sinusoidal positions by default), trained on a seq2seq `data.task`. `t5`: encoder-decoder with pre-RMSNorm blocks without biases, relative position buckets (`model.position=relative`), unscaled attention and a tied output scaled by d_model^-0.5; it pretrains with span corruption on the corpus, or fine-tunes text-to-text on a seq2seq `data.task`. `bert`: encoder-only Transformer (post-norm blocks, bidirectional attention, exact GELU, segment embeddings, tied MLM head) trained with the masked-LM objective; it does not generate. `rnn` (Elman, tanh), `lstm`, `gru`: recurrent LMs whose layers are pre-norm residual cells of hidden size d_model; they ignore the attention, position and MLP keys (num_heads, num_kv_heads, d_ff, position, rope_theta, mlp, attention, attention_block) and scan_layers/remat, and have no sequence-length limit at generation. `mamba`: selective state space blocks (Gu and Dao 2023: pre-RMSNorm residual blocks of in_proj, causal depthwise conv, selective scan gated by SiLU(z), out_proj; tied embeddings; `model.ssm.*`), optionally mixed with attention and MoE layers by `model.layer_pattern`; it ignores the position keys and generates with a constant-size state."""
    num_layers: int = pydantic.Field(4, ge=1)
    """Number of transformer blocks (recurrent layers for rnn/lstm/gru; encoder blocks for transformer/t5)."""
    num_decoder_layers: int | None = None
    """Decoder blocks of the encoder-decoders (transformer, t5); default num_layers."""
    d_model: int = pydantic.Field(128, ge=1)
    """Residual stream width."""
    num_heads: int = pydantic.Field(4, ge=1)
    """Attention (query) heads; must divide d_model."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; default num_heads (multi-head)."""
    d_ff: int | None = None
    """MLP hidden width; default 4*d_model (8/3*d_model rounded up to 64 for swiglu)."""
    vocab_size: int | None = None
    """Embedding rows; default the tokenizer's vocabulary padded up to vocab_multiple."""
    vocab_multiple: int = pydantic.Field(128, ge=1)
    """Pad the default vocab_size up to a multiple of this (matmul-friendly shapes)."""
    max_seq_len: int | None = None
    """Longest sequence the model supports (learned position table size); default train.seq_len."""
    position: Literal["learned", "sinusoidal", "rope", "relative"] = "learned"
    """Position encoding: learned table, fixed sinusoids added to the input, rotary (RoPE), or T5's relative position buckets (a learned bias per head and bucket, encoder-decoders only)."""
    relative_buckets: int = pydantic.Field(32, ge=2)
    """Buckets of model.position=relative (half per direction in the encoder); T5 uses 32."""
    relative_max_distance: int = pydantic.Field(128, ge=2)
    """Distances beyond this share the last (logarithmic) bucket; T5 uses 128."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation in the pre-norm blocks and before the output layer."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    mlp: Literal["gelu", "relu", "swiglu"] = "gelu"
    """MLP activation; swiglu uses a gated MLP with three matrices."""
    use_bias: bool = True
    """Biases in the dense layers and norms."""
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    """Dropout rate on embeddings, attention output and MLP output (training only)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output layer."""
    init_std: float = 0.02
    """Standard deviation of the normal initialiser; residual projections are scaled by 1/sqrt(2L)."""
    scan_layers: bool = False
    """Run the blocks with lax.scan (compile time flat in depth) instead of an unrolled loop."""
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    """Rematerialisation per block: none, full (keep block inputs), dots (keep matmul outputs), dots_no_batch."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU. Parameters stay float32."""
    attention: Literal["auto", "xla", "cudnn", "blockwise"] = "auto"
    """Attention kernel: auto (cudnn on GPU, blockwise causal on CPU, xla elsewhere), or force one."""
    attention_block: int = pydantic.Field(128, ge=8)
    """Query/key block length of the blockwise causal attention (CPU path)."""
    moe: MoEConfig = MoEConfig()
    """Mixture of Experts (off unless model.moe.num_experts > 0)."""
    ssm: SSMConfig = SSMConfig()
    """Mamba's selective state space layers (model.arch=mamba)."""
    layer_pattern: list[Literal["mamba", "attention", "mlp", "moe"]] = []
    """model.arch=mamba: the residual sublayers of one repeat of the stack, repeated to fill model.num_layers sublayers (which it must divide); default [mamba]. mamba: norm + Mamba mixer; attention: a decoder block (norm + causal attention, norm + MLP); mlp: norm + MLP; moe: norm + MoE feed-forward (model.moe.*). E.g. [mamba, mamba, attention] or Jamba-like [mamba, moe, mamba, mlp, attention, moe]."""

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.arch != "mamba" and self.layer_pattern:
            raise ValueError(f"model.layer_pattern is for model.arch=mamba, not {self.arch}")
        if self.arch == "mamba":
            pattern = self.pattern
            if self.num_layers % len(pattern):
                raise ValueError(f"model.layer_pattern has {len(pattern)} entries, which do not divide "
                                 f"model.num_layers={self.num_layers}")
            if "moe" in pattern and not self.moe.enabled:
                raise ValueError("model.layer_pattern has moe layers but model.moe.num_experts is 0")
            if self.moe.enabled and "moe" not in pattern:
                raise ValueError("model.moe.num_experts is set but model.layer_pattern has no moe entry")
            if "attention" not in pattern:
                return self  # no attention heads: those keys are ignored
        elif self.moe.enabled:
            if self.arch not in ("gpt", "bert"):
                raise ValueError(f"model.moe is built into the decoder (model.arch=gpt) and the encoder (bert), "
                                 f"not model.arch={self.arch}")
            if self.num_layers % self.moe.every:
                raise ValueError(f"model.moe.every={self.moe.every} does not divide model.num_layers={self.num_layers}")
        if self.is_recurrent:
            return self  # no attention heads: these keys are ignored
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(
                f"model.num_kv_heads={kv} does not divide model.num_heads={self.num_heads}"
            )
        if self.position == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError("model.position=rope needs an even head dimension (d_model/num_heads)")
        if self.position == "relative" and not self.is_encoder_decoder:
            raise ValueError(f"model.position=relative is for the encoder-decoders (transformer, t5), not model.arch={self.arch}")
        if self.position == "rope" and self.is_encoder_decoder:
            raise ValueError(f"model.arch={self.arch} takes model.position learned, sinusoidal or relative, not rope")
        return self

    @property
    def pattern(self) -> list[str]:
        """The residual sublayers of one repeat of a mamba stack."""
        return list(self.layer_pattern) or ["mamba"]

    @property
    def d_inner(self) -> int:
        return self.ssm.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return self.ssm.dt_rank or -(-self.d_model // 16)

    @property
    def has_no_positions(self) -> bool:
        """rnn / lstm / gru / mamba: order comes from the recurrence; no table bounds the length."""
        return self.is_recurrent or self.arch == "mamba"

    @property
    def is_recurrent(self) -> bool:
        """rnn / lstm / gru: a recurrent state instead of attention and positions."""
        return self.arch in ("rnn", "lstm", "gru")

    @property
    def is_encoder_decoder(self) -> bool:
        """transformer / t5: an encoder reads the source, a decoder cross-attends to it."""
        return self.arch in ("transformer", "t5")

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def expert_ff_dim(self) -> int:
        return self.moe.expert_d_ff or self.ff_dim

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return -(-(8 * self.d_model // 3) // 64) * 64
        return 4 * self.d_model


class TrainConfig(_Section):
    steps: int = pydantic.Field(1000, ge=1)
    """Optimiser steps to train for (the run ends at this step; raise it to train further)."""
    batch_size: int = pydantic.Field(32, ge=1)
    """Global batch size in sequences, over all devices and processes."""
    seq_len: int = pydantic.Field(256, ge=2)
    """Tokens per training sequence (windows of seq_len+1 give inputs and shifted targets)."""
    src_len: int = pydantic.Field(256, ge=2)
    """Encoder input length (tokens, end-of-text included) of a seq2seq data.task; longer sources are cut. train.seq_len is then the target length (for a classification task, the text length)."""
    label_smoothing: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    """Move this much of each target's probability uniformly onto the tokenizer's ids in the training loss (Vaswani et al. use 0.1); evaluation reports plain cross entropy."""
    nsp: bool = False
    """bert: also train next-sentence prediction; each window becomes [CLS] A [SEP] B [SEP] with B the continuation of A or (half the time) a span of another window."""
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
    sample_tokens: int = pydantic.Field(200, ge=0)
    """Tokens to sample and print at the end of training (0: no sample)."""
    sample_prompt: str = "\n"
    """Prompt of the end-of-training sample."""
    progress: bool = True
    """Progress with ETA on process 0: a live bar on a terminal, a log line per logged step otherwise."""
    tensorboard: bool = True
    """Write TensorBoard event files to <run.dir>/tb."""

    @model_validator(mode="after")
    def _check_accum(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
            )
        return self


class OptimConfig(_Section):
    lr: float = pydantic.Field(1e-3, gt=0)
    """Peak learning rate."""
    min_lr: float = pydantic.Field(1e-4, ge=0)
    """Learning rate at the end of the decay."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to min_lr over the remaining steps, or constant."""
    warmup_steps: int = pydantic.Field(100, ge=0)
    """Linear warmup from 0 to lr."""
    decay_steps: int | None = None
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


class CheckpointConfig(_Section):
    every: int = pydantic.Field(500, ge=0)
    """Save every this many steps (0: only at the end)."""
    keep: int = pydantic.Field(2, ge=1)
    """Keep the newest this many checkpoints."""
    async_save: bool = True
    """Write checkpoints in the background while training goes on."""
    init_from: str = ""
    """A new run starts from these parameters: a run directory (newest checkpoint) or a Hugging Face directory."""


class MeshConfig(_Section):
    data: int = -1
    """Data-parallel axis size; -1 fills with the devices left over."""
    fsdp: int = 1
    """Fully-sharded data-parallel axis: batch and parameters are both split over it."""
    tensor: int = 1
    """Tensor-parallel axis: heads and MLP width are split over it."""
    expert: int = 1
    """Expert-parallel axis (for MoE models; batch is split over it for dense models)."""
    cpu_devices: int = pydantic.Field(1, ge=-1)
    """CPU, one process: split the host into this many devices so data parallelism uses every core; -1: as many as cores, mesh and batch allow."""
    dcn_data: int = pydantic.Field(1, ge=1)
    """Multi-slice: slices along the data axis (over the data-centre network); data=ICI size within a slice."""
    dcn_fsdp: int = pydantic.Field(1, ge=1)
    """Multi-slice: slices along the fsdp axis."""
    dcn_tensor: int = pydantic.Field(1, ge=1)
    """Multi-slice: slices along the tensor axis (rarely wise: tensor parallelism is chatty)."""
    dcn_expert: int = pydantic.Field(1, ge=1)
    """Multi-slice: slices along the expert axis."""


class DistributedConfig(_Section):
    timeout_s: int = pydantic.Field(60, ge=1)
    """When a process dies, the others exit with an error after about this many seconds (heartbeat timeout)."""
    connect_timeout_s: int = pydantic.Field(300, ge=1)
    """How long processes wait for each other at start-up."""


# What each data.task asks of the model: a target sequence or a class label.
TASK_KINDS = {"funcname": "seq2seq", "docsig": "seq2seq", "package": "classify",
              "selective_copy": "masked_causal", "induction": "masked_causal"}
# Tasks generated from a seed rather than cut from the corpus (data.source is not read).
SYNTHETIC_TASKS = ("selective_copy", "induction")


class DataConfig(_Section):
    source: str = "stdlib"
    """stdlib | text:PATH (file, directory or glob) | jsonl:PATH | tfds:NAME."""
    task: Literal["", "funcname", "docsig", "package", "selective_copy", "induction"] = ""
    """Empty: model the corpus. Else a supervised task built from the stdlib source files: funcname, docsig (seq2seq, for transformer/t5), package (classification, for bert); or a synthetic task of the Mamba paper, generated from the seed (no corpus read; for the causal models): selective_copy, induction; see README."""
    synthetic_vocab: int = pydantic.Field(16, ge=2)
    """Synthetic tasks: token ids 0..synthetic_vocab-1 carry content; the next ids are the blank/noise and marker tokens."""
    synthetic_copies: int = pydantic.Field(16, ge=1)
    """selective_copy: tokens to remember (scattered among blanks) and copy out in order after the marker."""
    synthetic_examples: int = pydantic.Field(16384, ge=1)
    """Synthetic tasks: training examples generated (validation: a separate draw of train.eval_batches * train.batch_size)."""
    tokenizer: str = "byte"
    """byte | sentencepiece | hf:PATH/tokenizer.json."""
    sp_vocab_size: int = pydantic.Field(4096, ge=512)
    """Vocabulary size of the sentencepiece BPE model trained on the training split."""
    text_field: str = "text"
    """Field holding the text in JSONL records and TFDS examples."""
    val_fraction: float = pydantic.Field(0.05, gt=0, lt=1)
    """Held-out fraction: a single text file's tail (nanoGPT-style, cut at a line start); else documents by name hash."""
    max_bytes: int = pydantic.Field(0, ge=0)
    """Use at most this many bytes of text per split (0: all); keeps first runs quick."""
    cache_dir: str = ""
    """Where tokenised arrays are cached; default ~/.cache/llm_jax (or $LLM_JAX_CACHE)."""
    tfds_data_dir: str = ""
    """data_dir for tfds sources (default TFDS's own)."""
    prefetch: int = pydantic.Field(2, ge=0)
    """Batches prepared ahead of the training step."""


class BenchConfig(_Section):
    steps: int = pydantic.Field(20, ge=1)
    """Timed steps of `llm-jax bench`."""
    warmup: int = pydantic.Field(3, ge=0)
    """Untimed steps after compilation."""


class Config(_Section):
    run: RunConfig = RunConfig()
    """Where the run lives."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    model: ModelConfig = ModelConfig()
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

    @model_validator(mode="after")
    def _check_objective(self) -> Config:
        arch, task = self.model.arch, self.data.task
        kind = TASK_KINDS.get(task)
        if kind == "masked_causal" and (arch == "bert" or self.model.is_encoder_decoder):
            raise ValueError(f"data.task={task} trains a causal language model (gpt, mamba, rnn, lstm, gru), not {arch}")
        if task and task not in SYNTHETIC_TASKS and self.data.source != "stdlib":
            raise ValueError(f"data.task={task} is built from the stdlib corpus; it needs data.source=stdlib")
        if kind == "seq2seq" and not self.model.is_encoder_decoder:
            raise ValueError(f"data.task={task} is sequence-to-sequence: it needs model.arch=transformer or t5, not {arch}")
        if kind == "classify" and arch != "bert":
            raise ValueError(f"data.task={task} is a classification task: it needs model.arch=bert, not {arch}")
        if self.train.nsp and (arch != "bert" or task):
            raise ValueError("train.nsp (next-sentence prediction) is for model.arch=bert pretraining, without a data.task")
        if arch == "transformer" and not task:
            raise ValueError("model.arch=transformer trains on a sequence-to-sequence data.task: funcname or docsig")
        return self

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
        if self.model.is_encoder_decoder:
            longest = max(longest, self.train.src_len)
        return self.model.max_seq_len or longest

    @property
    def objective(self) -> str:
        """What the trainer optimises, from model.arch and data.task: `causal` (next token),
        `mlm` (bert's masked LM), `span` (t5's span corruption), `seq2seq` (a task's target
        given its source), `classify` (a task's label) or `masked_causal` (next token, scored
        only where a synthetic task's answers are)."""
        if self.data.task:
            return TASK_KINDS[self.data.task]
        return {"bert": "mlm", "t5": "span"}.get(self.model.arch, "causal")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
