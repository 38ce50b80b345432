"""A Hugging Face tokenizer's own chat template: the Jinja `chat_template` of the
`tokenizer_config.json` beside its `tokenizer.json`, rendered as transformers renders it.

The template is rendered in Jinja's sandbox (`_BoundedSandbox`: a tokenizer_config.json is not
trusted) with the variables transformers gives it: `messages`, `add_generation_prompt`,
`bos_token`, `eos_token` (and the config's other `*_token` strings) and the function
`raise_exception(message)`. Not `strftime_now`: templates that find it put today's
date into the text, and rows must not change with the day they are built (they fall back to a
fixed date).

Which tokens a chat row scores comes from rendering prefixes of the conversation. For the
assistant turn at index i:

    start = render(messages[:i], add_generation_prompt=True)   the history and the assistant header
    end   = render(messages[:i + 1])                            ... and the turn itself

The turn is the text between the two, which must be prefixes of the whole conversation's
rendering: the template must be prefix-stable (rendering more messages only appends text).
Templates that rewrite earlier turns (drop the reasoning of all but the last, say) are refused
with a UserError, since no span of the whole rendering is then "the turn". The rendering is then
cut at those boundaries into segments, each tokenised on its own, so a generation prompt
(the same cut of `render(history, add_generation_prompt=True)`) gives the ids of training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from llm_jax.data.formats import BUILTIN_TEMPLATE, EOS, BadRecord, ChatTemplate, Segment
from llm_jax.errors import UserError

CONFIG_FILE = "tokenizer_config.json"  # beside tokenizer.json in a Hugging Face directory
# Rendered once to find the text that ends an assistant turn (`end_of_turn_text`).
_PROBE_ANSWER = "Sure."


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it for its
    own masks): rendered as its body; the prefix rule above finds the turns here."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# The most items (characters, list elements) a template's `*` may make, and the most bits a `**`
# may: `'a' * 10**12` or `9 ** 10**9` would otherwise exhaust memory or time in one expression.
_MAX_REPEAT = 1_000_000
_MAX_POWER_BITS = 100_000


class _BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's sandbox (no attributes starting with `_`, no mutating methods, `range` up to
    100,000 items; a tokenizer_config.json comes from whoever published the model), with `*` and
    `**` bounded too. Intercepting them also stops Jinja from folding a constant `'a' * 10**12`
    while it compiles the template."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > _MAX_REPEAT:
                    raise jinja2.sandbox.SecurityError(f"a repetition of more than {_MAX_REPEAT:,} items")
        if (operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0
                and abs(left).bit_length() * right > _MAX_POWER_BITS):
            raise jinja2.sandbox.SecurityError(f"a power of more than {_MAX_POWER_BITS:,} bits")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja's sandbox answers an unsafe attribute with an undefined value that prints as "";
        # a template that reaches for `__globals__` is hostile, so it is refused, not half-rendered.
        raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                                           "object is unsafe")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates want the plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class JinjaChatTemplate:
    """A Jinja chat template with the special tokens it may name; `origin` names it in messages."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str):
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.origin = origin
        env = _BoundedSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise UserError(f"{origin}: chat_template is not a valid Jinja template (line {exc.lineno}: "
                            f"{exc.message})") from None
        except RecursionError:  # the parser recurses once per nested expression
            raise UserError(f"{origin}: chat_template is nested too deeply to compile") from None
        digest = hashlib.sha256(json.dumps([source, sorted(self.special_tokens.items())]).encode()).hexdigest()
        self.fingerprint: dict[str, Any] = {"name": "jinja", "sha256": digest}

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as text; a template that refuses it (raise_exception) gives BadRecord, one that
        breaks the sandbox's rules a UserError (it would fail on every record)."""
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.sandbox.SecurityError as exc:  # the template itself is hostile: no record would pass
            raise UserError(f"the chat_template of {self.origin} is refused by the sandbox: {exc}") from None
        except (OverflowError, RecursionError) as exc:  # the sandbox's range() limit, a recursive macro
            raise UserError(f"the chat_template of {self.origin} exceeds the sandbox's limits: "
                            f"{type(exc).__name__}: {exc}") from None
        except jinja2.exceptions.TemplateError as exc:
            raise BadRecord(f"the chat_template of {self.origin} refuses this conversation: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise BadRecord(f"the chat_template of {self.origin} fails on this conversation: "
                            f"{type(exc).__name__}: {exc}") from None

    def segments(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[Segment]:
        """The rendering cut at each assistant turn's boundaries (see the module docstring)."""
        whole = self.render(messages, add_generation_prompt)
        segments: list[Segment] = []
        done = 0  # characters of `whole` already in segments
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True)
            end = self.render(messages[:i + 1], add_generation_prompt=False)
            for name, text in ((f"messages[:{i}] with the generation prompt", start),
                               (f"messages[:{i + 1}]", end)):
                if not whole.startswith(text) or len(text) < done:
                    raise UserError(self._unstable(name, text, whole, len(messages)))
            if not end.startswith(start):
                raise UserError(self._unstable(f"messages[:{i}] with the generation prompt", start, end, i + 1))
            segments += [(whole[done:len(start)], False), (whole[len(start):len(end)], True)]
            done = len(end)
        segments.append((whole[done:], False))
        return [(text, scored) for text, scored in segments if text is EOS or text]

    def _unstable(self, name: str, prefix: str, whole: str, count: int) -> str:
        at = next((j for j, (a, b) in enumerate(zip(prefix, whole)) if a != b), min(len(prefix), len(whole)))
        return (f"the chat_template of {self.origin} is not prefix-stable: {name} renders as text that is not "
                f"a prefix of the first {count} messages' rendering (they differ at character {at}: "
                f"{prefix[at:at + 30]!r} vs {whole[at:at + 30]!r}); the assistant turns cannot be found for "
                "the loss mask. Use a template whose rendering of a conversation only grows as messages are "
                "added (or remove chat_template from tokenizer_config.json to use the built-in one)")

    def end_of_turn_text(self) -> str | None:
        """What the template writes after an assistant's content (e.g. "<|im_end|>\\n"), found by
        rendering a two-turn probe; None when the probe cannot be rendered."""
        probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE_ANSWER}]
        try:
            turn = next(text for text, scored in self.segments(probe, False) if scored)
        except (BadRecord, UserError, StopIteration):
            return None
        head, found, tail = str(turn).partition(_PROBE_ANSWER)
        return tail if found and not head.strip() else None


def read_chat_template(tokenizer_json: Path) -> JinjaChatTemplate | None:
    """The chat template of the tokenizer_config.json beside `tokenizer_json`, if it has one."""
    path = Path(tokenizer_json).parent / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # (RecursionError: JSON nested too deeply)
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or config.get("chat_template") is None:
        return None
    source = config["chat_template"]
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str):
        raise UserError(f"{path}: chat_template must be a Jinja string (or a list of named templates with a "
                        "'default' one)")
    tokens = {key: text for key, value in config.items()
              if key.endswith("_token") and (text := _token_text(value)) is not None}
    tokens.setdefault("bos_token", "")
    tokens.setdefault("eos_token", "")
    return JinjaChatTemplate(source, tokens, str(path))


def chat_template_of(tokenizer: Any) -> ChatTemplate:
    """The tokenizer's own chat template if it has one, else the built-in template."""
    own = getattr(tokenizer, "chat_template", None)
    return own if own is not None else BUILTIN_TEMPLATE


def chat_stop_ids(tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn in generation: EOS, the template's eos_token, and the
    first added (special) token the template writes after an answer (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>)."""
    stops = [int(tokenizer.eos_id)]
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, JinjaChatTemplate):
        return stops
    added = getattr(tokenizer, "added_ids", frozenset())
    candidates = [template.eos_token] if template.eos_token else []
    end = template.end_of_turn_text()
    if end:
        candidates.append(end)
    for text in candidates:
        special = [i for i in tokenizer.encode(text) if i in added]
        if special and special[0] not in stops:
            stops.append(special[0])
    return stops
