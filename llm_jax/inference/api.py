"""The Python API: `llm_jax.load(run_dir)` gives a handle with `.logits()` and `.generate()`.

Inference runs on one device: the newest complete checkpoint's parameters are restored straight
onto a 1-device mesh (Orbax reshards whatever mesh the run trained on).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from llm_jax.config import Config
from llm_jax.data.chat_template import chat_stop_ids, chat_template_of
from llm_jax.data.formats import BadRecord, chat_messages, chat_prompt_ids
from llm_jax.data.tasks import classes_of, labels_of
from llm_jax.data.tokenizer import HFTokenizer, decoder_start_id
from llm_jax.errors import UserError
from llm_jax.inference.generate import generate
from llm_jax.interop.convert import read_hf_model
from llm_jax.interop.files import TOKENIZER_FILE, is_hf_dir
from llm_jax.losses import token_logps
from llm_jax.models.base import family_of
from llm_jax.models.decoding import bounded_length
from llm_jax.models.definition import ModelDef, model_def, param_shardings
from llm_jax.parallel.mesh import single_device_mesh
from llm_jax.runtime.restore import restore_params

Prompt = str | Sequence[int]
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


@partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef: Any, params: Any, inputs: dict[str, jax.Array]) -> jax.Array:
    """The LM logits [B, T, V], or a classifier's class logits [B, C]."""
    out = nnx.merge(graphdef, params)(**inputs)
    return out.logits if out.logits is not None else out.aux["class_logits"]


@partial(jax.jit, static_argnames=("graphdef",))
def _last_scores(graphdef: Any, params: Any, tokens_BT: jax.Array, last_B: jax.Array) -> jax.Array:
    """The score head's value [B] at position last_B[b] of each row."""
    score_BT = nnx.merge(graphdef, params)(tokens_BT).aux["score"]
    return jax.numpy.take_along_axis(score_BT, last_B[:, None], axis=1)[:, 0]


@partial(jax.jit, static_argnames=("graphdef",))
def _span_logps(graphdef: Any, params: Any, tokens_BT: jax.Array, starts_B: jax.Array, ends_B: jax.Array) -> jax.Array:
    """Sum of log p(tokens[b, t] | tokens[b, <t]) over starts_B[b] <= t < ends_B[b] [B]."""
    logits_BTV = nnx.merge(graphdef, params)(tokens_BT).logits[:, :-1]
    logp_BT = token_logps(logits_BTV, tokens_BT[:, 1:])
    t_T = jax.numpy.arange(1, tokens_BT.shape[1])
    span_BT = (t_T >= starts_B[:, None]) & (t_T < ends_B[:, None])
    return (logp_BT * span_BT).sum(-1)


# Rows are padded to a multiple of this many tokens, and batches filled to SCORE_BATCH rows, so
# scoring texts of many lengths compiles a few programs, not one per length.
SCORE_BUCKET = 32
SCORE_BATCH = 32


class Model:
    """A trained (or freshly built) model with its config and tokenizer, ready for inference."""

    def __init__(self, cfg: Config, mdef: ModelDef, params: Any, tokenizer: Any | None = None,
                 *, step: int | None = None, run_dir: Path | None = None):
        self._cfg = cfg
        self._mdef = mdef
        self._params = params
        self._tokenizer = tokenizer
        self.step = step
        self.run_dir = run_dir

    @classmethod
    def from_params(cls, cfg: Config, params: Any, tokenizer: Any | None = None) -> Model:
        """Wrap in-memory parameters (a pure dict as made by `train.state.init_params`)."""
        vocab = params["embed"]["embedding"].shape[0]
        mdef = model_def(cfg, vocab, classes_of(cfg))
        want = jax.tree.map(lambda s: s.shape, mdef.shapes)
        got = jax.tree.map(lambda a: tuple(a.shape), params)
        if want != got:
            raise ValueError("params do not match the model the config describes")
        return cls(cfg, mdef, params, tokenizer)

    @property
    def config(self) -> Config:
        return self._cfg

    @property
    def tokenizer(self) -> Any | None:
        return self._tokenizer

    @property
    def params(self) -> Any:
        return self._params

    @property
    def labels(self) -> list[str | int]:
        """A classifier's labels, class i (column i of its logits) first; empty for other models.
        For data.format=classify they are data.labels, as the run's config.yaml recorded them."""
        return labels_of(self._cfg)

    @property
    def vocab_size(self) -> int:
        """Rows of the model's token table (the tokenizer's vocabulary plus padding)."""
        return self._params["embed"]["embedding"].shape[0]

    @property
    def continues_prompt(self) -> bool:
        """Whether generated text continues the prompt (decoders) or is a text of its own (the
        target an encoder-decoder decodes from its source)."""
        decoding = family_of(self._cfg.model.arch).decoding
        return decoding is not None and decoding.continues_prompt

    @property
    def decoder_start_id(self) -> int:
        """An encoder-decoder's first decoder input: the tokenizer's `<pad>` (T5's convention)
        if it has one, else its end-of-text id (0 without a tokenizer)."""
        tok = self._tokenizer
        if tok is None:
            return 0
        return decoder_start_id(tok.eos_id, getattr(tok, "token_id", None))

    def logits(self, input_ids: Any, decoder_input_ids: Any = None, attention_mask: Any = None) -> np.ndarray:
        """float32 logits [B, T, V] over the model's (padded) vocabulary; [T] input is one row.

        Decoders give next-token logits (causal); bert gives masked-LM logits at every position,
        each token seeing the whole row (segment 0), or a classifier's class logits [B, C].
        Encoder-decoders (transformer, t5) read `input_ids` as the source and give the decoder's
        logits for `decoder_input_ids` (which start with `decoder_start_id`). `attention_mask`
        (1 = token, 0 = padding, as in Hugging Face) hides padded inputs of an encoder and of an
        encoder-decoder's source.
        """
        m = self._cfg.model
        tokens_BT = self._ids("input_ids", input_ids)
        mask_BT = None
        if attention_mask is not None:
            if m.spec.kind == "decoder":
                raise UserError(f"attention_mask is for encoders and encoder-decoders; this {m.arch} model is "
                                "causal (left-pad prompts and use generate for batches of different lengths)")
            mask_BT = np.asarray(attention_mask)
            mask_BT = mask_BT[None, :] if mask_BT.ndim == 1 else mask_BT
            if mask_BT.shape != tokens_BT.shape:
                raise UserError(f"attention_mask has shape {mask_BT.shape}, input_ids {tokens_BT.shape}")
            mask_BT = mask_BT.astype(bool)
        if m.spec.kind == "encoder-decoder":
            if decoder_input_ids is None:
                raise UserError(f"model.arch={m.arch} is an encoder-decoder: give decoder_input_ids too "
                                f"(the decoder's inputs, starting with {self.decoder_start_id})")
            tgt_BT = self._ids("decoder_input_ids", decoder_input_ids)
            if tgt_BT.shape[0] != tokens_BT.shape[0]:
                raise UserError(f"decoder_input_ids has {tgt_BT.shape[0]} rows, input_ids {tokens_BT.shape[0]}")
            inputs = {"src_BS": tokens_BT, "tgt_BT": tgt_BT, "src_mask_BS": mask_BT}
            return np.asarray(_forward(self._mdef.graphdef, self._params, inputs))
        if decoder_input_ids is not None:
            raise UserError(f"decoder_input_ids is for encoder-decoder models; this {m.arch} model is "
                            f"{m.spec.kind}-only")
        inputs = {"tokens_BT": tokens_BT}
        if mask_BT is not None:
            inputs["attention_mask_BT"] = mask_BT
        return np.asarray(_forward(self._mdef.graphdef, self._params, inputs))

    def _ids(self, name: str, ids: Any) -> np.ndarray:
        """Token ids as int32 [B, T], checked against the vocabulary and the position table."""
        tokens_BT = np.asarray(ids)
        if tokens_BT.ndim == 1:
            tokens_BT = tokens_BT[None, :]
        if tokens_BT.ndim != 2 or tokens_BT.shape[1] == 0:
            raise UserError(f"{name} must be token ids of shape [B, T] or [T], got shape {tokens_BT.shape}")
        if not np.issubdtype(tokens_BT.dtype, np.integer):
            raise UserError(f"{name} must be integer token ids, got dtype {tokens_BT.dtype}")
        if tokens_BT.min() < 0 or tokens_BT.max() >= self.vocab_size:
            raise UserError(f"{name} must lie in [0, {self.vocab_size})")
        T = tokens_BT.shape[1]
        limit = bounded_length(self._cfg)
        if limit is not None and T > limit:
            raise UserError(f"{name} of {T} tokens is longer than the model's max_seq_len={self._cfg.max_seq_len}")
        return tokens_BT.astype(np.int32)

    def generate(self, prompts: Prompt | Sequence[Prompt] | Sequence[Message] | Sequence[Sequence[Message]],
                 max_new_tokens: int = 128, *, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = False) -> Any:
        """Continue prompts: text in gives text out, token ids in give token ids out.

        Encoder-decoders read each prompt as a source and return the decoded target.

        `prompts` is a string, a list of strings, a list of token ids (one prompt) or a list of
        such lists. Only the continuation is returned, stopped at the tokenizer's EOS.

        `chat=True` (decoders): each prompt is a conversation, rendered by the tokenizer's chat
        template (its own `chat_template`, else the built-in one; docs/sft.md) with the assistant's
        header after it: a string is one user message, a list of {"role", "content"} dicts a whole
        conversation, and a list of those a batch. The next assistant turn is returned as text,
        stopped at the end of the turn (EOS or the template's end-of-turn token).
        """
        tok = self._tokenizer
        if chat:
            single, ids = self._chat_prompts(prompts)
            kind, stops = "text", chat_stop_ids(tok)
        else:
            single, kind, rows = self._normalise(prompts)
            ids, stops = ([tok.encode(p) for p in rows] if kind == "text" else rows), []
        out = generate((self._mdef, self._params), self._cfg, ids, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       eos_id=tok.eos_id if tok is not None else None, stop_ids=stops,
                       vocab_limit=tok.vocab_size if tok is not None else None, start_id=self.decoder_start_id)
        if kind == "text":
            out = [tok.decode(o) for o in out]
        return out[0] if single else out

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Prompt]) -> np.ndarray:
        """A reward model's scores [N] (float32) of completions of prompts: the score head
        (`model.score_head`) at the EOS that ends prompt + completion, where it was trained
        (`pref.method=reward`). Text or token ids, like `generate`."""
        if not self._cfg.model.score_head:
            raise UserError(f"{self.run_dir or 'this model'} has no score head: a reward model is trained with "
                            "data.format=preference pref.method=reward (model.score_head=true)")
        if self._tokenizer is None:
            raise UserError("this model has no tokenizer, and its scores are of texts ending with its EOS")
        eos = [self._tokenizer.eos_id]
        rows = [(self._token_ids(p), self._token_ids(c) + eos) for p, c in self._pairs(prompts, completions)]
        return self._batched(rows, lambda tokens_BT, ends_B, _: _last_scores(self._mdef.graphdef, self._params,
                                                                              tokens_BT, ends_B - 1))

    def logprobs(self, prompts: Sequence[Prompt], completions: Sequence[Prompt]) -> np.ndarray:
        """log p(completion | prompt) [N] (float32, summed over the completion's tokens) under this
        decoder. Text or token ids; append the EOS id to a completion to count its ending too."""
        if self._cfg.model.spec.kind != "decoder":
            raise UserError(f"logprobs scores continuations; model.arch={self._cfg.model.arch} is not a decoder")
        rows = [(self._token_ids(p), self._token_ids(c)) for p, c in self._pairs(prompts, completions)]
        if any(not p for p, _ in rows):
            raise UserError("logprobs needs a non-empty prompt (the first completion token is predicted from it)")
        return self._batched(rows, lambda tokens_BT, ends_B, starts_B: _span_logps(
            self._mdef.graphdef, self._params, tokens_BT, starts_B, ends_B))

    @staticmethod
    def _pairs(prompts: Sequence[Prompt], completions: Sequence[Prompt]) -> list[tuple[Prompt, Prompt]]:
        if isinstance(prompts, str) or isinstance(completions, str):
            raise UserError("give lists of prompts and completions (one text is a list of one)")
        if len(prompts) != len(completions):
            raise UserError(f"{len(prompts)} prompts but {len(completions)} completions")
        return list(zip(prompts, completions))

    def _batched(self, rows: list[tuple[list[int], list[int]]], run) -> np.ndarray:
        """`run(tokens_BT, ends_B, starts_B)` over right-padded batches of prompt + completion rows
        (starts_B: where each completion starts, ends_B: its length); [N] float32 results."""
        limit = bounded_length(self._cfg)
        pad = self._tokenizer.eos_id if self._tokenizer is not None else 0
        for i, (p, c) in enumerate(rows):
            if limit is not None and len(p) + len(c) > limit:
                raise UserError(f"prompt + completion {i} has {len(p) + len(c)} tokens, more than the model's "
                                f"max_seq_len={self._cfg.max_seq_len}")
        results = []
        for start in range(0, len(rows), SCORE_BATCH):
            chunk = rows[start:start + SCORE_BATCH]
            width = -(-max(len(p) + len(c) for p, c in chunk) // SCORE_BUCKET) * SCORE_BUCKET
            width = min(width, limit) if limit is not None else width
            tokens_BT = np.full((SCORE_BATCH, width), pad, np.int32)  # right padding: causal, never seen
            starts_B, ends_B = np.zeros(SCORE_BATCH, np.int32), np.ones(SCORE_BATCH, np.int32)
            for b, (p, c) in enumerate(chunk):
                tokens_BT[b, :len(p) + len(c)] = p + c
                starts_B[b], ends_B[b] = len(p), len(p) + len(c)
            results.append(np.asarray(run(tokens_BT, ends_B, starts_B))[:len(chunk)])
        return np.concatenate(results) if results else np.zeros(0, np.float32)

    def _token_ids(self, text_or_ids: Prompt) -> list[int]:
        if isinstance(text_or_ids, str):
            return self._tokenizer.encode(text_or_ids)
        return [int(t) for t in text_or_ids]

    def _chat_prompts(self, prompts: Any) -> tuple[bool, list[list[int]]]:
        """(was one conversation, the token ids of each conversation's generation prompt)."""
        m = self._cfg.model
        if m.spec.kind != "decoder":
            what = ("an encoder: it fills in masked tokens and does not generate text" if m.spec.kind == "encoder"
                    else "an encoder-decoder: it writes a target of its own, not the next turn of a conversation")
            raise UserError(f"chat needs a decoder that continues the conversation; model.arch={m.arch} is {what}")
        tok = self._tokenizer
        if tok is None:
            raise UserError("this model has no tokenizer, and a chat is text rendered by the tokenizer's template")

        def conversation(prompt: Any) -> list | None:
            if isinstance(prompt, str):
                return [{"role": "user", "content": prompt}]
            if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
                return list(prompt)
            return None

        single_one = conversation(prompts)
        if single_one is not None:
            single, chats = True, [single_one]
        elif isinstance(prompts, Sequence) and all(conversation(p) is not None for p in prompts):
            single, chats = False, [conversation(p) for p in prompts]
        else:
            raise UserError("chat prompts must be text (one user message), a list of {role, content} messages, "
                            "or a list of those")
        template, ids = chat_template_of(tok), []
        for i, messages in enumerate(chats):
            try:
                ids.append(chat_prompt_ids(chat_messages({"messages": messages}), tok.encode, tok.eos_id, template))
            except BadRecord as exc:
                raise UserError(f"chat {i}: {exc}") from None
        return single, ids

    def _normalise(self, prompts: Any) -> tuple[bool, str, list]:
        """(was one prompt, "text" or "ids", list of prompts)."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            single, rows = True, [prompts]
        elif isinstance(prompts, Sequence) and prompts and all(isinstance(p, (int, np.integer))
                                                               for p in prompts):
            single, rows = True, [list(prompts)]  # one prompt of token ids
        elif isinstance(prompts, Sequence):
            single, rows = False, [p.tolist() if isinstance(p, np.ndarray) else p for p in prompts]
        else:
            raise UserError(f"prompts must be text or token ids, got {type(prompts).__name__}")
        if all(isinstance(p, str) for p in rows):
            if self._tokenizer is None and rows:
                raise UserError("this model has no tokenizer; pass token ids instead of text")
            return single, "text", rows
        if all(isinstance(p, Sequence) and not isinstance(p, str) for p in rows):
            return single, "ids", [list(p) for p in rows]
        raise UserError("prompts must all be strings or all be lists of token ids")


def load(path: str | Path, *, step: int | None = None) -> Model:
    """Load a run directory's config, tokenizer and newest complete checkpoint (or `step`), or a
    Hugging Face checkpoint directory (config.json + safetensors; the classes `llm_jax.interop` adapts)."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if is_hf_dir(run_dir):
        if step is not None:
            raise UserError(f"{run_dir} is a Hugging Face checkpoint: it has no steps to choose from")
        return load_hf(run_dir)
    cfg, tokenizer, mdef, params, step = restore_params(run_dir, step)
    return Model(cfg, mdef, params, tokenizer, step=step, run_dir=run_dir)


def load_hf(hf_dir: Path) -> Model:
    """A Hugging Face checkpoint directory as a Model on one device, with its tokenizer.json if it has one."""
    _, cfg, params = read_hf_model(hf_dir)
    mdef = model_def(cfg, cfg.model.vocab_size)
    params = jax.device_put(params, param_shardings(mdef, single_device_mesh()))
    tokenizer_json = hf_dir / TOKENIZER_FILE
    tokenizer = HFTokenizer(tokenizer_json) if tokenizer_json.is_file() else None
    return Model(cfg, mdef, params, tokenizer, run_dir=hf_dir)
