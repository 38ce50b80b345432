"""The alignment walkthrough on the arithmetic task (docs/alignment.md, "Walkthrough"): SFT, pairs
from its checked samples, a reward model, DPO at several beta, PPO at several KL coefficients,
GRPO and RLOO; then every policy's reward and KL to the SFT model on held-out problems, best-of-N
by the verifier and by the reward model, and the reward-KL frontier (the DPO paper's figure 2).

    .venv/bin/python experiments/alignment_arith.py --dir runs/alignment [--sft runs/sft_arith]
        [--quick] [--out experiments/results/alignment_arith]

Each stage is the documented `llm-jax` command (run in this process through `cli.main`); a stage
whose run directory already holds its final checkpoint is not run again, so the script resumes.
Every policy is measured the same way: 4 samples at temperature 1 of each of the first 256
validation problems (reward, share solved, KL(policy || SFT) from the samples' log-probabilities)
and one greedy answer each (exact match).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

from llm_jax.alignment.best_of_n import best_of_n
from llm_jax.alignment.evaluate import evaluate_policy
from llm_jax.alignment.rewards import scorer_of
from llm_jax.cli import main as cli
from llm_jax.data import arith
from llm_jax.inference.api import load

EVAL_PROBLEMS = 256
SAMPLES = 4
MAX_NEW_TOKENS = 6


def finished(run_dir: Path) -> bool:
    """A run whose config asked for N steps and whose metrics reached it."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    steps = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]
    return any(json.loads(line).get("step") == steps for line in metrics.read_text().splitlines() if line.strip())


def train(preset: str, run_dir: Path, overrides: list[str], log: dict) -> None:
    if finished(run_dir):
        print(f"{run_dir}: finished before, kept")
        return
    start = time.perf_counter()
    code = cli(["train", preset, f"run.dir={run_dir}", *overrides])
    if code != 0:
        raise SystemExit(f"llm-jax train {preset} {' '.join(overrides)} failed with exit code {code}")
    log[run_dir.name] = {"preset": preset, "overrides": overrides, "seconds": round(time.perf_counter() - start, 1)}


def measure(policy_dir: Path, sft, prompts: list[str], scorer) -> dict:
    policy = load(policy_dir)
    sampled = evaluate_policy(policy, sft, prompts, scorer, samples=SAMPLES, max_new_tokens=MAX_NEW_TOKENS,
                              temperature=1.0, seed=1)
    greedy = evaluate_policy(policy, None, prompts, scorer, samples=1, max_new_tokens=MAX_NEW_TOKENS,
                             temperature=0.0)
    return {"reward": sampled["reward"], "solved": sampled["solved"], "kl": sampled["kl"],
            "exact_match": greedy["solved"], "greedy_reward": greedy["reward"], "response_len": sampled["response_len"]}


def best_of_n_curves(sft, rm_dir: Path, prompts: list[str], scorer) -> dict:
    """Best of N = 1, 4, 16 samples of the SFT model, picked by the verifier and by the reward
    model, each scored by the verifier (what the picked answers are really worth)."""
    result = best_of_n(sft, prompts, 16, scorer, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=2)
    flat_prompts = [p for p in prompts for _ in range(16)]
    flat_samples = [s for row in result.samples for s in row]
    rm_scores = np.asarray(load(rm_dir).score(flat_prompts, flat_samples)).reshape(len(prompts), 16)
    curves = {}
    for k in (1, 4, 16):
        by_rm = rm_scores[:, :k].argmax(axis=1)
        true_of_rm_pick = result.scores[np.arange(len(prompts)), by_rm]
        curves[k] = {"verifier_pick_reward": result.mean_best(k),
                     "verifier_pick_solved": result.share_at_least(k, 1.0),
                     "rm_pick_reward": float(true_of_rm_pick.mean()),
                     "rm_pick_solved": float((true_of_rm_pick >= 1).mean())}
    return curves


def plot_frontier(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, marker in (("sft", "*"), ("dpo", "o"), ("ppo", "s"), ("grpo", "^"), ("rloo", "v")):
        points = [r for r in rows if r["method"] == method]
        if not points:
            continue
        ax.scatter([r["kl"] for r in points], [r["reward"] for r in points], marker=marker, s=60, label=method)
        for r in points:
            ax.annotate(r["setting"], (r["kl"], r["reward"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("KL(policy || SFT), nats per completion (sampled)")
    ax.set_ylabel("mean reward of samples (temperature 1)")
    ax.set_title("Reward against KL on the arithmetic task")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("runs/alignment"))
    parser.add_argument("--sft", type=Path, help="an sft_arith run to start from (default: train one in --dir)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/alignment_arith"))
    parser.add_argument("--quick", action="store_true", help="one setting per method (the presets' own)")
    args = parser.parse_args()
    root = args.dir
    root.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log: dict = {}

    sft_dir = args.sft or root / "sft"
    if args.sft is None:
        train("sft_arith", sft_dir, [], log)
    pairs = root / "pairs.jsonl"
    if not pairs.exists():
        start = time.perf_counter()
        assert cli(["pairs", str(sft_dir), "--out", str(pairs), "--count", "4096"]) == 0
        log["pairs"] = {"seconds": round(time.perf_counter() - start, 1)}
    from_sft = [f"checkpoint.init_from={sft_dir}"]
    rm_dir = root / "rm"
    train("rm_arith", rm_dir, from_sft + [f"data.source=jsonl:{pairs}"], log)

    policies: list[tuple[str, str, Path]] = [("sft", "", sft_dir)]
    betas = [0.1] if args.quick else [0.03, 0.1, 0.3]
    for beta in betas:
        run = root / f"dpo_b{beta}"
        train("dpo_arith", run, from_sft + [f"data.source=jsonl:{pairs}", f"pref.beta={beta}"], log)
        policies.append(("dpo", f"beta {beta}", run))
    kls = [0.05] if args.quick else [0.01, 0.05, 0.2]
    for kl in kls:
        run = root / f"ppo_kl{kl}"
        train("ppo_arith", run, from_sft + [f"rl.kl_coef={kl}"], log)
        policies.append(("ppo", f"kl {kl}", run))
    train("grpo_arith", root / "grpo", from_sft, log)
    policies.append(("grpo", "kl 0.04", root / "grpo"))
    train("grpo_arith", root / "rloo", from_sft + ["rl.method=rloo"], log)
    policies.append(("rloo", "kl 0.04", root / "rloo"))

    prompts = [p.prompt for p in arith.problems("validation", EVAL_PROBLEMS, seed=0)]
    scorer = scorer_of("arith")
    sft = load(sft_dir)
    rows = []
    for method, setting, run in policies:
        row = {"method": method, "setting": setting, "run": run.name, **measure(run, sft, prompts, scorer)}
        rows.append(row)
        print(json.dumps(row))
    curves = best_of_n_curves(sft, rm_dir, prompts, scorer)
    rm_eval = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]

    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / "best_of_n.json").write_text(json.dumps({"curves": curves, "reward_model_eval": rm_eval[-1:],
                                                         "train_seconds": log}, indent=1))
    plot_frontier(rows, args.out / "frontier.png")
    print(json.dumps(curves, indent=1))
    print(f"wrote {args.out}/results.jsonl, best_of_n.json, frontier.png")


if __name__ == "__main__":
    main()
