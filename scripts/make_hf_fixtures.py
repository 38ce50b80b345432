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


def tiny_tokenizer(eos: str) -> Tokenizer:
    """A character-level BPE over printable ASCII with one end-of-text token, VOCAB ids in all."""
    tok = Tokenizer(models.BPE(unk_token=None))
    alphabet = list(string.ascii_letters + string.digits + " .,:;()[]=+-_'\"\n")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[eos], initial_alphabet=alphabet,
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
    }


MODEL_CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}
EOS = {"gpt2": "<|endoftext|>", "llama": "</s>"}


def input_ids() -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, VOCAB, (2, 12)).astype(np.int64)


def logits_of(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


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
    tiny_tokenizer(EOS[name]).save(str(out / "tokenizer.json"))
    ids = input_ids()
    np.savez(out / "reference.npz", input_ids=ids, logits=logits_of(model, ids))
    print(f"wrote {out}")


def check(directory: Path, name: str) -> int:
    """`name`: a fixture (gpt2, llama) or an .npz with input_ids and the logits llm-jax computed."""
    ref = np.load(name if name.endswith(".npz") else ROOT / name / "reference.npz")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    got = logits_of(model, ref["input_ids"])
    err = float(np.abs(got - ref["logits"]).max())
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
