"""`llm-jax train`: a run directory, data, the sharded train state, and the Trainer with its hooks;
resumes by step from the newest complete checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils

from llm_jax.config import Config
from llm_jax.config.schema import SYNTHETIC_TASKS
from llm_jax.data import BatchIterator, build_data, eval_batches, resolve_format, train_dataset
from llm_jax.data.mixture import EvalSet, describe_mixture, mixture_dataset, mixture_eval_sets
from llm_jax.errors import UserError
from llm_jax.inference.api import Model
from llm_jax.interop import pretrained
from llm_jax.models.base import family_of, model_vocab_size
from llm_jax.parallel.distributed import StopRequest, barrier, broadcast_flag, is_multiprocess
from llm_jax.parallel.mesh import make_mesh
from llm_jax.runtime.checkpoint import Checkpointer
from llm_jax.runtime.metrics import MetricsWriter, peak_flops_total
from llm_jax.runtime.run_dir import check_run_dir, trim_metrics, write_run_config
from llm_jax.train.exact_match import (
    check_exact_match,
    completions_of_rows,
    describe_exact_match,
    evaluate_exact_match,
)
from llm_jax.train.nonfinite import NonfinitePolicy, RollbackOnNonfinite, SkipNonfinite, StopOnNonfinite
from llm_jax.train.objectives import tokenizer_objective
from llm_jax.train.rollback import Rollback, run_with_rollbacks
from llm_jax.train.setup import TrainSetup, build_setup
from llm_jax.train.state import init_state, start_reference
from llm_jax.train.trainer import Evaluate, Hook, LogMetrics, StepTimeout, Trainer

# Fields of the data position that must match for a resumed run to see the same batches
# (the process layout may change: the global batch of a step is the same on any topology).
ORDER_KEYS = ("seed", "seq_len", "global_batch", "n_windows")


def _describe_mixture(entries: list[dict] | None) -> str:
    if entries is None:
        return "none"
    return ", ".join(f"{e['name']}={e['source']} weight {e['weight']:.6g} ({e['n_windows']} windows)" for e in entries)


def check_data_order(saved: dict, current: dict) -> None:
    diffs = [f"{k}: {saved[k]} -> {current[k]}" for k in ORDER_KEYS
             if k in saved and k in current and saved[k] != current[k]]
    # A mixture's entries (names, sources, weights, windows) must be the same; a checkpoint without one had none.
    if saved.get("mixture") != current.get("mixture"):
        diffs.insert(0, f"data mixture: {_describe_mixture(saved.get('mixture'))} -> "
                        f"{_describe_mixture(current.get('mixture'))}")
    if diffs:
        raise UserError("the training data changed since the checkpoint (" + "; ".join(diffs) +
                        "); resuming would not replay the same batches. Use a new run.dir")


def evaluate(setup: TrainSetup, params: dict, batches: list[jax.Array], bytes_per_token: float | None,
             ref_params: dict | None = None) -> dict:
    """Held-out loss per scored target, the share of targets the argmax predicts (next tokens,
    masked tokens, task targets or labels; preference pairs ranked right), and bits per byte for
    next-token prediction. `ref_params`: the reference model of an objective that needs one."""
    total = count = hits = 0.0
    reference = () if ref_params is None else (ref_params,)
    for batch in batches:
        s, c, h = setup.eval_step(params, batch, *reference)
        total, count, hits = total + float(s), count + float(c), hits + float(h)
    result = {"eval_loss": total / count, "eval_accuracy": hits / count}
    if bytes_per_token is not None:
        result["eval_bpb"] = result["eval_loss"] / math.log(2) / bytes_per_token
    return result


def evaluate_mixture(setup: TrainSetup, params: dict, sets: list[EvalSet], causal: bool,
                     ref_params: dict | None = None) -> dict:
    """The mixture's held-out numbers: each source's own (`eval_loss/<name>`, `eval_bpb/<name>`)
    and their weighted means, the loss per token of text drawn in the mixture's proportions;
    bits per byte = that loss / ln 2 / the mixture's bytes per token (the weighted mean)."""
    per_source = {s.name: evaluate(setup, params, s.batches, s.bytes_per_token if causal else None, ref_params)
                  for s in sets}
    result = {key: sum(s.weight * per_source[s.name][key] for s in sets) for key in ("eval_loss", "eval_accuracy")}
    if causal:
        bytes_per_token = sum(s.weight * s.bytes_per_token for s in sets)
        result["eval_bpb"] = result["eval_loss"] / math.log(2) / bytes_per_token
    for name, ev in per_source.items():
        result.update({f"{key}/{name}": ev[key] for key in ("eval_loss", "eval_bpb") if key in ev})
    return result


def describe_eval(ev: dict) -> str:
    text = f"eval loss {ev['eval_loss']:.4f}"
    per_source = [f"{k.removeprefix('eval_loss/')} {v:.4f}" for k, v in ev.items() if k.startswith("eval_loss/")]
    text += f" ({', '.join(per_source)})" if per_source else ""
    text += f", {ev['eval_bpb']:.3f} bits per byte" if "eval_bpb" in ev else ""
    text += f", accuracy {ev['eval_accuracy']:.3f}"
    exact = describe_exact_match(ev)
    return text + (f", {exact}" if exact else "")


def exact_match_evaluator(cfg: Config, setup: TrainSetup, bundle: Any):
    """params -> exact-match scores of greedy completions of the first train.eval_exact_match
    validation examples (`train.exact_match`), or None when it is off."""
    if not cfg.train.eval_exact_match:
        return None
    tokenizer = bundle.tokenizer
    examples = completions_of_rows(bundle.val_tokens, cfg.train.seq_len, tokenizer.eos_id, bundle.val_kinds,
                                   cfg.train.eval_exact_match)

    def scores(params: dict) -> dict:
        if is_multiprocess():
            # Every process takes part in gathering the parameters, then decodes the same examples.
            params = multihost_utils.process_allgather(params, tiled=True)
        return evaluate_exact_match((setup.mdef, params), cfg, tokenizer, examples, cfg.train.batch_size)

    return scores


class SaveCheckpoints(Hook):
    """Save every `checkpoint.every` steps and at the end; on SIGTERM save at once and stop. Every
    step up to the one saved has been checked for a non-finite loss first (`Trainer.drain`)."""

    def __init__(self, ckpt: Checkpointer, cfg: Config, data_position, log):
        self.ckpt, self.cfg, self.data_position, self.log = ckpt, cfg, data_position, log
        self.stop = StopRequest()

    def after_step(self, trainer: Trainer, done: int, state: Any, metrics: dict) -> bool:
        stopping = self.stop.reached(done) and done < self.cfg.train.steps
        if self.ckpt.should_save(done, self.cfg.train.steps) or stopping:
            trainer.drain()  # a save waits for the state anyway; a bad step raises here, unsaved
            self.ckpt.save(done, state, {"next_step": done, **self.data_position()}, self.cfg, force=stopping)
        if stopping:
            self.log(f"step {done}: SIGTERM received; checkpoint saved, stopping")
        return stopping

    def close(self) -> None:
        self.stop.close()


class ProgressAdvance(Hook):
    """Moves the progress bar (and its ETA) by one step."""

    def __init__(self, writer: MetricsWriter):
        self.writer = writer

    def after_step(self, trainer: Trainer, done: int, state: Any, metrics: dict) -> bool:
        self.writer.advance()
        return False


def nonfinite_handling(cfg: Config, ckpt: Checkpointer, setup: TrainSetup, batches: BatchIterator,
                       writer: MetricsWriter, data_state: dict) -> tuple[NonfinitePolicy, Rollback | None]:
    """train.on_nonfinite's policy for the Trainer, and the rollback that answers it under `rollback`."""
    skipped = int(data_state.get("skipped_steps", 0))  # kept across policies: a count of the run
    if cfg.train.on_nonfinite == "skip":
        return SkipNonfinite(writer.log, skipped), None
    if cfg.train.on_nonfinite == "rollback":
        return RollbackOnNonfinite(skipped), Rollback(ckpt, setup.abstract_state, batches, writer)
    return StopOnNonfinite(ckpt, skipped), None


def open_checkpoints(cfg: Config, run_dir: Path, existed: bool, abstract_state: Callable[[], dict],
                     warnings: Sequence[str] = ()) -> tuple[Checkpointer, tuple[int, Any] | None, MetricsWriter]:
    """The run's Checkpointer; for an existing run the newest checkpoint that verifies and restores
    onto `abstract_state()`, as (step, (state, data position)), else None (damaged newer steps are
    set aside and named); and the metrics writer, opened after the metrics were trimmed to that
    step, with `warnings` and the damaged steps logged."""
    ckpt = Checkpointer(run_dir, cfg)
    damaged: list[str] = []
    resumed = ckpt.resume(lambda step: ckpt.restore(step, abstract_state()), damaged.append) if existed else None
    start = resumed[0] if resumed else 0
    if existed:
        trim_metrics(run_dir, start)  # before the writer opens the file for appending
    writer = MetricsWriter(run_dir, cfg, start, cfg.train.steps)
    for warning in [*warnings, *damaged]:
        writer.log(f"warning: {warning}")
    return ckpt, resumed, writer


def train(cfg: Config) -> dict:
    """Train (or resume) the run in `cfg.run.dir`; returns the final metrics."""
    cfg = resolve_format(cfg)  # data.format=auto decides the objective and the run's identity
    check_exact_match(cfg)
    run_dir, existed = check_run_dir(cfg)
    # Process 0 decides new-or-resume: another process could look after process 0 wrote config.yaml.
    existed = broadcast_flag(existed)
    if cfg.checkpoint.init_from and not existed:  # before the data is built: a typo should fail fast
        pretrained.check_init_from(cfg)
    mesh = make_mesh(cfg)  # validates mesh and batch against the devices before any slow work
    bundle = build_data(cfg, run_dir)
    vocab = model_vocab_size(cfg, bundle.tokenizer.vocab_size)
    setup = build_setup(cfg, vocab, tokenizer_objective(cfg, bundle.tokenizer, vocab), mesh)
    write_run_config(cfg, run_dir)
    barrier("run_dir")  # the directory exists before any process opens checkpoints in it
    ckpt, resumed, writer = open_checkpoints(cfg, run_dir, existed, setup.abstract_state, setup.warnings)
    writer.log(f"run {run_dir}: {setup.mdef.num_params / 1e6:.2f}M parameters, vocab {vocab}, "
               f"mesh {dict(setup.mesh.shape)}, {jax.device_count()} {jax.devices()[0].platform} devices")

    if bundle.mixture:
        dataset = mixture_dataset(bundle.mixture, cfg.train.seq_len, cfg.train.batch_size, cfg.seed,
                                  jax.process_index(), jax.process_count())
        windows = [e["n_windows"] for e in dataset.order["mixture"]]
        for line in describe_mixture(bundle.mixture, windows, cfg.train.steps * cfg.train.batch_size):
            writer.log(line)
    else:
        dataset = train_dataset(bundle.train_tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.seed,
                                jax.process_index(), jax.process_count())
    data_state: dict = {}  # the data position of the checkpoint resumed from
    if resumed is not None:
        start, (state, data_state) = resumed
        writer.log(f"resumed from checkpoint at step {start} (data position {data_state.get('next_step')})")
        check_data_order(data_state, getattr(dataset, "order", {}))
        start = int(data_state.get("next_step", start))
    else:
        state = init_state(cfg, setup.mdef, setup.mesh, setup.tx, setup.shardings)
        if cfg.checkpoint.init_from:
            state["params"], fresh = pretrained.pretrained_params(cfg, setup.mdef, setup.shardings["params"],
                                                                  state["params"])
            writer.log(f"parameters from {cfg.checkpoint.init_from}"
                       + (f"; newly initialised: {', '.join(fresh)}" if fresh else ""))
            state = start_reference(state, setup.shardings)  # the reference is the model training starts from
        start = 0
    if start >= cfg.train.steps:
        writer.log(f"run already at step {start} >= train.steps={cfg.train.steps}; raise train.steps to go on")

    # Bits per byte is a property of next-token prediction over the text; other objectives score
    # masked positions, spans or task targets, so only their loss per scored token is reported.
    bytes_per_token = bundle.val_bytes_per_token if cfg.objective == "causal" else None
    # The train step never donates the reference (`step.ReferenceStep`): these arrays stay valid.
    ref_params = state.get("ref_params")
    if bundle.mixture:
        sets = [EvalSet(s.name, s.weight, [setup.to_global(b) for b in s.batches], s.bytes_per_token)
                for s in mixture_eval_sets(bundle.mixture, cfg.train.seq_len, cfg.train.batch_size,
                                           cfg.train.eval_batches, jax.process_index(), jax.process_count())]

        def held_out_eval(params: dict) -> dict:
            return evaluate_mixture(setup, params, sets, cfg.objective == "causal", ref_params)
    else:
        held_out = [setup.to_global(b) for b in eval_batches(
            bundle.val_tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.train.eval_batches,
            jax.process_index(), jax.process_count())]

        def held_out_eval(params: dict) -> dict:
            return evaluate(setup, params, held_out, bytes_per_token, ref_params)
    batches = BatchIterator(dataset, start, cfg.train.steps, cfg.data.prefetch, setup.to_global,
                            data_state.get("skipped_batches", ()))
    nonfinite, rollback = nonfinite_handling(cfg, ckpt, setup, batches, writer, data_state)

    exact_match = exact_match_evaluator(cfg, setup, bundle)

    def evaluate_all(params: dict) -> dict:
        result = held_out_eval(params)
        return {**result, **exact_match(params)} if exact_match else result

    def write_eval(record: dict) -> None:
        writer.write(record)
        writer.log(f"step {record['step']}: {describe_eval(record)}")

    peak, _ = peak_flops_total()
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * setup.objective.sequences_per_row
    log = LogMetrics(cfg.train.log_every, cfg.train.steps, writer.write, tokens_per_step,
                     setup.flops_per_token, peak, getattr(dataset, "shares", None))
    evals = Evaluate(cfg.train.eval_every, cfg.train.steps, evaluate_all, write_eval)
    save = SaveCheckpoints(ckpt, cfg, lambda: {**batches.get_state(), **nonfinite.position_fields()}, writer.log)
    advance = ProgressAdvance(writer)
    watchdog = StepTimeout(cfg.train.step_timeout_s)  # last: kicked once a step's hooks are done
    trainer = Trainer(setup.train_step, [advance, log, evals, save, watchdog], nonfinite)
    try:
        state = run_with_rollbacks(trainer, state, batches, rollback)
    finally:
        watchdog.close()  # first: a run that ended (finished, stopped or failed) is never killed later
        save.close()
        batches.close()
        ckpt.close()
        writer.close()
    final = {**log.latest, **evals.latest}
    if trainer.stopped_at is not None:
        final["stopped_at"] = trainer.stopped_at
    if start >= cfg.train.steps and not final:
        final.update(evaluate_all(state["params"]))
    final["params"] = state["params"]
    final["tokenizer"] = bundle.tokenizer
    return final


def print_sample(cfg: Config, result: dict) -> None:
    """Print a sample from the trained model (process 0), the last line of `make train`."""
    if cfg.train.sample_tokens <= 0:
        return
    if family_of(cfg.model.arch).decoding is None:
        if jax.process_index() == 0:
            print(f"(no sample: model.arch={cfg.model.arch} is an encoder, it does not generate text)")
        return
    if cfg.data.task in SYNTHETIC_TASKS:
        if jax.process_index() == 0:
            print(f"(no sample: data.task={cfg.data.task} is a synthetic task whose token ids are not text; "
                  "eval accuracy above is its accuracy on the answer tokens)")
        return
    params = result["params"]
    if is_multiprocess():
        # Parameters are spread over the processes: every process takes part in gathering them,
        # then process 0 samples alone on its own devices.
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() != 0:
        return
    model = Model.from_params(cfg, params, tokenizer=result["tokenizer"])
    if not model.continues_prompt:  # an encoder-decoder: the prompt is the source, the sample its target
        tokens = min(cfg.train.sample_tokens, cfg.train.seq_len)
        text = model.generate(cfg.train.sample_prompt, max_new_tokens=tokens, temperature=0)
        print(f"--- sample (greedy decoding of train.sample_prompt, up to {tokens} tokens) ---")
        print(f"{cfg.train.sample_prompt}\n=> {text}")
        print("---")
        return
    room = cfg.max_seq_len - len(result["tokenizer"].encode(cfg.train.sample_prompt))
    if room < 1:
        print(f"(no sample: train.sample_prompt is longer than the model's {cfg.max_seq_len} positions)")
        return
    tokens = min(cfg.train.sample_tokens, room)
    text = model.generate(cfg.train.sample_prompt, max_new_tokens=tokens, temperature=0.8, top_k=0, top_p=0.95,
                          seed=cfg.seed)
    print(f"--- sample (up to {tokens} tokens, temperature 0.8) ---")
    print(cfg.train.sample_prompt + text)
    print("---")
