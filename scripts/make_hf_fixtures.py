"""Make the Hugging Face parity fixtures in tests/fixtures/hf/ (needs torch and transformers).

For each family: a small random checkpoint saved with `save_pretrained` (config.json +
model.safetensors), a tiny tokenizer.json, and reference.npz holding fixed input ids and the
float32 logits transformers computes for them. The test suite reads these with numpy only.

    python scripts/make_hf_fixtures.py                   # (re)write every fixture
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
        # BertConfig's "gelu" is the exact (erf) GELU; pad_token_id 0 is [PAD] in the tokenizer.
        "bert": transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                                        hidden_act="gelu", hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, pad_token_id=0, **common),
    }


MODEL_CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
                 "bert": transformers.BertForMaskedLM}
SPECIALS = {"gpt2": ["<|endoftext|>"], "llama": ["</s>"],
            "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}


def input_ids() -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, VOCAB, (2, 12)).astype(np.int64)


def logits_of(model: torch.nn.Module, ids: np.ndarray, **extra: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        kwargs = {k: torch.from_numpy(v) for k, v in extra.items()}
        return model(torch.from_numpy(ids), **kwargs).logits.float().numpy()


def segments_and_padding() -> dict[str, np.ndarray]:
    """BERT's extra inputs: a second segment from position 5 on, and the last 3 ids of row 1 as padding."""
    token_type_ids = np.zeros((2, 12), np.int64)
    token_type_ids[:, 5:] = 1
    attention_mask = np.ones((2, 12), np.int64)
    attention_mask[1, 9:] = 0
    return {"token_type_ids": token_type_ids, "attention_mask": attention_mask}


def make(name: str) -> None:
    torch.manual_seed(SEED)
    model = MODEL_CLASSES[name](configs()[name]).eval()
    # Biases and norm gains start at 0 and 1; randomise them so the parity test covers them.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer(SPECIALS[name]).save(str(out / "tokenizer.json"))
    ids = input_ids()
    extra = {}
    if name == "bert":  # also the logits with segments and a padding mask
        inputs = segments_and_padding()
        extra = {**inputs, "logits_segments_padding": logits_of(model, ids, **inputs)}
    np.savez(out / "reference.npz", input_ids=ids, logits=logits_of(model, ids), **extra)
    print(f"wrote {out}")


def check(directory: Path, name: str) -> int:
    """`name`: a fixture (gpt2, llama, bert) or an .npz with input_ids and the logits llm-jax computed."""
    ref = np.load(name if name.endswith(".npz") else ROOT / name / "reference.npz")
    # An encoder's checkpoint loads with its masked-LM head, a decoder's with its causal-LM head.
    masked = transformers.AutoConfig.from_pretrained(directory).model_type == "bert"
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(directory).eval()
    got = logits_of(model, ref["input_ids"])
    err = float(np.abs(got - ref["logits"]).max())
    if "logits_segments_padding" in ref:  # BERT fixtures: segments and padding as well
        inputs = {k: ref[k] for k in ("token_type_ids", "attention_mask")}
        got = logits_of(model, ref["input_ids"], **inputs)
        err = max(err, float(np.abs(got - ref["logits_segments_padding"]).max()))
    print(f"{directory}: max |logits - reference| = {err:.2e}")
    return 0 if err < 2e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", nargs=2, metavar=("DIR", "NAME"))
    args = parser.parse_args()
    if args.check:
        return check(Path(args.check[0]), args.check[1])
    for name in MODEL_CLASSES:
        make(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
