"""Preference pairs (`data.format=preference`): one prompt, a chosen and a rejected completion.

Records, one a JSONL line, in either form:

    {"prompt": "37+485=", "chosen": "522", "rejected": "512"}
    {"chosen":   [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}

In the chat form both conversations share every message but the last (the prompt), and the last
is the assistant's turn (the completion); they are rendered by the chat template as for
data.format=chat (`formats`), and only that last turn is scored.

A row (int32, W = train.seq_len + 1) holds both sides of a pair:

    [chosen_tokens W | chosen_mask W | rejected_tokens W | rejected_mask W]

tokens: the prompt's ids, then the completion's, then EOS (each piece tokenised on its own, as
for the other formats, so the prompt has the ids `generate` gives it), right-padded with EOS.
mask: 1 at the completion's tokens and its final EOS, the positions whose log-probability is
scored (token t is predicted by the logits at t - 1, so mask[0] is always 0, even after an
empty prompt), 0 at the prompt and the padding. So
log p(completion) = sum_t mask[t] * log p(tokens[t] | tokens[<t]), and a reward model reads its
score at the last position with mask 1, the EOS ending the completion.

Bad records (no JSON object, missing or mistyped fields, an empty completion, chosen equal to
rejected, chats that do not share their prompt, more than W tokens) raise `BadRecord`, which the
reader (`sft_rows`) reports as FILE:LINE or, with data.skip_bad_records, counts and skips.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llm_jax.data.formats import (
    BUILTIN_TEMPLATE,
    EOS,
    BadRecord,
    ChatTemplate,
    chat_messages,
    chat_prompt_ids,
    parse_record,
    segment_ids,
    string_field,
)

SIDES = ("chosen", "rejected")


def row_width(seq_len: int) -> int:
    """Width of a preference row: four blocks of seq_len + 1."""
    return 4 * (seq_len + 1)


def split_rows(rows_BW4: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask), each [B, W], of rows
    [B, 4W] (numpy or JAX arrays; slices of the same kind come back)."""
    width = rows_BW4.shape[-1]
    if width % 4:
        raise ValueError(f"preference rows have a width divisible by 4, got {width}")
    W = width // 4
    return rows_BW4[..., :W], rows_BW4[..., W:2 * W], rows_BW4[..., 2 * W:3 * W], rows_BW4[..., 3 * W:]


def _is_chat(record: dict) -> bool:
    return "prompt" not in record and any(isinstance(record.get(side), list) for side in SIDES)


def prompt_form_ids(record: dict, encode: Callable[[str], list[int]],
                    eos_id: int) -> dict[str, tuple[list[int], list[bool]]]:
    """{side: (ids, scored)} of a {prompt, chosen, rejected} record."""
    prompt = string_field(record, "prompt")
    texts = {side: string_field(record, side) for side in SIDES}
    for side, text in texts.items():
        if not text:
            raise BadRecord(f"empty {side} completion")
    if texts["chosen"] == texts["rejected"]:
        raise BadRecord("chosen and rejected are the same completion (nothing to prefer)")
    return {side: segment_ids([(prompt, False), (text, True), (EOS, True)], encode, eos_id)
            for side, text in texts.items()}


def chat_form_ids(record: dict, encode: Callable[[str], list[int]], eos_id: int,
                  template: ChatTemplate) -> dict[str, tuple[list[int], list[bool]]]:
    """{side: (ids, scored)} of a {chosen: [messages], rejected: [messages]} record: only the last
    (assistant) turn is scored, and the ids end with its last scored token."""
    conversations = {}
    for side in SIDES:
        if side not in record:
            raise BadRecord(f"no field '{side}'")
        try:
            conversations[side] = chat_messages({"messages": record[side]})
        except BadRecord as exc:
            raise BadRecord(f"{side}: {str(exc).replace('messages', side, 1)}") from None
        last = conversations[side][-1]
        if last["role"] != "assistant":
            raise BadRecord(f"{side}: the last message is the {last['role']}'s; it must be the assistant's "
                            "turn (the completion)")
        if not last["content"]:
            raise BadRecord(f"empty {side} completion")
    chosen, rejected = conversations["chosen"], conversations["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("chosen and rejected must share every message but the last (the prompt)")
    if chosen[-1] == rejected[-1]:
        raise BadRecord("chosen and rejected are the same completion (nothing to prefer)")
    prompt = chat_prompt_ids(chosen[:-1], encode, eos_id, template)
    sides = {}
    for side, messages in conversations.items():
        ids, scored = segment_ids(template.segments(messages, add_generation_prompt=False), encode, eos_id)
        if ids[:len(prompt)] != prompt:  # (a template that renders a turn differently when it is not the last)
            raise BadRecord(f"{side}: the chat template renders the shared messages differently when the "
                            "assistant's turn follows them; cannot tell the prompt from the completion")
        scored = [False] * len(prompt) + scored[len(prompt):]
        if not any(scored):
            raise BadRecord(f"{side}: the chat template scores none of the last turn's tokens")
        end = len(scored) - scored[::-1].index(True)
        sides[side] = (ids[:end], scored[:end])
    return sides


def encode_preference(line: str, encode: Callable[[str], list[int]], eos_id: int, seq_len: int,
                      template: ChatTemplate = BUILTIN_TEMPLATE) -> np.ndarray:
    """One JSONL line as a preference row of width 4 * (seq_len + 1) (module docstring)."""
    record = parse_record(line)
    if _is_chat(record):
        sides = chat_form_ids(record, encode, eos_id, template)
    else:
        sides = prompt_form_ids(record, encode, eos_id)
    W = seq_len + 1
    row = np.zeros(row_width(seq_len), np.int32)
    for i, side in enumerate(SIDES):
        ids, scored = sides[side]
        if len(ids) > W:
            raise BadRecord(f"{side}: {len(ids)} tokens, longer than train.seq_len+1={W}")
        tokens = row[2 * i * W:(2 * i + 1) * W]
        tokens[:] = eos_id
        tokens[:len(ids)] = ids
        row[(2 * i + 1) * W:(2 * i + 1) * W + len(ids)] = scored
        row[(2 * i + 1) * W] = 0  # (an empty prompt: the first token has nothing to be predicted from)
    return row
