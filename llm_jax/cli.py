"""The `llm-jax` command: parse arguments, then call the library. User errors exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

import absl.logging
import jax

from llm_jax.alignment.best_of_n import best_of_n, format_curve, read_prompts, write_best
from llm_jax.alignment.pairs import write_pairs
from llm_jax.alignment.rewards import VERIFIER_PROMPTS, scorer_of
from llm_jax.alignment.run import rl_train
from llm_jax.config import key_docs, load_config
from llm_jax.data.build import describe_prepared, prepare_data
from llm_jax.errors import UserError
from llm_jax.inference.api import load
from llm_jax.interop import adapters
from llm_jax.interop.pretrained import export_hf
from llm_jax.parallel.cpu_devices import split_cpu_host
from llm_jax.parallel.distributed import initialize, is_multiprocess, resolve_placement
from llm_jax.parallel.platform import skip_absent_tpu
from llm_jax.parallel.topology import parse_topology
from llm_jax.paths import enable_compile_cache
from llm_jax.runtime.run_dir import check_run_dir
from llm_jax.scaling.fit import fit_all, format_fit
from llm_jax.scaling.launchers import submit_runs
from llm_jax.scaling.plots import write_plots
from llm_jax.scaling.report import write_report
from llm_jax.scaling.results import PARAM_COUNTS, read_results, select_arch
from llm_jax.scaling.sweep import LAUNCHERS, run_sweep
from llm_jax.train.aot import OutOfMemory, check_fits, compile_for_topology, format_report, too_big
from llm_jax.train.bench import bench
from llm_jax.train.import_hf import import_hf
from llm_jax.train.run import describe_eval, print_sample, train

USAGE_EXAMPLES = """examples:
  llm-jax train gpt_small                      # the default model on the stdlib corpus
  llm-jax train gpt_tiny train.steps=50 run.dir=runs/try
  llm-jax generate runs/try --prompt "def " --max-new-tokens 100
  llm-jax generate runs/sft --chat --prompt "What is 2+2?"   # the answer of a chat-tuned run
  llm-jax best-of-n runs/sft_arith --reward arith --n 1,4,16   # reward of the best of N samples
  llm-jax bench gpt_small train.batch_size=8
  llm-jax compile gpt_1b --topology v5p-8 mesh.fsdp=-1 mesh.data=1   # HBM, FLOPs, collectives on a TPU pod
  llm-jax prepare gpt_small --workers 4        # tokenise the corpus into the cache ahead of training
  llm-jax prepare gpt_small --engine beam --runner DataflowRunner -- --project=P --region=R
  llm-jax import-hf path/to/hf_gpt2 runs/gpt2   # a Hugging Face checkpoint as a run
  llm-jax export-hf runs/try out/hf_try         # a run as a Hugging Face checkpoint
  llm-jax sweep isoflop_tiny --dir sweeps/tiny  # an IsoFLOP grid, its fits, plots and report
  llm-jax keys                                 # every config key with its default
  llm-jax fit results.csv --budget 1e21        # scaling laws of a sweep (--plots DIR: figures)
  llm-jax pairs runs/sft_arith --out pairs.jsonl   # preference pairs from a run's arithmetic samples
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        raise UserError(message)


def _parser() -> argparse.ArgumentParser:

    p = _Parser(prog="llm-jax", description="Train, sample and benchmark language models in JAX.",
                epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train (or resume) a model")
    t.add_argument("config", help="preset name (configs/NAME.yaml) or a YAML path")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    group = t.add_argument_group("multi-process (else $LLM_JAX_COORDINATOR etc., else the cluster's own variables)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    group.add_argument("--num-processes", type=int, metavar="N")
    group.add_argument("--process-id", type=int, metavar="I")

    b = sub.add_parser("bench", help="time the train step on synthetic tokens")
    b.add_argument("config")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    c = sub.add_parser("compile", help="compile the train and decode steps for a Cloud TPU topology here; "
                                       "report HBM per chip, FLOPs and collectives (docs/tpu.md)")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c.add_argument("--topology", required=True, metavar="NAME", help="accelerator type, e.g. v5p-128, v5e-16, v6e-256")
    c.add_argument("--num-slices", type=int, default=1, metavar="N", help="slices joined over DCN (use mesh.dcn_*)")
    c.add_argument("--tokens-per-s", type=float, metavar="X", help="also report the MFU this throughput would need")
    c.add_argument("--no-decode", action="store_true", help="compile only the train step")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    r = sub.add_parser("prepare", help="tokenise a config's corpus into the token cache (both splits)")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    r.add_argument("--workers", type=int, default=1, metavar="N", help="tokenising processes (default 1)")
    r.add_argument("--engine", choices=("local", "beam"), default="local",
                   help="local: this process and --workers; beam: an Apache Beam pipeline (pip install "
                        "'llm_jax[beam]'), the same store; Beam pipeline options go after --")
    r.add_argument("--runner", metavar="NAME", help="the Beam runner with --engine beam (default DirectRunner)")

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("run_dir")
    g.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true",
                   help="each prompt is a user message: render it with the run's chat template and the assistant's "
                        "header, stop at the end of the turn, print only the answer (decoders)")

    n = sub.add_parser("best-of-n", help="sample N completions per prompt and keep the one a reward model or "
                                         "a verifier scores best; prints the reward against N")
    n.add_argument("run_dir", help="the policy: a run directory or a Hugging Face checkpoint")
    n.add_argument("--reward", required=True, metavar="R", help="rm:RUN_DIR (a reward model run) or a verifier: "
                                                                "arith (docs/alignment.md)")
    n.add_argument("--n", default="1,4,16", metavar="N[,N...]",
                   help="samples per prompt; several report each (best of the first N of one draw; default 1,4,16)")
    n.add_argument("--prompts", metavar="FILE", help="one prompt per line, or JSONL with a prompt field "
                                                     "(default: the verifier's validation prompts)")
    n.add_argument("--count", type=int, default=100, help="prompts to use (default 100)")
    n.add_argument("--max-new-tokens", type=int, default=32)
    n.add_argument("--temperature", type=float, default=1.0)
    n.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--out", metavar="FILE", help="write each prompt's best completion as JSONL (a new file)")
    n.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    families = ", ".join(a.hf_class for a in adapters())
    i = sub.add_parser("import-hf", help=f"turn a Hugging Face checkpoint ({families}) into a new run directory")
    i.add_argument("hf_dir", help="directory with config.json and model.safetensors (and tokenizer.json)")
    i.add_argument("run_dir", help="new run directory to create")

    e = sub.add_parser("export-hf", help="write a run's newest checkpoint as a Hugging Face directory")
    e.add_argument("run_dir")
    e.add_argument("out_dir", help="new or empty directory")

    w = sub.add_parser("sweep", help="run an IsoFLOP sweep (model sizes x compute budgets) and fit scaling laws")
    w.add_argument("spec", help="sweep preset name (llm_jax/sweeps/NAME.yaml) or a YAML path")
    w.add_argument("--dir", required=True, help="the sweep's directory: runs, results.csv, plots, report.md")
    w.add_argument("--parallel", type=int, default=1, metavar="N", help="local runs at once (default 1)")
    w.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="run here, or submit one job per run to a cluster (docs/scaling.md)")
    w.add_argument("--collect", action="store_true",
                   help="start nothing: gather the finished runs into results.csv, fit and report")
    w.add_argument("--resubmit", action="store_true",
                   help="also start the unfinished runs an earlier command submitted to a cluster "
                        "(after their jobs have ended, e.g. failed)")

    sub.add_parser("keys", help="list every config key, its default and meaning")

    f = sub.add_parser("fit", help="fit scaling laws (Chinchilla approaches 2 and 3, Kaplan) to a sweep's results")
    f.add_argument("results", help="CSV with the columns params, tokens, loss (optional: name, arch, flops, ...)")
    f.add_argument("--budget", type=float, metavar="C",
                   help="also print the compute-optimal N, D and loss for C training FLOPs, e.g. 1e21")
    f.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    f.add_argument("--plots", metavar="DIR", help="write PNG figures and report.md to DIR (created if missing)")
    f.add_argument("--arch", help="fit only the runs of this arch (needed when the CSV holds several)")
    f.add_argument("--params", choices=tuple(PARAM_COUNTS), default="total",
                   help="N counts all parameters (column params, as Hoffmann et al.; the default) or the "
                        "non-embedding ones (column params_nonembed, as Kaplan et al.)")

    q = sub.add_parser("pairs", help="sample a run's answers to arithmetic problems, check them, "
                                     "write preference pairs")
    q.add_argument("run_dir")
    q.add_argument("--out", required=True, metavar="FILE.jsonl", help="new JSONL file of preference records")
    q.add_argument("--count", type=int, default=256, metavar="N", help="training problems (default 256)")
    q.add_argument("--samples", type=int, default=4, metavar="K", help="completions sampled per problem (default 4)")
    q.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0; 0 = greedy)")
    q.add_argument("--seed", type=int, default=0, help="seed of the problems and the sampling")
    return p


def _quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _cmd_train(args) -> None:

    cfg = load_config(args.config, args.overrides)
    placement = resolve_placement(args.coordinator, args.num_processes, args.process_id)
    split_cpu_host(cfg, single_process=placement.single_process)
    initialize(placement, cfg.distributed.timeout_s, cfg.distributed.connect_timeout_s)
    enable_compile_cache(cfg)
    if cfg.rl.method != "none":  # RL from a reward: the alignment runner, same run directory rules
        result = rl_train(cfg)
        if jax.process_index() == 0 and "reward" in result:
            print(f"final: step {result['step']}, reward {result['reward']:.4f}, kl {result['kl']:.4f}"
                  + (f", eval_reward {result['eval_reward']:.4f}" if "eval_reward" in result else ""))
        return
    result = train(cfg)
    main_process = jax.process_index() == 0
    if result.get("stopped_at") is not None:
        if main_process:
            print(f"stopped by SIGTERM at step {result['stopped_at']} after saving a checkpoint; "
                  "run the same command to resume")
        return
    if "eval_loss" in result and main_process:
        print(f"final: step {cfg.train.steps}, {describe_eval(result)}")
    print_sample(cfg, result)


def _cmd_bench(args) -> None:

    cfg = load_config(args.config, args.overrides)
    split_cpu_host(cfg, single_process=True)
    enable_compile_cache(cfg)
    result = bench(cfg)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>16}: {value:.4g}" if isinstance(value, float) else f"{key:>16}: {value}")


def _cmd_compile(args) -> None:
    if args.tokens_per_s is not None and not (math.isfinite(args.tokens_per_s) and args.tokens_per_s > 0):
        raise UserError(f"--tokens-per-s must be a positive number, got {args.tokens_per_s}")
    cfg = load_config(args.config, args.overrides)
    topology = parse_topology(args.topology, args.num_slices)
    name = Path(args.config).stem
    try:
        report = {"config": name, **compile_for_topology(cfg, topology, decode=not args.no_decode,
                                                         tokens_per_s=args.tokens_per_s)}
    except OutOfMemory as oom:  # refused by the compiler itself
        if args.json:
            print(json.dumps({"config": name, "topology": topology.name, "num_slices": topology.num_slices,
                              "chips": topology.total_chips, "hbm_per_chip_bytes": oom.needed,
                              "hbm_capacity_bytes": topology.hbm_bytes, "fits": False, "refused_by_compiler": True,
                              # what only a compiled program tells
                              "flops_per_step": None, "flops_per_step_formula": None, "collectives": None,
                              "compile_s": None, "decode": None}))
        raise UserError(too_big(name, topology.name, oom.needed, topology.hbm_bytes)) from None
    print(json.dumps(report) if args.json else format_report(report))
    check_fits(name, report)


def _cmd_prepare(args) -> None:

    cfg = load_config(args.config, args.overrides)
    run_dir, _ = check_run_dir(cfg)  # sentencepiece / hf tokenizers are kept in the run directory
    beam_args = None
    if args.engine == "beam":
        beam_args = [f"--runner={args.runner or 'DirectRunner'}", *args.pipeline_options]
    elif args.runner or args.pipeline_options:
        raise UserError("--runner and pipeline options after -- are for --engine beam")
    for prepared in prepare_data(cfg, run_dir, args.workers, beam_args):
        print(describe_prepared(prepared))


def _cmd_generate(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    model = load(args.run_dir)
    texts = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat)
    for prompt, text in zip(args.prompt, texts):
        # An encoder-decoder's output is a target of its own, not a continuation of the source;
        # a chat's answer is printed alone (the prompt went in wrapped in the template).
        print(text if args.chat else prompt + text if model.continues_prompt else f"{prompt}\n=> {text}")
        if len(args.prompt) > 1:
            print("---")


def _cmd_best_of_n(args) -> None:
    try:
        ks = sorted({int(k) for k in args.n.split(",")})
    except ValueError:
        raise UserError(f"--n takes sample counts such as 1,4,16, not {args.n!r}") from None
    if ks[0] < 1 or args.count < 1 or args.max_new_tokens < 1:
        raise UserError("--n, --count and --max-new-tokens must be at least 1")
    if args.out and Path(args.out).exists():
        raise UserError(f"{args.out} exists; choose a new --out file (it is never overwritten)")
    scorer = scorer_of(args.reward)
    if args.prompts:
        prompts = read_prompts(args.prompts, args.count)
    elif args.reward in VERIFIER_PROMPTS:
        prompts = VERIFIER_PROMPTS[args.reward](args.count)
    else:
        raise UserError(f"--reward {args.reward} brings no prompts of its own; give --prompts FILE")
    result = best_of_n(load(args.run_dir), prompts, ks[-1], scorer, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.out:
        write_best(result, args.out)
    if args.json:
        print(json.dumps({"prompts": len(prompts), "reward": args.reward,
                          "curve": [{"n": k, "mean_reward": result.mean_best(k),
                                     "share_solved": result.share_at_least(k, 1.0)} for k in ks]}))
    else:
        print(format_curve(result, ks, args.reward))


def _cmd_import_hf(args) -> None:

    kind = import_hf(args.hf_dir, args.run_dir)
    print(f"imported {kind} from {args.hf_dir} into {args.run_dir} (checkpoint at step 0)")


def _cmd_export_hf(args) -> None:

    kind = export_hf(args.run_dir, args.out_dir)
    print(f"exported {args.run_dir} as {kind} to {args.out_dir}")


def _cmd_sweep(args) -> int:

    return run_sweep(args.spec, Path(args.dir), args.parallel, args.launcher, args.collect, resubmit=args.resubmit,
                     submit=lambda runs, sweep_dir, submitted: submit_runs(args.launcher, runs, sweep_dir,
                                                                           submitted=submitted))


def _cmd_keys(_args) -> None:

    for key, default, doc in key_docs():
        print(f"{key:<26} {default:<16} {doc}")


def _cmd_fit(args) -> None:
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise UserError(f"--budget must be a positive number of FLOPs, e.g. 1e21; got {args.budget}")
    # Refuse a bad --plots before fitting; create the directory only once the fit has succeeded.
    if args.plots is not None and Path(args.plots).exists() and not Path(args.plots).is_dir():
        raise UserError(f"--plots {args.plots} exists and is not a directory")
    points = select_arch(read_results(args.results, PARAM_COUNTS[args.params]), args.arch)
    result = fit_all(points, args.budget)
    print(json.dumps(result) if args.json else format_fit(result))
    if args.plots is None:
        return
    plots = write_plots(points, result, args.plots)
    report = write_report(result, args.plots, plots, title=f"Scaling-law fit of {Path(args.results).name}",
                          extra_lines=[f"Fitted by `llm-jax fit` from `{args.results}`."])
    # With --json, stdout stays one JSON object.
    print(f"wrote {report} and {len(plots)} figures", file=sys.stderr if args.json else sys.stdout)


def _cmd_pairs(args) -> None:

    stats = write_pairs(args.run_dir, args.out, args.count, args.samples, args.temperature, args.seed)
    print(f"wrote {args.out}: {stats.describe()}")


COMMANDS = {"train": _cmd_train, "bench": _cmd_bench, "compile": _cmd_compile, "prepare": _cmd_prepare,
            "generate": _cmd_generate, "best-of-n": _cmd_best_of_n,
            "import-hf": _cmd_import_hf, "export-hf": _cmd_export_hf, "sweep": _cmd_sweep, "keys": _cmd_keys,
            "fit": _cmd_fit, "pairs": _cmd_pairs}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
        _quiet_libraries()
        skip_absent_tpu()
        code = COMMANDS[args.command](args)
    except UserError as exc:
        # One line whatever the message holds: it may quote a config key or a dataset's text.
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return _exit_code(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _exit_code(130)
    except Exception:
        if not _in_multiprocess_run():
            raise
        traceback.print_exc()
        return _exit_code(1)
    return code or 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; what follows a `--` is kept apart as `pipeline_options` (prepare's
    Beam options, which argparse would otherwise take for positional arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow the options (`compile gpt_1b --topology v5p-8 mesh.fsdp=-1`).
    if unknown and hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
        args.overrides = [*args.overrides, *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and args.command != "prepare":
        parser.error(f"arguments after -- are pipeline options of prepare --engine beam: {' '.join(extra)}")
    args.pipeline_options = extra
    return args


def _in_multiprocess_run() -> bool:
    return is_multiprocess()


def _exit_code(code: int) -> int:
    """A failing process of a multi-process run leaves at once: a normal exit would first wait
    at JAX's shutdown barrier for peers that are themselves waiting for it in a collective."""
    if _in_multiprocess_run():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
