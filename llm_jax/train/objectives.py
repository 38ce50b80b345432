"""Training objectives: each turns a batch of int32 rows into (model inputs, targets, weights).

The model is called as `model(**inputs)`; the loss is the cross entropy against `targets`
summed with `weights` (1 = counts, 0 = ignored; None = every position) over the summed weights.

- `causal` (GPT, recurrent): rows are [B, T+1] windows; inputs the first T tokens, targets the next.
- `mlm` (BERT, Devlin et al. 2019): each of the first T positions of a window is chosen with
  probability `rate` (15%), independently (a Bernoulli draw per position, as Hugging Face's
  DataCollatorForLanguageModeling does). Of the chosen positions 80% become the mask id, 10% a
  random token and 10% stay; the model predicts the original token at every chosen position.
- `span` (T5, Raffel et al. 2020): the first T tokens of a window are split into alternating
  kept and noise spans (noise_density of the tokens in spans of mean length mean_span, the
  counts fixed so every shape is static); the encoder reads the kept tokens with each noise span
  replaced by a sentinel, the decoder predicts sentinel + span for each, then end-of-text.
- `seq2seq` (transformer, t5 on a data.task): rows hold a padded source and a padded target
  (`data.tasks`); padding (-1) is hidden from attention and from the loss.
- `masked_causal` (causal models on a synthetic data.task, `data/synthetic.py`): rows are a
  [T+1] window and T 0/1 weights, [B, 2T+1]; next-token prediction scored only where the
  weights are 1 (the task's answers), so eval accuracy is the task's accuracy.

Random draws (masks, spans) come from a key that depends only on (seed, step), so a resumed run
and any mesh see the same ones; evaluation uses the fixed step EVAL_STEP, so every evaluation
scores the same corruption.

Extra token ids: a tokenizer's own `[MASK]` / `<extra_id_k>` tokens when it has them; otherwise
the first padding rows of the model's vocabulary (ids from the tokenizer's vocabulary size up).
For the byte tokenizer (257 ids) padded to 384 rows these are ids 257..383, rows no text ever
produces. Random MLM replacements come from the tokenizer's real ids [0, vocab), never padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError

MASK_TOKEN = "[MASK]"
# Folded into the seed's key so objective draws never coincide with the dropout stream of a step.
MLM_STREAM = 0x4D4C4D  # "MLM"
SPAN_STREAM = 0x535041  # "SPA"
PAD = -1  # padding in task rows: never a token id
# The held-out loss uses the masks of this (never trained) step number for every evaluation: the
# same positions are scored each time, so evaluations along a run compare like with like.
EVAL_STEP = 2**31 - 1


@dataclass(frozen=True)
class MLMSpec:
    mask_id: int
    vocab_limit: int  # random replacements are drawn from [0, vocab_limit)
    rate: float = 0.15
    mask_frac: float = 0.8  # of the chosen: replaced by mask_id
    random_frac: float = 0.1  # of the chosen: replaced by a random token (the rest stay)


def mlm_spec(tokenizer_vocab: int, model_vocab: int, mask_token_id: int | None = None) -> MLMSpec:
    """The masking spec: `mask_token_id` (the tokenizer's [MASK], if it has one) or else the first
    padding row, `tokenizer_vocab`; random replacements from [0, tokenizer_vocab)."""
    mask_id = extra_id(MASK_TOKEN, 0, tokenizer_vocab, model_vocab, lambda _: mask_token_id)
    return MLMSpec(mask_id=int(mask_id), vocab_limit=int(tokenizer_vocab))


def mlm_key(seed: int, step: jax.Array | int, stream: int = MLM_STREAM) -> jax.Array:
    """The key of one step's draws for an objective's `stream`: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)


def mlm_mask(key: jax.Array, tokens_BT: jax.Array, spec: MLMSpec) -> tuple[jax.Array, jax.Array]:
    """(corrupted inputs [B, T] int32, chosen [B, T] bool) for BERT's 80/10/10 masking."""
    k_choose, k_kind, k_token = jax.random.split(key, 3)
    shape = tokens_BT.shape
    chosen_BT = jax.random.bernoulli(k_choose, spec.rate, shape)
    kind_BT = jax.random.uniform(k_kind, shape)
    random_BT = jax.random.randint(k_token, shape, 0, spec.vocab_limit, dtype=jnp.int32)
    tokens_BT = tokens_BT.astype(jnp.int32)
    replaced_BT = jnp.where(kind_BT < spec.mask_frac, jnp.int32(spec.mask_id),
                            jnp.where(kind_BT < spec.mask_frac + spec.random_frac, random_BT, tokens_BT))
    return jnp.where(chosen_BT, replaced_BT, tokens_BT), chosen_BT


def causal_targets(tokens_BT1: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    """Inputs are the first T tokens, targets the next ones; every position counts (weights None)."""
    return tokens_BT1[:, :-1], tokens_BT1[:, 1:], None


def mlm_targets(tokens_BT1: jax.Array, key: jax.Array, spec: MLMSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masked LM on the first T tokens of each window: (corrupted inputs, originals, chosen as float32)."""
    tokens_BT = tokens_BT1[:, :-1]
    inputs_BT, chosen_BT = mlm_mask(key, tokens_BT, spec)
    return inputs_BT, tokens_BT, chosen_BT.astype(jnp.float32)


# ---------------------------------------------------------------- span corruption (T5)


@dataclass(frozen=True)
class SpanSpec:
    length: int  # raw tokens corrupted per row (train.seq_len)
    noise: int  # of which hidden
    spans: int  # in this many noise spans
    sentinels: tuple[int, ...]  # id of the sentinel of span k (k < spans)
    eos_id: int
    start_id: int  # the decoder's first input

    @property
    def source_len(self) -> int:
        return self.length - self.noise + self.spans + 1  # kept tokens, a sentinel per span, EOS

    @property
    def target_len(self) -> int:
        return self.noise + self.spans + 1  # each span after its sentinel, EOS


def span_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row: fixed per row, as in T5, so shapes are static."""
    noise = min(max(round(length * density), 1), length - 1)
    spans = min(max(round(noise / mean_span), 1), noise, length - noise)
    return noise, spans


def span_spec(length: int, density: float, mean_span: float, tokenizer_vocab: int, model_vocab: int,
              eos_id: int, start_id: int, lookup=None) -> SpanSpec:
    """Sentinels are the tokenizer's `<extra_id_k>` tokens when `lookup` finds them, else the
    padding rows after its vocabulary."""
    noise, spans = span_counts(length, density, mean_span)
    found = [lookup(f"<extra_id_{k}>") for k in range(spans)] if lookup is not None else [None]
    if all(i is not None for i in found):
        sentinels = tuple(int(i) for i in found)
    else:
        if tokenizer_vocab + spans > model_vocab:
            raise UserError(
                f"span corruption needs {spans} sentinel ids: the tokenizer has no <extra_id_k> tokens and "
                f"model.vocab_size={model_vocab} leaves {model_vocab - tokenizer_vocab} padding rows after its "
                f"{tokenizer_vocab} ids; raise model.vocab_size or lower train.seq_len")
        sentinels = tuple(range(tokenizer_vocab, tokenizer_vocab + spans))
    return SpanSpec(length, noise, spans, sentinels, int(eos_id), int(start_id))


def _segment_lengths(key: jax.Array, items: int, segments: int) -> jax.Array:
    """Random lengths (each >= 1) of `segments` consecutive pieces of `items` items."""
    dividers = (jnp.arange(items - 1) < segments - 1).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jax.random.permutation(key, dividers)])
    return jnp.zeros(segments, jnp.int32).at[jnp.cumsum(starts)].add(1)


def _emit(values_L: jax.Array, emitted_L: jax.Array, size: int) -> jax.Array:
    """The emitted values in order, packed into `size` slots (exactly `size` are emitted)."""
    slot = jnp.where(emitted_L, jnp.cumsum(emitted_L) - 1, size)
    return jnp.zeros(size, jnp.int32).at[slot].set(values_L, mode="drop")


def span_corrupt_row(key: jax.Array, tokens_L: jax.Array, spec: SpanSpec) -> tuple[jax.Array, jax.Array]:
    """(encoder input [source_len], decoder target [target_len]) of one row of raw tokens."""
    k_noise, k_keep = jax.random.split(key)
    noise_len = _segment_lengths(k_noise, spec.noise, spec.spans)
    keep_len = _segment_lengths(k_keep, spec.length - spec.noise, spec.spans)
    # Alternating kept, noise, kept, noise...: a row starts with kept tokens and ends in noise.
    ends = jnp.cumsum(jnp.stack([keep_len, noise_len], axis=1).reshape(-1))
    segment_L = jnp.searchsorted(ends, jnp.arange(spec.length), side="right")
    noise_L = segment_L % 2 == 1
    first_L = jnp.concatenate([jnp.ones(1, bool), segment_L[1:] != segment_L[:-1]])
    sentinel_L = jnp.asarray(spec.sentinels, jnp.int32)[segment_L // 2]
    tokens_L = tokens_L.astype(jnp.int32)
    eos = jnp.full(1, spec.eos_id, jnp.int32)
    # Encoder: kept tokens, and a noise span's sentinel in place of the span.
    source = _emit(jnp.where(noise_L, sentinel_L, tokens_L), ~noise_L | first_L, spec.source_len - 1)
    # Decoder: the mirror image, kept spans become the sentinels that introduce each noise span.
    target = _emit(jnp.where(noise_L, tokens_L, sentinel_L), noise_L | first_L, spec.target_len - 1)
    return jnp.concatenate([source, eos]), jnp.concatenate([target, eos])


def span_targets(tokens_BT1: jax.Array, key: jax.Array, spec: SpanSpec) -> tuple[dict, jax.Array, None]:
    rows = tokens_BT1[:, :spec.length]
    keys = jax.random.split(key, rows.shape[0])
    src_BS, tgt_BT = jax.vmap(lambda k, r: span_corrupt_row(k, r, spec))(keys, rows)
    dec_in_BT = jnp.concatenate([jnp.full((rows.shape[0], 1), spec.start_id, jnp.int32), tgt_BT[:, :-1]], axis=1)
    return {"src_BS": src_BS, "tgt_BT": dec_in_BT}, tgt_BT, None


# ---------------------------------------------------------------- seq2seq tasks


def seq2seq_targets(rows_BR: jax.Array, src_len: int) -> tuple[dict, jax.Array, jax.Array]:
    """Task rows [B, src_len + T + 1] (`data.tasks`): source, then [start] + target + [eos],
    padded with PAD. Padding reads as id 0 (hidden from attention), and scores nothing."""
    src_BS = rows_BR[:, :src_len]
    dec_BT1 = rows_BR[:, src_len:]
    src_mask_BS = src_BS != PAD
    inputs = {"src_BS": jnp.where(src_mask_BS, src_BS, 0),
              "tgt_BT": jnp.maximum(dec_BT1[:, :-1], 0),  # padding only follows the eos: causal masking hides it
              "src_mask_BS": src_mask_BS}
    targets_BT = dec_BT1[:, 1:]
    weights_BT = (targets_BT != PAD).astype(jnp.float32)
    return inputs, jnp.maximum(targets_BT, 0), weights_BT


# ---------------------------------------------------------------- synthetic tasks


def masked_causal_targets(rows_BR: jax.Array, seq_len: int) -> tuple[dict, jax.Array, jax.Array]:
    """Rows [B, 2T + 1] (`data.synthetic`): a window of T + 1 tokens, then T weights. Inputs are the
    window's first T tokens, targets the next; only targets of weight 1 are scored."""
    T = seq_len
    return {"tokens_BT": rows_BR[:, :T]}, rows_BR[:, 1:T + 1], rows_BR[:, T + 1:].astype(jnp.float32)


# ---------------------------------------------------------------- classification tasks

CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"


def classify_targets(rows_BR: jax.Array, cls_id: int) -> tuple[dict, jax.Array, None]:
    """Task rows [B, T + 1] (text padded with PAD, then the label): the model reads [CLS] and the
    first T - 1 text tokens, padding hidden; the target is the label, one per row ([B, 1])."""
    text_BT = rows_BR[:, :-2]
    B = rows_BR.shape[0]
    tokens_BT = jnp.concatenate([jnp.full((B, 1), cls_id, jnp.int32), jnp.maximum(text_BT, 0)], axis=1)
    mask_BT = jnp.concatenate([jnp.ones((B, 1), bool), text_BT != PAD], axis=1)
    return {"tokens_BT": tokens_BT, "attention_mask_BT": mask_BT}, rows_BR[:, -1:], None


def extra_id(name: str, index: int, tokenizer_vocab: int, model_vocab: int, lookup=None) -> int:
    """The tokenizer's own `name` token, else padding row `tokenizer_vocab + index` (the rows after
    the tokenizer's ids: [MASK] is index 0, [CLS] 1, [SEP] 2)."""
    found = lookup(name) if lookup is not None else None
    if found is not None:
        return int(found)
    if tokenizer_vocab + index >= model_vocab:
        raise UserError(f"the tokenizer has no {name} token and model.vocab_size={model_vocab} leaves no padding "
                        f"row for it after its {tokenizer_vocab} ids; raise model.vocab_size (or model.vocab_multiple)")
    return tokenizer_vocab + index


# ---------------------------------------------------------------- one interface for the step


@dataclass(frozen=True)
class Objective:
    """What the train and eval steps need to know: which objective, and its static parameters.

    `data(batch, key_step)` gives (inputs, targets, weights); `key_step` is the training step
    (draws of mlm and span) or EVAL_STEP for evaluation.
    """

    kind: str  # causal | mlm | span | seq2seq | classify | masked_causal
    seed: int = 0
    seq_len: int = 0  # T of masked_causal rows [B, 2T + 1]
    mlm: MLMSpec | None = None
    span: SpanSpec | None = None
    src_len: int = 0
    cls_id: int = 0
    sep_id: int = 0  # with cls_id, for mlm with next-sentence prediction (`nsp`)
    nsp: bool = False
    smoothing: float = 0.0  # label smoothing of the training loss
    smoothing_ids: int = 0  # spread over ids [0, smoothing_ids): the tokenizer's, not padding rows

    def data(self, batch: jax.Array, key_step) -> tuple[dict, jax.Array, jax.Array | None]:
        if self.kind == "mlm" and self.nsp:
            from llm_jax.train.nsp import NSPSpec, nsp_targets  # nsp builds on this module

            return nsp_targets(batch, mlm_key(self.seed, key_step), self.mlm, NSPSpec(self.cls_id, self.sep_id))
        if self.kind == "mlm":
            inputs_BT, targets_BT, weights_BT = mlm_targets(batch, mlm_key(self.seed, key_step), self.mlm)
            return {"tokens_BT": inputs_BT}, targets_BT, weights_BT
        if self.kind == "span":
            return span_targets(batch, mlm_key(self.seed, key_step, SPAN_STREAM), self.span)
        if self.kind == "seq2seq":
            return seq2seq_targets(batch, self.src_len)
        if self.kind == "classify":
            return classify_targets(batch, self.cls_id)
        if self.kind == "masked_causal":
            return masked_causal_targets(batch, self.seq_len)
        inputs_BT, targets_BT, _ = causal_targets(batch)
        return {"tokens_BT": inputs_BT}, targets_BT, None


def build_objective(cfg, tokenizer_vocab: int, model_vocab: int, eos_id: int, lookup=None) -> Objective:
    """The objective of `cfg.objective` for a tokenizer with `tokenizer_vocab` ids whose special
    tokens `lookup(name) -> id | None` finds (None: it has none)."""
    kind = cfg.objective
    smoothing = dict(smoothing=cfg.train.label_smoothing, smoothing_ids=tokenizer_vocab)
    if kind == "mlm":
        mask_id = lookup(MASK_TOKEN) if lookup is not None else None
        spec = mlm_spec(tokenizer_vocab, model_vocab, mask_id)
        if not cfg.train.nsp:
            return Objective("mlm", cfg.seed, mlm=spec, **smoothing)
        return Objective("mlm", cfg.seed, mlm=spec, nsp=True, **smoothing,
                         cls_id=extra_id(CLS_TOKEN, 1, tokenizer_vocab, model_vocab, lookup),
                         sep_id=extra_id(SEP_TOKEN, 2, tokenizer_vocab, model_vocab, lookup))
    if kind == "span":
        spec = span_spec(cfg.train.seq_len, cfg.train.noise_density, cfg.train.mean_span, tokenizer_vocab,
                         model_vocab, eos_id, decoder_start_id(eos_id, lookup), lookup)
        return Objective("span", cfg.seed, span=spec, **smoothing)
    if kind == "seq2seq":
        return Objective("seq2seq", cfg.seed, src_len=cfg.train.src_len, **smoothing)
    if kind == "classify":
        # Label smoothing would spread over token ids; a classifier's outputs are its classes.
        cls_id = extra_id(CLS_TOKEN, 1, tokenizer_vocab, model_vocab, lookup)
        return Objective("classify", cfg.seed, cls_id=cls_id)
    if kind == "masked_causal":
        from llm_jax.data.synthetic import synthetic_ids

        ids = synthetic_ids(cfg.data.synthetic_vocab)
        if ids > model_vocab:
            raise UserError(f"data.task={cfg.data.task} uses {ids} token ids (data.synthetic_vocab="
                            f"{cfg.data.synthetic_vocab} and 3 special ones) but the model has {model_vocab} rows; "
                            f"lower data.synthetic_vocab or raise model.vocab_size")
        # Label smoothing spreads over the task's own ids, not the tokenizer's.
        return Objective(kind, cfg.seed, seq_len=cfg.train.seq_len, smoothing=cfg.train.label_smoothing,
                         smoothing_ids=ids)
    return Objective(kind, cfg.seed, **smoothing)


def row_width(cfg) -> int:
    """Tokens per batch row: a window of train.seq_len + 1, a seq2seq task's source and target, or
    a synthetic task's window and weights (2 * train.seq_len + 1)."""
    if cfg.objective == "seq2seq":
        return cfg.train.src_len + cfg.train.seq_len + 1
    if cfg.objective == "masked_causal":
        return 2 * cfg.train.seq_len + 1
    return cfg.train.seq_len + 1


def decoder_start_id(eos_id: int, lookup=None) -> int:
    """The encoder-decoders' first decoder input: `<pad>` where the tokenizer has it (T5's
    convention), else end-of-text (which also separates documents)."""
    pad = lookup("<pad>") if lookup is not None else None
    return int(eos_id if pad is None else pad)


def tokenizer_objective(cfg, tokenizer: Any, model_vocab: int) -> Objective:
    """`build_objective` for a tokenizer object (`vocab_size`, `eos_id`, optional `token_id`)."""
    return build_objective(cfg, tokenizer.vocab_size, model_vocab, tokenizer.eos_id,
                           getattr(tokenizer, "token_id", None))
