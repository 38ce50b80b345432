"""Reference throughput: Hugging Face GPT2LMHeadModel + torch AdamW on this CPU.

Not part of llm-jax (PyTorch is never a runtime dependency); run it with a Python that has
torch and transformers, next to `llm-jax bench gpt_bench`, e.g. `experiments/compare_torch.sh`.
The model matches configs/gpt_bench.yaml: 6 layers, d_model 384, 6 heads, d_ff 1536,
vocab 384 (the padded byte vocabulary), seq 256, batch 8, fp32.
"""

import argparse
import json
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=384, n_positions=args.seq, n_embd=384, n_layer=6, n_head=6, n_inner=1536,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, 384, (args.batch, args.seq + 1))

    def step() -> float:
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    print(json.dumps({"impl": "torch-hf-gpt2", "attn": model.config._attn_implementation,
                      "threads": torch.get_num_threads(), "step_ms": 1000 * elapsed / args.steps,
                      "tokens_per_s": args.steps * args.batch * args.seq / elapsed}))


if __name__ == "__main__":
    main()
