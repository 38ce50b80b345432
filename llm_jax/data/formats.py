"""Supervised JSONL records (`data.format`): prompt/completion pairs and chats, as masked rows.

An example becomes a list of segments, (text or end-of-text, scored) pairs, each tokenised on
its own and joined, so a prompt encodes to the same ids here as when it is given to `generate`.

prompt_completion: {"prompt": str, "completion": str (not empty)}

    prompt | completion | EOS              scored: completion and EOS (loss_on=all: everything)

chat: {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}, at least
one assistant turn, rendered by a chat template (`ChatTemplate`): the tokenizer's own Jinja
`chat_template` (`data/chat_template.py`) or, without one, the built-in template below. Each
message is rendered as its header line, then its content, then a newline (system, user) or
end-of-text (assistant):

    <|system|>\\n{content}\\n  <|user|>\\n{content}\\n  <|assistant|>\\n{content}EOS

    scored: each assistant turn's content and its EOS (loss_on=all: everything)

`chat_prompt_ids(messages, encode, eos_id, template)` renders a conversation followed by the
assistant's header: the prompt whose continuation (stopped at the end of the turn) is the model's
next assistant turn.

A row (objective `masked_causal`, T = train.seq_len) is int32 of width 2T + 1: the example's L
tokens padded with EOS to T + 1, then T weights, weight j scoring target token j + 1 (token 0 is
never a target). Padding has weight 0. An example needs L <= T + 1.

With train.packing a row holds several examples (`sft_rows.pack_examples`) and is of width 3T + 2:
the T + 1 tokens, the T weights, then T + 1 segment ids, one per token: 1, 2, ... for the row's
examples in order, 0 for the EOS padding after the last one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from llm_jax.data.jsonl_files import json_value

EOS = None  # a segment of this "text" is the tokenizer's end-of-text id
ROLES = ("system", "user", "assistant")
# Bump when the rendering of records into tokens and weights changes (cached rows are then rebuilt).
TEMPLATE_VERSION = 1

Segment = tuple[str | None, bool]  # (text, or EOS; scored with loss_on=completion)


class BadRecord(ValueError):
    """A record that cannot be an example; the message says why (the caller adds FILE:LINE)."""


def header(role: str) -> str:
    return f"<|{role}|>\n"


def detect_format(first_line: str, text_field: str = "text") -> str:
    """The data.format a JSONL file's first record implies: prompt_completion, preference
    (`chosen` and `rejected`), chat, seq2seq, classify (a `label` beside the `text_field`) or text."""
    try:
        record = json_value(first_line)
    except ValueError:
        return "text"  # the text reader reports the line with its number
    if not isinstance(record, dict):
        return "text"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record:
        return "chat"
    if "source" in record and "target" in record:
        return "seq2seq"
    if "label" in record and text_field in record:
        return "classify"
    return "text"


def parse_record(line: str) -> dict:
    """One JSONL line as a JSON object, else BadRecord."""
    try:
        record: Any = json_value(line)
    except ValueError as exc:
        raise BadRecord(str(exc)) from None
    if not isinstance(record, dict):
        raise BadRecord(f"a JSON {type(record).__name__}, not an object")
    return record


def string_field(record: dict, name: str) -> str:
    if name not in record:
        raise BadRecord(f"no field '{name}'")
    value = record[name]
    if not isinstance(value, str):
        raise BadRecord(f"field '{name}' is {type(value).__name__}, not text")
    return value


def prompt_completion_segments(record: dict) -> list[Segment]:
    prompt, completion = string_field(record, "prompt"), string_field(record, "completion")
    if not completion:
        raise BadRecord("empty completion")
    return [(prompt, False), (completion, True), (EOS, True)]


def chat_messages(record: dict) -> list[dict[str, str]]:
    """A chat record's messages as {role, content} dicts, checked (else BadRecord)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("field 'messages' must be a non-empty list of {role, content} objects"
                        if "messages" in record else "no field 'messages'")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(f"messages[{i}] is {type(message).__name__}, not an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise BadRecord(f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        try:
            content = string_field(message, "content")
        except BadRecord as exc:
            raise BadRecord(f"messages[{i}]: {exc}") from None
        checked.append({"role": role, "content": content})
    return checked


class ChatTemplate(Protocol):
    """How a conversation becomes segments: text pieces (or EOS), each tokenised on its own and
    marked scored when it is an assistant turn."""

    fingerprint: dict[str, Any]  # what decides the segments (part of the row cache's key)

    def segments(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[Segment]: ...


class BuiltinChatTemplate:
    """The template of the module docstring; the assistant turn ends with the EOS id (no text)."""

    fingerprint: dict[str, Any] = {"name": "builtin", "version": TEMPLATE_VERSION}

    def segments(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[Segment]:
        segments: list[Segment] = []
        for message in messages:
            answer = message["role"] == "assistant"
            segments += [(header(message["role"]), False), (message["content"], answer),
                         (EOS, True) if answer else ("\n", False)]
        return segments + [(header("assistant"), False)] if add_generation_prompt else segments


BUILTIN_TEMPLATE = BuiltinChatTemplate()


def chat_segments(record: dict, template: ChatTemplate = BUILTIN_TEMPLATE) -> list[Segment]:
    messages = chat_messages(record)
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecord("no assistant turn (nothing to learn)")
    return template.segments(messages, add_generation_prompt=False)


def segment_ids(segments: Sequence[Segment], encode: Callable[[str], list[int]],
                eos_id: int) -> tuple[list[int], list[bool]]:
    """(token ids, scored per token) of segments, each piece tokenised on its own."""
    ids: list[int] = []
    scored: list[bool] = []
    for text, is_answer in segments:
        piece = [eos_id] if text is EOS else encode(text)
        ids += piece
        scored += [is_answer] * len(piece)
    return ids, scored


def chat_prompt_ids(messages: Sequence[dict[str, str]], encode: Callable[[str], list[int]],
                    eos_id: int, template: ChatTemplate = BUILTIN_TEMPLATE) -> list[int]:
    """Token ids of a conversation rendered as in training, then the assistant's header: the
    prompt whose continuation up to the end of the turn is the model's next assistant turn.
    (Token ids, not text: the built-in assistant turn's EOS has no text, and the pieces are
    tokenised apart, as in training.)"""
    return segment_ids(template.segments(messages, add_generation_prompt=True), encode, eos_id)[0]


def packed_row_width(seq_len: int) -> int:
    """Width of a packed row (module docstring): T + 1 tokens, T weights, T + 1 segment ids."""
    return 3 * seq_len + 2


def encode_example(line: str, fmt: str, encode: Callable[[str], list[int]], eos_id: int,
                   loss_on: str, seq_len: int, template: ChatTemplate = BUILTIN_TEMPLATE) -> np.ndarray:
    """One JSONL line as a row of width 2 * seq_len + 1 (see the module docstring); chats are
    rendered by `template`."""
    record = parse_record(line)
    segments = chat_segments(record, template) if fmt == "chat" else prompt_completion_segments(record)
    ids, scored = segment_ids(segments, encode, eos_id)
    if loss_on == "all":
        scored = [True] * len(ids)
    if len(ids) > seq_len + 1:
        raise BadRecord(f"{len(ids)} tokens, longer than train.seq_len+1={seq_len + 1}")
    row = np.zeros(2 * seq_len + 1, np.int32)
    row[:seq_len + 1] = eos_id
    row[:len(ids)] = ids
    row[seq_len + 1:seq_len + len(ids)] = scored[1:]  # weight j scores token j + 1
    return row
