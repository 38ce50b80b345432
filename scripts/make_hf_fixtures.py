"""Make the Hugging Face parity fixtures in tests/fixtures/hf/ (needs torch and transformers).

For each family: a small random checkpoint saved with `save_pretrained` (config.json +
model.safetensors), a tiny tokenizer.json, and reference.npz holding fixed input ids and the
float32 logits transformers computes for them. The test suite reads these with numpy only.

reference.npz keys:
    gpt2, llama  input_ids [2, 12] int64; logits [2, 12, VOCAB] float32
    mixtral      the same, plus router_logits [2, 24, 4] float32: each layer's router logits (before the
                 softmax) for the 2 * 12 tokens, row-major over (batch, position), 4 experts
    bert         the same, plus token_type_ids and attention_mask [2, 12] int64 (a second segment
                 from position 5; row 1's last 3 ids are padding) and logits_segments_padding
                 [2, 12, VOCAB] float32, the logits with both
    t5           input_ids [2, 12] int32 (the encoder's input; row 1 ends with 3 pad ids, 0) and
                 attention_mask [2, 12] int32 (0 there); decoder_input_ids [2, 7] int32 (column 0 is
                 decoder_start_token_id, 0); logits [2, 7, VOCAB] float32, the decoder's logits
    mamba        input_ids [2, 12] int64; logits [2, 12, VOCAB] float32 (one forward over the 12 ids), and
                 logits_step [2, 12, VOCAB] float32: the same logits decoded one id at a time with the model's
                 cache (conv and SSM states), which must match logits

    python scripts/make_hf_fixtures.py [NAME ...]        # (re)write these fixtures (default: all)
    python scripts/make_hf_fixtures.py --check DIR NAME  # load DIR (e.g. an export-hf output) with
                                                          # transformers; compare to the logits of
                                                          # fixture NAME or of NAME.npz
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, trainers

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
VOCAB = 96
SEED = 0


def tiny_tokenizer(specials: list[str]) -> Tokenizer:
    """A character-level BPE over printable ASCII with the family's special tokens (ids 0, 1, ...
    in order; the decoders have just an end-of-text token), VOCAB ids in all."""
    tok = Tokenizer(models.BPE(unk_token=None))
    alphabet = list(string.ascii_letters + string.digits + " .,:;()[]=+-_'\"\n")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    text = ["def main(args):\n    return args.value + 1\n", "the quick brown fox jumps over the lazy dog"] * 50
    tok.train_from_iterator(text, trainer)
    return tok


def configs() -> dict[str, transformers.PretrainedConfig]:
    common = dict(vocab_size=VOCAB, initializer_range=0.2)
    return {
        "gpt2": transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common),
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **common),
        # Llama with a sparse MoE feed-forward: 4 experts, top 2. initializer_range 0.2 gives router logits
        # far enough from 0 that the top-2 choice varies across tokens, so the parity test covers routing.
        "mixtral": transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                              num_experts_per_tok=2, max_position_embeddings=64,
                                              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                                              bos_token_id=0, eos_token_id=0, router_jitter_noise=0.0,
                                              sliding_window=None, **common),
        # BertConfig's "gelu" is the exact (erf) GELU; pad_token_id 0 is [PAD] in the tokenizer.
        "bert": transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                                        hidden_act="gelu", hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, pad_token_id=0, **common),
        # T5 v1.0: ReLU feed-forward, and tied embeddings, which (in transformers) also scale the decoder's
        # output by d_model**-0.5 before the head. T5 has no initializer_range: its initialisation scales
        # every weight by initializer_factor instead, and 1.0 already gives logits with a std near 1.
        # pad 0, </s> 1 and the decoder's start id 0 match the tokenizer's specials below.
        "t5": transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                    num_decoder_layers=2, relative_attention_num_buckets=8,
                                    relative_attention_max_distance=16, feed_forward_proj="relu",
                                    tie_word_embeddings=True, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                                    initializer_factor=1.0, pad_token_id=0, eos_token_id=1,
                                    decoder_start_token_id=0),
        # Mamba (v1): a selective-SSM mixer per block, tied embeddings; intermediate_size = expand * 32 = 64.
        # time_step_min/max only set dt_proj.bias's initial range (softplus of it is the step size): wider than
        # the defaults (0.001, 0.1) so that A and the state carried across positions weigh more in the logits.
        "mamba": transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                          conv_kernel=4, time_step_rank=4, time_step_min=0.01, time_step_max=0.5,
                                          use_bias=False, use_conv_bias=True, residual_in_fp32=True,
                                          layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0,
                                          eos_token_id=0, pad_token_id=0, **common),
    }


MODEL_CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
                 "mixtral": transformers.MixtralForCausalLM, "bert": transformers.BertForMaskedLM,
                 "t5": transformers.T5ForConditionalGeneration, "mamba": transformers.MambaForCausalLM}
SPECIALS = {"gpt2": ["<|endoftext|>"], "llama": ["</s>"], "mixtral": ["</s>"],
            "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "t5": ["<pad>", "</s>", "<unk>"],
            "mamba": ["</s>"]}


def input_ids() -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, VOCAB, (2, 12)).astype(np.int64)


def logits_of(model: torch.nn.Module, ids: np.ndarray, **extra: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        kwargs = {k: torch.from_numpy(v) for k, v in extra.items()}
        return model(torch.from_numpy(ids), **kwargs).logits.float().numpy()


def router_logits_of(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """An MoE model's router logits for ids: [layers, batch * positions, experts] float32."""
    with torch.no_grad():
        layers = model(torch.from_numpy(ids), output_router_logits=True).router_logits
    return torch.stack([r.float() for r in layers]).numpy()


def step_logits_of(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """A recurrent model's logits for ids, fed one position at a time with its cache (transformers 5's
    `cache`; the first call creates it): [batch, positions, VOCAB] float32, to compare with logits_of."""
    steps, cache = [], None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(torch.from_numpy(ids[:, t:t + 1]), cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits.float())
    return torch.cat(steps, dim=1).numpy()


def segments_and_padding() -> dict[str, np.ndarray]:
    """BERT's extra inputs: a second segment from position 5 on, and the last 3 ids of row 1 as padding."""
    token_type_ids = np.zeros((2, 12), np.int64)
    token_type_ids[:, 5:] = 1
    attention_mask = np.ones((2, 12), np.int64)
    attention_mask[1, 9:] = 0
    return {"token_type_ids": token_type_ids, "attention_mask": attention_mask}


def seq2seq_inputs() -> dict[str, np.ndarray]:
    """T5's inputs: encoder ids with the last 3 of row 1 as padding, and decoder ids that start with
    decoder_start_token_id. Ordinary ids come from 3 on, so pad (0), </s> (1) and <unk> (2) appear only
    where put on purpose; the padding is both pad ids and masked, as a tokenizer would produce it."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, VOCAB, (2, 12)).astype(np.int32)
    attention_mask = np.ones((2, 12), np.int32)
    ids[1, 9:], attention_mask[1, 9:] = 0, 0
    decoder_input_ids = rng.integers(3, VOCAB, (2, 7)).astype(np.int32)
    decoder_input_ids[:, 0] = 0  # decoder_start_token_id, as T5's _shift_right puts it
    return {"input_ids": ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


def seq2seq_logits(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The decoder's logits for input_ids, attention_mask and decoder_input_ids, as in reference.npz."""
    return logits_of(model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     decoder_input_ids=inputs["decoder_input_ids"])


def make(name: str) -> None:
    torch.manual_seed(SEED)
    model = MODEL_CLASSES[name](configs()[name]).eval()
    # Biases and norm gains start at 0 and 1; randomise them so the parity test covers them.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # Mamba's A_log and D start as log(1..state_size) and 1 (and dt_proj.bias, 1-D, from its dt range).
            if p.ndim == 1 or pname.endswith(".A_log"):
                p.add_(0.1 * torch.randn_like(p))
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer(SPECIALS[name]).save(str(out / "tokenizer.json"))
    if name == "t5":  # encoder-decoder: its own inputs, and logits over the decoder's positions
        inputs = seq2seq_inputs()
        np.savez(out / "reference.npz", **inputs, logits=seq2seq_logits(model, inputs))
        print(f"wrote {out}")
        return
    ids = input_ids()
    logits = logits_of(model, ids)
    extra = {}
    if name == "bert":  # also the logits with segments and a padding mask
        inputs = segments_and_padding()
        extra = {**inputs, "logits_segments_padding": logits_of(model, ids, **inputs)}
    if name == "mixtral":  # also each layer's router logits, to check a port's routing layer by layer
        extra = {"router_logits": router_logits_of(model, ids)}
    if name == "mamba":  # also the logits decoded token by token with the cache, to check recurrent decoding
        extra = {"logits_step": step_logits_of(model, ids)}
        print(f"{name}: max |logits_step - logits| = {np.abs(extra['logits_step'] - logits).max():.2e}")
    np.savez(out / "reference.npz", input_ids=ids, logits=logits, **extra)
    print(f"wrote {out}")


def check(directory: Path, name: str) -> int:
    """`name`: a fixture (gpt2, llama, mixtral, bert, t5, mamba) or an .npz with input_ids and the logits
    llm-jax computed (for T5 also attention_mask and decoder_input_ids, as in its reference.npz; router_logits
    and logits_step, where present, are compared as well)."""
    ref = np.load(name if name.endswith(".npz") else ROOT / name / "reference.npz")
    model_type = transformers.AutoConfig.from_pretrained(directory).model_type
    if model_type == "t5":  # encoder-decoder: the logits are the decoder's, given the encoder's input
        model = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
        got = seq2seq_logits(model, {k: ref[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")})
        err = float(np.abs(got - ref["logits"]).max())
        print(f"{directory}: max |logits - reference| = {err:.2e}")
        return 0 if err < 2e-4 else 1
    # An encoder's checkpoint loads with its masked-LM head, a decoder's with its causal-LM head.
    masked = model_type == "bert"
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(directory).eval()
    got = logits_of(model, ref["input_ids"])
    err = float(np.abs(got - ref["logits"]).max())
    if "logits_segments_padding" in ref:  # BERT fixtures: segments and padding as well
        inputs = {k: ref[k] for k in ("token_type_ids", "attention_mask")}
        got = logits_of(model, ref["input_ids"], **inputs)
        err = max(err, float(np.abs(got - ref["logits_segments_padding"]).max()))
    print(f"{directory}: max |logits - reference| = {err:.2e}")
    if "router_logits" in ref:  # MoE fixtures: each layer's router logits as well
        got = router_logits_of(model, ref["input_ids"])
        router_err = float(np.abs(got - ref["router_logits"]).max())
        print(f"{directory}: max |router_logits - reference| = {router_err:.2e}")
        err = max(err, router_err)
    if "logits_step" in ref:  # recurrent fixtures: decoding one id at a time with the cache as well
        step_err = float(np.abs(step_logits_of(model, ref["input_ids"]) - ref["logits_step"]).max())
        print(f"{directory}: max |logits_step - reference| = {step_err:.2e}")
        err = max(err, step_err)
    return 0 if err < 2e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"fixtures to (re)write, of {', '.join(MODEL_CLASSES)} (default: all)")
    parser.add_argument("--check", nargs=2, metavar=("DIR", "NAME"))
    args = parser.parse_args()
    if args.check:
        if args.names:
            parser.error("--check takes no fixture names besides its own NAME")
        return check(Path(args.check[0]), args.check[1])
    # Checked by hand rather than with choices=, which argparse also applies to an empty list.
    unknown = [name for name in args.names if name not in MODEL_CLASSES]
    if unknown:
        parser.error(f"unknown fixtures {', '.join(unknown)}: choose from {', '.join(MODEL_CLASSES)}")
    # Each fixture reseeds torch itself, so writing some of them leaves the others' numbers unchanged.
    for name in args.names or list(MODEL_CLASSES):
        make(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
