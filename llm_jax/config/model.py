"""The `model` section of the config schema (`ModelConfig` with its `moe` and `ssm` parts).

Split from `config_schema`, which holds the run-level sections and imports this one: the
network's keys are half of the schema and change with every model family, the run's keys do
not. The shared `Section` base sets the rules every section follows.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, model_validator

from llm_jax.config.families import ArchSpec, arch_spec, archs_where, either


class Section(BaseModel):
    """Unknown keys are refused; each field's docstring is its description; no float key takes
    NaN or infinity (a YAML `1e400` is inf: `optim.lr: 1e400` would train on NaN)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class MoEConfig(Section):
    num_experts: int = pydantic.Field(0, ge=0)
    """Experts per MoE layer; 0 = dense. MoE replaces the MLP of every `model.moe.every`-th block (docs/moe.md)."""
    top_k: int = pydantic.Field(2, ge=1)
    """Experts each token is sent to."""
    every: int = pydantic.Field(1, ge=1)
    """MoE in the last block of every group of this many; must divide num_layers. 1: all (Mixtral), 2: alternate."""
    capacity_factor: float = -1.0
    """-1: dropless. Else each expert takes at most ceil(factor * top_k * seq_len / E) tokens per sequence."""
    grouped_matmul: Literal["auto", "ragged_dot", "blocked", "looped", "megablox", "ragged_dot_mgpu"] = "auto"
    """Dropless grouped matmul: ragged_dot, blocked, looped, megablox (Pallas TPU kernel), ragged_dot_mgpu (JAX's
    Pallas Mosaic GPU kernel, Hopper only), or auto (TPU ragged_dot, CPU looped, else blocked; the two kernels
    are not yet measured, so auto never picks them). On CPU both kernels run in Pallas interpret mode (tests)."""
    num_shared_experts: int = pydantic.Field(0, ge=0)
    """Experts every token goes through besides its routed ones (DeepSeekMoE), as one dense MLP."""
    expert_d_ff: int | None = pydantic.Field(None, ge=1)
    """Hidden width of each expert; default model.d_ff (its default)."""
    router_jitter: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    """Training only: multiply the router's input by uniform noise in [1-jitter, 1+jitter] (Switch)."""
    routing: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    """softmax_topk: softmax over all experts, keep the top k (Mixtral); topk_softmax: softmax of the top k."""
    renormalize: bool = True
    """softmax_topk: rescale the kept gates to sum to 1 (Mixtral); false keeps the raw probabilities."""
    aux_loss_coef: float = pydantic.Field(0.01, ge=0.0)
    """Weight of the Switch/GShard load-balancing loss (1 when balanced), averaged over MoE layers."""
    z_loss_coef: float = pydantic.Field(0.001, ge=0.0)
    """Weight of the ST-MoE router z-loss mean(logsumexp(router logits)^2)."""
    bias_update_rate: float = pydantic.Field(0.0, ge=0.0)
    """DeepSeek-V3 aux-loss-free balancing: per-step change of a per-expert choice bias; 0 = off."""

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


class SSMConfig(Section):
    d_state: int = pydantic.Field(16, ge=1)
    """Mamba: state size N per channel."""
    d_conv: int = pydantic.Field(4, ge=1)
    """Mamba: width of the causal depthwise convolution."""
    expand: int = pydantic.Field(2, ge=1)
    """Mamba: d_inner = expand * d_model channels."""
    dt_rank: int | None = pydantic.Field(None, ge=1)
    """Mamba: rank of the delta projection; default ceil(d_model / 16)."""
    scan: Literal["auto", "associative", "chunked", "pallas", "pallas_gpu", "sequential"] = "auto"
    """Selective scan: sequential (reference), associative, chunked, pallas (fused kernel for TPU, Mosaic),
    pallas_gpu (fused kernel for GPU, Triton), or auto (sequential on CPU, else chunked; it never picks a fused
    kernel, none has been timed on its accelerator). On CPU the fused kernels run in Pallas interpret mode."""
    chunk: int = pydantic.Field(64, ge=1)
    """Chunk length of model.ssm.scan=chunked, pallas and pallas_gpu (the kernels round it: up to a multiple of 8
    for pallas; up to a power of two, at most 16, for pallas_gpu, whose backward holds a chunk's states in
    registers)."""
    selective: bool = True
    """false: the S4-like ablation (delta, B and C learned constants, not functions of the input)."""


class ModelConfig(Section):
    arch: str = "gpt"
    """Model family: a registered model.arch (the family table of README.md and docs/families.md)."""
    num_layers: int = pydantic.Field(4, ge=1)
    """Blocks (recurrent layers for rnn/lstm/gru; encoder blocks for transformer/t5)."""
    num_decoder_layers: int | None = pydantic.Field(None, ge=1)
    """Decoder blocks of the encoder-decoders (transformer, t5); default num_layers."""
    d_model: int = pydantic.Field(128, ge=1)
    """Residual stream width."""
    num_heads: int = pydantic.Field(4, ge=1)
    """Attention (query) heads; must divide d_model."""
    num_kv_heads: int | None = pydantic.Field(None, ge=1)
    """Key/value heads for grouped-query attention; default num_heads (multi-head)."""
    d_ff: int | None = pydantic.Field(None, ge=1)
    """MLP hidden width; default 4*d_model (8/3*d_model rounded up to 64 for swiglu)."""
    vocab_size: int | None = pydantic.Field(None, ge=1)
    """Embedding rows; default the tokenizer's vocabulary padded up to vocab_multiple."""
    vocab_multiple: int = pydantic.Field(128, ge=1)
    """Pad the default vocab_size up to a multiple of this (matmul-friendly shapes)."""
    max_seq_len: int | None = pydantic.Field(None, ge=1)
    """Longest sequence (learned position table size); default train.seq_len."""
    position: Literal["learned", "sinusoidal", "rope", "relative"] = "learned"
    """Positions: learned table, fixed sinusoids, rotary (rope), or T5's relative buckets (encoder-decoders)."""
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
    score_head: bool = False
    """Decoders: a scalar head on the final hidden state, aux["score"] [B, T] (reward model, PPO value)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialiser; residual projections scaled by 1/sqrt(2L)."""
    scan_layers: bool = False
    """Run the blocks with lax.scan (compile time flat in depth) instead of an unrolled loop."""
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    """Rematerialisation per block: none, full, dots (keep matmul outputs), dots_no_batch."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU. Parameters stay float32."""
    attention: Literal["auto", "xla", "cudnn", "blockwise", "splash", "pallas_gpu"] = "auto"
    """Attention kernel: auto (cudnn on GPU, blockwise on CPU, xla elsewhere), or force one. splash (TPU) and
    pallas_gpu (GPU): JAX's Pallas flash kernels, interpret mode on CPU; auto picks neither until measured."""
    attention_block: int = pydantic.Field(128, ge=8)
    """Query/key block length of the blockwise causal attention (CPU path)."""
    moe: MoEConfig = MoEConfig()
    """Mixture of Experts (off unless model.moe.num_experts > 0)."""
    ssm: SSMConfig = SSMConfig()
    """Mamba's selective state space layers (model.arch=mamba)."""
    layer_pattern: list[Literal["mamba", "attention", "mlp", "moe"]] = []
    """mamba: sublayers (mamba, attention, mlp, moe) of one repeat, tiled to num_layers; default [mamba]."""

    @model_validator(mode="after")
    def _check_family(self) -> ModelConfig:
        try:
            spec = arch_spec(self.arch)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        for key in ("layer_pattern",):
            if getattr(self, key) and key not in spec.keys:
                raise ValueError(f"model.{key} is for model.arch={either(archs_where(lambda s: key in s.keys))}, "
                                 f"not {self.arch}")
        if spec.check is not None:
            spec.check(self)
        if self.moe.enabled and "layer_pattern" not in spec.keys:
            if not spec.moe:
                raise ValueError(f"model.moe replaces a Transformer block's MLP; model.arch={self.arch} has none")
            if self.num_layers % self.moe.every:
                raise ValueError(f"model.moe.every={self.moe.every} does not divide model.num_layers={self.num_layers}")
            if self.is_encoder_decoder and self.decoder_layers % self.moe.every:
                raise ValueError(f"model.moe.every={self.moe.every} does not divide the {self.decoder_layers} "
                                 "decoder layers (model.num_decoder_layers)")
        if not spec.attends(self):
            return self  # no attention heads: those keys are ignored
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
        if spec.positions and self.position not in spec.positions:
            raise ValueError(f"model.position={self.position} is for model.arch="
                             f"{either(archs_where(lambda s: self.position in s.positions))}, not {self.arch}")
        return self

    @property
    def spec(self) -> ArchSpec:
        """The family's declaration of this arch (`config.families`)."""
        return arch_spec(self.arch)

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
        """Order comes from a recurrence (rnn, lstm, gru, mamba): no table bounds the length."""
        return not self.spec.positions

    @property
    def is_encoder_decoder(self) -> bool:
        """An encoder reads the source, a decoder cross-attends to it (transformer, t5)."""
        return self.spec.kind == "encoder-decoder"

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
