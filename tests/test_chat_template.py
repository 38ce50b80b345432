"""Chat templates: a Hugging Face tokenizer's own Jinja `chat_template` renders and masks chats
exactly (assistant turns found by rendering prefixes), a template that rewrites earlier turns is
refused, the template keys the row cache; `generate --chat` / `.generate(chat=True)` wrap a prompt
in the template and stop at the end of the turn; an imported Llama checkpoint fine-tunes on chats
rendered by its own template."""

import json
import random
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

import llm_jax
import llm_jax.inference.api as api
from llm_jax.cli import main
from llm_jax.config import load_config, read_run_config
from llm_jax.data.build import build_data, load_tokenizer
from llm_jax.data.chat_template import chat_stop_ids, chat_template_of
from llm_jax.data.formats import BUILTIN_TEMPLATE, BadRecord, chat_prompt_ids, encode_example
from llm_jax.data.jsonl_files import jsonl_held_out_lines
from llm_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from llm_jax.errors import UserError
from llm_jax.inference.generate import generate
from llm_jax.models.definition import model_def

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
SPECIALS = ["</s>", "<s>", "<|im_start|>", "<|im_end|>"]  # ids 0..3
CHARS = sorted(set("\n .,?!:abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
# ChatML, as Qwen's and others' tokenizer_config.json write it (bos_token first, to check the variable).
CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ok"}]
T = 96


def write_tokenizer(folder: Path, template: str | None = CHATML) -> Path:
    """A character-level `tokenizers` BPE (76 ids, within the Llama fixture's 96 rows) with the
    ChatML specials, and a tokenizer_config.json holding `template`; returns tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.decoder = decoders.Fuse()  # characters joined as they are (the default puts spaces between)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def chat_llama(folder: Path, template: str = CHATML) -> Path:
    """The Llama fixture's weights with the ChatML tokenizer above: a Hugging Face directory."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(FIXTURES / "llama" / name, folder / name)
    write_tokenizer(folder, template)
    return folder


def ids(tok, *pieces: str) -> list[int]:
    return [i for piece in pieces for i in tok.encode(piece)]


def test_a_hf_template_renders_and_masks_exactly(tmp_path):
    tok = HFTokenizer(write_tokenizer(tmp_path / "tok"))
    template = chat_template_of(tok)
    assert template is tok.chat_template and template is not BUILTIN_TEMPLATE
    text = template.render(CHAT, add_generation_prompt=False)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\nOk<|im_end|>\n")
    assert tok.encode("<|im_start|>Hi<|im_end|>") == [2, vocab_id("H"), vocab_id("i"), 3]  # specials: one id each
    # Hand-cut: each assistant turn is its content, <|im_end|> and the newline after it.
    pieces = [("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
               0), ("Yo<|im_end|>\n", 1), ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", 0),
              ("Ok<|im_end|>\n", 1)]
    expected = ids(tok, *(p for p, _ in pieces))
    scored = [w for p, w in pieces for _ in tok.encode(p)]
    assert expected == tok.encode(text)  # the pieces tokenise as the whole text does
    row = encode_example(json.dumps({"messages": CHAT}), "chat", tok.encode, tok.eos_id, "completion", T, template)
    assert row[:T + 1].tolist() == expected + [tok.eos_id] * (T + 1 - len(expected))
    assert row[T + 1:].tolist() == scored[1:] + [0] * (T + 1 - len(expected))
    assert row[T + 1:].sum() == 2 * len(ids(tok, "Yo<|im_end|>\n"))
    every = encode_example(json.dumps({"messages": CHAT}), "chat", tok.encode, tok.eos_id, "all", T, template)
    assert every[T + 1:].tolist() == [1] * (len(expected) - 1) + [0] * (T + 1 - len(expected))
    # The generation prompt of the history is the row up to the second answer.
    prompt = chat_prompt_ids(CHAT[:4], tok.encode, tok.eos_id, template)
    assert prompt == expected[:len(prompt)] and expected[len(prompt):len(prompt) + 2] == ids(tok, "Ok")
    assert chat_stop_ids(tok) == [tok.eos_id, 3]  # </s>, then ChatML's end of turn <|im_end|>


def vocab_id(char: str) -> int:
    return len(SPECIALS) + CHARS.index(char)


def test_templates_that_rewrite_earlier_turns_or_refuse_a_chat_are_errors(tmp_path):
    line = json.dumps({"messages": CHAT})
    # Marks the last message: rendering more messages changes what came before.
    last = "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = HFTokenizer(write_tokenizer(tmp_path / "unstable", last))
    with pytest.raises(UserError, match="is not prefix-stable: messages\\[:2\\] with the generation prompt"):
        encode_example(line, "chat", tok.encode, tok.eos_id, "completion", T, tok.chat_template)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be a user\\'s') }}" \
             "{% endif %}" + CHATML
    tok = HFTokenizer(write_tokenizer(tmp_path / "strict", strict))
    with pytest.raises(BadRecord, match="refuses this conversation: the first message must be a user's"):
        encode_example(line, "chat", tok.encode, tok.eos_id, "completion", T, tok.chat_template)
    with pytest.raises(UserError, match="chat_template is not a valid Jinja template"):
        HFTokenizer(write_tokenizer(tmp_path / "broken", "{% for m in messages %}"))
    # transformers' {% generation %} marks render their body; named templates use "default".
    marked = CHATML.replace("message['content'] + '<|im_end|>' + '\n' }}",
                            "message['content'] }}{% generation %}{{ '<|im_end|>' + '\n' }}{% endgeneration %}")
    named = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
             {"name": "default", "template": marked}]
    assert marked != CHATML
    for source in (marked, named):
        template = HFTokenizer(write_tokenizer(tmp_path / "other", source)).chat_template
        assert template.render(CHAT, True) == HFTokenizer(write_tokenizer(tmp_path / "chatml")).chat_template.render(
            CHAT, True)
    # Without a chat_template the built-in template is used.
    assert chat_template_of(HFTokenizer(write_tokenizer(tmp_path / "none", None))) is BUILTIN_TEMPLATE
    assert chat_template_of(ByteTokenizer()) is BUILTIN_TEMPLATE


def test_cli_names_the_line_of_a_chat_the_template_cannot_mask(tmp_path, capsys):
    last = "{% for m in messages %}{% if loop.last %}!{% endif %}{{ m['content'] }}{% endfor %}"
    tokenizer = write_tokenizer(tmp_path / "tok", last)
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": CHAT[1:3]}) + "\n")
    assert main(["train", "gpt_tiny", f"run.dir={tmp_path / 'run'}", f"data.source=jsonl:{source}",
                 f"data.tokenizer=hf:{tokenizer}", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert f"error: {source}:1: the chat_template of" in capsys.readouterr().err


def test_the_template_keys_the_row_cache(tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(4)))
    cache = tmp_path / "cache"

    def rows(name: str, template: str | None) -> np.ndarray:
        tokenizer = write_tokenizer(tmp_path / name, template)
        cfg = load_config("gpt_tiny", [f"data.source=jsonl:{source}", f"data.cache_dir={cache}",
                                       f"data.tokenizer=hf:{tokenizer}", f"train.seq_len={T}"])
        return np.asarray(build_data(cfg, tmp_path / f"run_{name}").train_tokens)

    chatml, builtin = rows("chatml", CHATML), rows("builtin", None)
    assert len(list((cache / "sft").glob("*.json"))) == 2  # same tokenizer.json, other template
    assert not np.array_equal(chatml, builtin)
    np.testing.assert_array_equal(rows("chatml_again", CHATML), chatml)
    assert len(list((cache / "sft").glob("*.json"))) == 2
    # The run keeps its tokenizer_config.json beside its tokenizer.json.
    assert HFTokenizer(tmp_path / "run_chatml" / "tokenizer" / "tokenizer.json").chat_template.source == CHATML


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> api.Model:
    """A 1-layer GPT of random weights (std 0.3) with the ChatML tokenizer: one compiled
    generation serves the tests below (prompts of 17 to 32 tokens, two stop ids, vocab_limit 76)."""
    cfg = load_config(None, ["model.num_layers=1", "model.d_model=32", "model.num_heads=4", "train.seq_len=64"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), model_def(cfg, 128).shapes)
    tok = HFTokenizer(write_tokenizer(tmp_path_factory.mktemp("chatml")))
    return api.Model.from_params(cfg, params, tok)


RENDERED_HI = "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # 22 tokens


def sampled(model: api.Model, *stops: int) -> list[int]:
    """8 tokens sampled after RENDERED_HI (seed 1; greedy decoding of random weights repeats one
    token), stopped only at `stops` (ids past the vocabulary, never drawn, fill up to two)."""
    return generate((model._mdef, model.params), model.config, [model.tokenizer.encode(RENDERED_HI)],
                    max_new_tokens=8, temperature=1.0, seed=1, vocab_limit=model.tokenizer.vocab_size,
                    stop_ids=[*stops, 127, 126][:2])[0]


def test_stop_ids_end_a_row_at_the_first_of_them(chat_model):
    """Beside EOS, any of `stop_ids` ends a row (not included), as a chat's end of turn does."""
    free = sampled(chat_model)
    stop = next(t for j, t in enumerate(free) if j >= 2 and t not in free[:j])
    assert sampled(chat_model, stop) == free[:free.index(stop)]
    assert sampled(chat_model, stop, free[0]) == []


def test_generate_chat_wraps_the_prompt_and_stops_at_the_end_of_the_turn(chat_model, monkeypatch, capsys):
    tok = chat_model.tokenizer
    fed = []

    def spy(*args, **kwargs):
        fed.append((args[2], kwargs["stop_ids"]))
        # Only prompts of RENDERED_HI's shape are generated (one compilation); others only recorded.
        return generate(*args, **kwargs) if len(args[2]) == 1 and len(args[2][0]) == 22 else [[0]] * len(args[2])

    monkeypatch.setattr(api, "generate", spy)
    answer = chat_model.generate("Hi", max_new_tokens=8, temperature=1.0, seed=1, chat=True)
    assert fed[0] == ([tok.encode(RENDERED_HI)], [tok.eos_id, 3])  # stops: </s> and <|im_end|>
    # The answer is what the model samples after the rendered prompt, up to </s> or <|im_end|>.
    free = sampled(chat_model)
    ends = [free.index(stop) for stop in (0, 3) if stop in free]
    assert answer == tok.decode(free[:min(ends, default=len(free))])
    # A list of messages is one conversation; a list of strings a batch of one-message chats.
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
               {"role": "user", "content": "Bye"}]
    chat_model.generate(history, max_new_tokens=8, chat=True)
    assert fed[-1][0] == [tok.encode(RENDERED_HI + "Yo<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                                     "<|im_start|>assistant\n")]
    chat_model.generate(["Hi", "Bye"], max_new_tokens=8, chat=True)
    assert fed[-1][0] == [tok.encode(RENDERED_HI), tok.encode(RENDERED_HI.replace("Hi", "Bye"))]
    # The CLI (its run loaded as this model) prints only the answer, as the API returns it.
    monkeypatch.setattr("llm_jax.cli.load", lambda path: chat_model)
    capsys.readouterr()
    assert main(["generate", "RUN", "--chat", "--prompt", "Hi", "--max-new-tokens", "8", "--temperature", "1",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out == answer + "\n"
    assert fed[-1][0] == [tok.encode(RENDERED_HI)]
    with pytest.raises(UserError, match="chat 0: messages\\[0\\] has role 'bot'"):
        chat_model.generate([{"role": "bot", "content": "x"}], chat=True)
    with pytest.raises(UserError, match="chat prompts must be text"):
        chat_model.generate([[1, 2, 3]], chat=True)


def test_chat_needs_a_decoder_with_a_tokenizer(tmp_path, capsys):
    with pytest.raises(UserError, match="chat needs a decoder .*model.arch=bert is an encoder"):
        llm_jax.load(FIXTURES / "bert").generate("Hi", chat=True)
    assert main(["generate", str(FIXTURES / "t5"), "--chat", "--prompt", "Hi"]) == 2
    assert "error: chat needs a decoder that continues the conversation; model.arch=t5 is an encoder-decoder" \
        in capsys.readouterr().err
    # A Hugging Face directory's tokenizer_config.json gives its tokenizer the template.
    assert llm_jax.load(chat_llama(tmp_path / "llama_chat")).tokenizer.chat_template.source == CHATML


@pytest.mark.slow  # imports, trains 60 steps, exports (35 to 50 s here)
def test_an_imported_llama_fine_tunes_on_chats_in_its_own_template(tmp_path):
    """import-hf, then checkpoint.init_from the imported run on a chat JSONL: the rows are the
    ChatML rendering with exactly the assistant turns scored, the loss falls, and the answers to
    held-out chats come back through generate --chat up to <|im_end|>."""
    hf = chat_llama(tmp_path / "llama_chat")
    imported = tmp_path / "imported"
    assert main(["import-hf", str(hf), str(imported)]) == 0
    copied = imported / "tokenizer" / "tokenizer_config.json"
    assert copied.read_bytes() == (hf / "tokenizer_config.json").read_bytes()
    replies = {"A": "alpha", "B": "bravo", "C": "charlie"}
    rng = random.Random(0)
    chats = []
    for _ in range(120):
        marker = rng.choice("ABC")
        noise = "".join(rng.choice("xyz") for _ in range(4))
        chats.append({"messages": [{"role": "user", "content": f"{noise} {marker}"},
                                   {"role": "assistant", "content": replies[marker]}]})
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in chats))
    run = tmp_path / "run"
    assert main(["train", str(imported / "config.yaml"), f"run.dir={run}", f"checkpoint.init_from={imported}",
                 f"data.source=jsonl:{source}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1",
                 "train.seq_len=40", "train.batch_size=16", "train.steps=60", "optim.lr=1e-2",
                 "optim.warmup_steps=5", "train.log_every=1", "train.eval_every=60", "train.sample_tokens=0",
                 "checkpoint.every=0", "train.tensorboard=false"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.3 * losses[0], losses

    # The rows: ChatML's rendering, scored exactly on "reply<|im_end|>\n".
    cfg = read_run_config(run)
    assert cfg.data.format == "chat"
    tok = load_tokenizer(cfg, run)
    assert tok.chat_template.source == CHATML
    rows = np.asarray(build_data(cfg, tmp_path / "rows_check").train_tokens)
    first = chats[min(set(range(len(chats))) - jsonl_held_out_lines(source, 0.1))]["messages"]
    head = f"<s><|im_start|>user\n{first[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    turn = f"{first[1]['content']}<|im_end|>\n"
    n_head, n_turn = len(tok.encode(head)), len(tok.encode(turn))
    T = cfg.train.seq_len
    assert rows[0, :n_head + n_turn].tolist() == tok.encode(head + turn)
    assert rows[0, T + 1:].tolist() == [0] * (n_head - 1) + [1] * n_turn + [0] * (T + 1 - n_head - n_turn)

    held_out = [chats[i]["messages"] for i in sorted(jsonl_held_out_lines(source, 0.1))]
    model = llm_jax.load(run)
    answers = model.generate([m[0]["content"] for m in held_out], max_new_tokens=12, temperature=0, chat=True)
    assert answers == [m[1]["content"] for m in held_out]
    # Exported with its template, the checkpoint answers the same way as a Hugging Face directory.
    assert main(["export-hf", str(run), str(tmp_path / "exported")]) == 0
    exported = llm_jax.load(tmp_path / "exported")
    assert exported.tokenizer.chat_template.source == CHATML
    assert exported.generate([m[0]["content"] for m in held_out], max_new_tokens=12, temperature=0,
                             chat=True) == answers
