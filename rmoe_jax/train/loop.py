"""The training loop: `run(config, workdir)`.

One call trains from the latest complete checkpoint in `<workdir>/checkpoints` (or from scratch)
to `config.train.num_steps`, evaluating, logging and checkpointing on the way:

    <workdir>/config.json          the config of the latest start (also saved in each checkpoint)
    <workdir>/checkpoints/<step>/  Orbax checkpoints (train state, data iterator state, config)
    <workdir>/metrics.jsonl        process 0, line-buffered JSON records: `split` 'train' (every
                                   step's scalars), 'interval' (per log interval: tokens/s and
                                   the per-layer router stats), 'eval' (loss, bits per byte or
                                   perplexity). Records past the restored step are dropped on resume.
    <workdir>/tensorboard/         TensorBoard event files (process 0)

A non-finite loss, gradient norm or parameter raises `NonFiniteLossError`: nothing is saved for
the bad step and the checkpoints already on disk are kept. SIGTERM (preemption) makes the loop
save the current step and return with `metrics['stopped'] == 'preempted'`. Running the same
config on the same workdir again resumes: the train state, the data iterator position and the
per-step dropout keys (derived from the step) continue exactly, so the losses are bitwise
those of an uninterrupted run on the same hardware.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from rmoe_jax import config as config_lib
from rmoe_jax import parallel
from rmoe_jax.checkpoint import CHECKPOINT_DIR, CheckpointError, Checkpointer
from rmoe_jax.train import state as state_lib
from rmoe_jax.train.metrics import MetricsWriter
from rmoe_jax.train.experiment import build_experiment
from rmoe_jax.train.optim import count_frozen
from rmoe_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError
from rmoe_jax.train.step import eval_sums, finish_eval

DAMAGED_DIR = "checkpoints_damaged"  # damaged steps are moved here (kept for inspection)
SUPERSEDED_DIR = "checkpoints_superseded"  # steps after an explicit train.resume_step


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient norm or the parameters became NaN/inf; training stopped."""


# -- set-up helpers -------------------------------------------------------------------------------

def setup_compilation_cache(cache_dir: str) -> None:
    """Turn on JAX's persistent compilation cache in `cache_dir` ('' leaves it off)."""
    if not cache_dir:
        return
    path = os.path.expanduser(cache_dir)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _data_module():
    from rmoe_jax import data as data_lib  # imported late: the data package is heavy (TFDS)

    return data_lib


def tokenizer_vocab_size(data_config: ml_collections.ConfigDict) -> int:
    """The vocabulary size of the data's tokenizer (loads only a tokenizer model, no data)."""
    return int(_data_module().dataset_info(data_config).vocab_size)


def validate_all(config: ml_collections.ConfigDict, *, check_vocab: bool = True) -> None:
    """`rmoe_jax.config.validate` plus the checks that need the data (tokenizer vocab) or the
    runtime (processes, devices); every problem reported in one `ConfigError`."""
    problems = config_lib.problems(config)
    train = config.train
    processes = jax.process_count()
    if train.batch_size > 0 and train.grad_accum_steps > 0:
        if train.batch_size % (processes * train.grad_accum_steps):
            problems.append(f"train.batch_size: {train.batch_size} is not divisible by "
                            f"process_count * grad_accum_steps = {processes} * {train.grad_accum_steps}")
    eval_batch = config_lib.eval_batch_size(train)
    if eval_batch > 0 and eval_batch % processes:
        problems.append(f"train.eval_batch_size: {eval_batch} is not divisible by process_count={processes}")
    if not problems:
        try:
            mesh = state_lib.make_mesh(config.mesh)
        except ValueError as e:
            problems.append(str(e))
        else:
            problems += parallel.fit_problems(mesh, num_experts=config.model.moe.num_experts,
                                              global_batch=train.batch_size,
                                              micro_batches=train.grad_accum_steps)
            batch_shards = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
            if eval_batch % batch_shards:
                problems.append(f"train.eval_batch_size: {eval_batch} is not divisible by the batch "
                                f"shards data*fsdp*expert={batch_shards}")
    if check_vocab and not problems:
        try:
            vocab = tokenizer_vocab_size(config.data)
        except Exception as e:  # a missing tokenizer file etc.: report it with the rest
            problems.append(f"data.tokenizer: cannot load the tokenizer ({type(e).__name__}: {e})")
            vocab = None
        if vocab is not None and vocab > config.model.vocab_size:
            problems.append(f"model.vocab_size: {config.model.vocab_size} is smaller than the "
                            f"tokenizer's vocabulary ({vocab}) of data.tokenizer={config.data.tokenizer!r}")
    if problems:
        raise config_lib.ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _config_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _diff(saved: Any, current: Any, prefix: str) -> list[str]:
    """'field: checkpoint has X, config has Y' for every field of `saved` that `current` changes
    (fields the saved config does not have, e.g. added to the schema later, are skipped)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(saved):
            out += _diff(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    if isinstance(saved, list):
        saved = tuple(saved)
    if isinstance(current, list):
        current = tuple(current)
    return [] if saved == current else [f"{prefix}: checkpoint has {saved!r}, config has {current!r}"]


# Model fields that change how the step is computed, not the function it computes: a resumed run
# may change them freely (e.g. another remat policy on other hardware).
EXECUTION_FIELDS = ("model.remat_policy", "model.attention_chunk", "model.scan_unroll", "model.dtype",
                    "model.moe.exchange_factor")
# Train fields that define the learning-rate schedule (num_steps only matters for cosine).
SCHEDULE_FIELDS = ("train.schedule", "train.learning_rate", "train.warmup_steps",
                   "train.final_learning_rate")


def check_resumable(saved: dict, current: dict, step: int) -> None:
    """Refuse a resume whose model or learning-rate schedule differs from the checkpoint's,
    naming every differing field, unless train.allow_model_change / allow_schedule_change."""
    model = [d for d in _diff(saved.get("model", {}), current["model"], "model")
             if not d.startswith(tuple(f + ":" for f in EXECUTION_FIELDS))]
    schedule_fields = SCHEDULE_FIELDS + (("train.num_steps",) if current["train"]["schedule"] == "cosine"
                                         or saved.get("train", {}).get("schedule") == "cosine" else ())
    schedule = [d for d in _diff(saved.get("train", {}), current["train"], "train")
                if d.startswith(tuple(f + ":" for f in schedule_fields))]
    problems = []
    if model and not current["train"].get("allow_model_change", False):
        problems.append("the model differs from the one trained so far (set "
                        "--config.train.allow_model_change=True to resume anyway):\n  " + "\n  ".join(model))
    if schedule and not current["train"].get("allow_schedule_change", False):
        problems.append("the learning-rate schedule differs (with cosine, num_steps sets the decay: "
                        "extending it jumps the learning rate; set "
                        "--config.train.allow_schedule_change=True to resume anyway):\n  " + "\n  ".join(schedule))
    if problems:
        raise config_lib.ConfigError(f"cannot resume from the checkpoint at step {step}: "
                                     + "\n".join(problems))


def _restore_failure(ckpt: Checkpointer, step: int, saved: dict, current: dict, error: Exception) -> str:
    mismatch = _diff(saved.get("model", {}), current["model"], "model")
    if mismatch:
        return (f"cannot restore the checkpoint at step {step} in {ckpt.directory} into this model "
                f"({type(error).__name__}). It was trained with a different model:\n  " + "\n  ".join(mismatch))
    earlier = [s for s in ckpt.all_steps() if s < step]
    return (f"cannot restore the checkpoint at step {step} in {ckpt.directory} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300] if str(error) else ''}); the model config matches, so "
            "the files are likely damaged"
            + (f": resume from an earlier step with --config.train.resume_step={earlier[-1]}" if earlier else ""))


class _Preemption:
    """Catches SIGTERM (only in the main thread) and records that it came."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))


def _summary(stats: dict) -> str:
    """One line of the per-layer routing statistics."""
    parts = []
    load = stats.get("stats/expert_load")
    if load is not None and np.ndim(load) == 2:
        e = load.shape[-1]
        parts.append("max_load*E " + " ".join(f"{x:.2f}" for x in np.max(load, -1) * e / np.maximum(np.sum(load, -1), 1e-9)))
    drop = stats.get("stats/dropped_fraction")
    if drop is not None and np.ndim(drop) == 1:
        parts.append("drop " + " ".join(f"{x:.3f}" for x in drop))
    return " | ".join(parts)


# -- the loop -------------------------------------------------------------------------------------

@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from `workdir` if it holds a checkpoint); returns the final metrics.

    Returned keys: step, stopped ('completed' | 'preempted'), checkpoint_step, train_loss (last
    step), train_loss_avg (mean over the last log interval), tokens_per_sec, and, when
    evaluation ran, eval_loss plus eval_bits_per_byte (byte tokenizer) or eval_perplexity, and
    initial_eval_loss for a run that started from scratch.

    Raises:
      ConfigError: the config is invalid, or the workdir's checkpoint has a different model.
      NonFiniteLossError: the loss, gradient norm or parameters became NaN/inf.
    """
    config = ml_collections.ConfigDict(config.to_dict())  # our own, unlocked copy
    validate_all(config)  # bad values first, every field in one message
    # Then the data, before any work: a data dir that is a file or cannot be written, a missing
    # or damaged raw file fail here, before the workdir is created or anything compiled.
    _data_module().prepare_dataset(config.data, progress=jax.process_index() == 0)
    mesh = state_lib.make_mesh(config.mesh)
    rules = parallel.rules_from_config(config.mesh)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    # One run per workdir (process 0 holds the lock for all processes of a multi-host run).
    lock = (WorkdirLock(workdir, log=lambda m: print(m, flush=True)) if jax.process_index() == 0
            else contextlib.nullcontext())
    # The mesh and the logical-axis rules must be active while the steps are traced: the model
    # constrains activations by logical names and routes tokens to expert shards under them.
    try:
        with lock, _Preemption() as preemption, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return _run(config, workdir, preemption, mesh, rules)
    except (WorkdirLockedError, CheckpointError) as e:
        raise config_lib.ConfigError(str(e)) from e


def _run(config: ml_collections.ConfigDict, workdir: str, preemption: _Preemption, mesh, rules) -> dict:
    train_cfg, data_cfg = config.train, config.data
    setup_compilation_cache(train_cfg.get("compilation_cache_dir",
                                          config_lib.train_config().compilation_cache_dir))
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    processes, process_index = jax.process_count(), jax.process_index()

    from rmoe_jax.model import build_model, count_params

    seq_len = int(data_cfg.seq_len)
    experiment = build_experiment(config, mesh)
    frozen = experiment.frozen
    batch_sh = experiment.batch_sharding

    # -- state: restore or init ------------------------------------------------------------------
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep=int(train_cfg.keep_checkpoints),
                        async_save=bool(train_cfg.get("async_checkpoints", True)))
    try:
        config_json = _config_dict(config)
        data_state = None
        requested = int(train_cfg.get("resume_step", -1))
        latest = ckpt.choose_step(None if requested < 0 else requested,
                                  damaged_dir=epath.Path(workdir) / DAMAGED_DIR,
                                  superseded_dir=epath.Path(workdir) / SUPERSEDED_DIR,
                                  log=lambda message: print(message, flush=True))
        if latest is not None:
            saved = ckpt.restore_config(latest)
            check_resumable(saved, config_json, latest)
            try:
                restored = ckpt.restore(latest, experiment.restore_target)
            except Exception as e:
                raise config_lib.ConfigError(_restore_failure(ckpt, latest, saved, config_json, e)) from e
            if not bool(_all_finite(restored.state.params)):
                raise config_lib.ConfigError(
                    f"the checkpoint at step {latest} in {ckpt.directory} holds non-finite parameters; "
                    f"resume from an earlier one with --config.train.resume_step=STEP (complete "
                    f"steps: {', '.join(map(str, ckpt.all_steps()))})")
            state, data_state = restored.state, restored.data_state
        else:
            state = experiment.init_state()
        start_step = int(jax.device_get(state.step))

        # -- data --------------------------------------------------------------------------------
        data_lib = _data_module()
        train_iter = data_lib.make_train_iterator(
            data_cfg, batch_size=train_cfg.batch_size // processes, seed=int(train_cfg.seed),
            process_index=process_index, process_count=processes)
        if data_state is not None:
            try:
                train_iter.set_state(data_state)
            except ValueError as e:
                raise config_lib.ConfigError(f"cannot resume the data iterator of step {latest}: {e}") from e
    except BaseException:
        ckpt.close()
        raise
    eval_batch = config_lib.eval_batch_size(train_cfg) // processes
    byte_level = data_cfg.tokenizer == "byte"

    # -- compiled steps ----------------------------------------------------------------------------
    moe_cfg = config.model.moe
    rerun_overflow = (moe_cfg.dispatch == "dropless" and moe_cfg.get("exchange_factor", 0.0) > 0
                      and moe_cfg.get("exchange_overflow", "rerun") == "rerun")

    step_fn = experiment.train_step(keep_state_on_exchange_overflow=rerun_overflow)
    exact_step_fn = None  # worst-case exchange blocks, compiled on the first overflow
    eval_fn = experiment.eval_step()

    def to_global(batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v)) for k, v in batch.items()}

    def evaluate(params) -> dict:
        batches = data_lib.make_eval_batches(data_cfg, split=data_cfg.eval_split, batch_size=eval_batch,
                                             process_index=process_index, process_count=processes,
                                             max_batches=int(train_cfg.eval_batches))
        return finish_eval(eval_sums(eval_fn, params, map(to_global, batches),
                                     split=data_cfg.eval_split), byte_level=byte_level)

    # -- logging -----------------------------------------------------------------------------------
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step if latest is not None else -1)
    num_steps = int(train_cfg.num_steps)
    tokens_per_step = train_cfg.batch_size * seq_len
    final: dict[str, Any] = {"step": start_step, "stopped": "completed"}
    bar = None
    if is_main:
        from tqdm import tqdm

        # A live bar on a terminal; when piped (logs, tests) only the log lines are printed.
        bar = tqdm(total=num_steps, initial=start_step, file=sys.stdout, dynamic_ncols=True,
                   mininterval=1.0, disable=not sys.stdout.isatty(), desc="train")
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)

    def note(message: str) -> None:
        if bar is not None:
            bar.write(message, file=sys.stdout)
            sys.stdout.flush()

    if latest is not None:
        note(f"resumed from {ckpt.directory}/{latest}")
    else:
        try:
            counts = count_params(config.model)
            note("params: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
                 + f"; frozen {count_frozen(frozen, experiment.abstract_state.params):,}")
        except Exception:  # informative only
            pass

    def run_eval(step: int) -> None:
        t0 = time.time()
        result = evaluate(state.params)
        writer.write_record({"split": "eval", "step": step, **result})
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        writer.flush()
        extra = f"bpb {result['bits_per_byte']:.4f}" if byte_level else f"ppl {result['perplexity']:.3f}"
        note(f"step {step}: eval loss {result['loss']:.4f} {extra} ({time.time() - t0:.1f}s)")
        final.update({f"eval_{k}": v for k, v in result.items() if k != "tokens"})
        if step == 0:
            final["initial_eval_loss"] = result["loss"]

    def stop_non_finite(what: str) -> None:
        ckpt.wait()
        good = ckpt.latest_step()
        raise NonFiniteLossError(
            f"{what}; training stopped without saving this step. Last good checkpoint: "
            + (f"step {good} in {ckpt.directory}" if good is not None else "none")
            + ". If the data is sound, resume with a lower train.learning_rate "
            "(and --config.train.allow_schedule_change=True).")

    def save(step: int) -> None:
        if not bool(_all_finite(state.params)):
            stop_non_finite(f"non-finite parameters after step {step}")
        if ckpt.save(step, state, data_state=train_iter.get_state(), config=config_json):
            note(f"step {step}: saving checkpoint")

    def log_interval(step: int, interval: list[dict], timed_steps: int, seconds: float) -> None:
        means = {k: np.mean([m[k] for m in interval], axis=0) for k in interval[0]}
        tok_s = tokens_per_step * timed_steps / seconds if timed_steps and seconds > 0 else float("nan")
        scalars = {f"train/{k}": float(v) for k, v in means.items() if np.ndim(v) == 0 and k != "tokens"}
        scalars["train/tokens_per_sec"] = tok_s
        stats = {k[len("stats/"):]: v for k, v in means.items() if k.startswith("stats/")}
        writer.write_scalars(step, scalars)
        writer.write_moe_stats(step, stats)
        writer.write_record({"split": "interval", "step": step, "steps": len(interval),
                             "tokens_per_sec": tok_s, **{f"stats/{k}": v for k, v in stats.items()}})
        writer.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['learning_rate']:.2e}",
                            tok_s=f"{tok_s:,.0f}", refresh=False)
        note(f"step {step}: loss {means['loss']:.4f} ce {means['ce_loss']:.4f} "
             f"aux {means.get('aux_loss', 0.0):.4f} lr {means['learning_rate']:.3e} "
             f"gnorm {means['grad_norm']:.3f} tok/s {tok_s:,.0f} | {_summary(means)}")
        final.update(train_loss_avg=float(means["loss"]), tokens_per_sec=tok_s)

    # -- train -------------------------------------------------------------------------------------
    interval: list[dict] = []
    interval_time, timed_steps = 0.0, 0  # the first step of a run (compilation) is not timed
    try:
        if start_step == 0 and train_cfg.eval_every > 0 and train_cfg.get("eval_at_start", True):
            run_eval(0)
        step = start_step
        while step < num_steps:
            t0 = time.time()
            batch = to_global(next(train_iter))
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)
            if rerun_overflow and float(metrics["exchange_overflow"]) > 0:
                # The bounded blocks overflowed and the step kept the old state: run the same
                # batch with worst-case blocks, so dropless stays exact.
                note(f"step {step + 1}: {int(metrics['exchange_overflow']):,} rows overflowed the "
                     f"expert exchange blocks (moe.exchange_factor={moe_cfg.exchange_factor}); "
                     "re-running the step with worst-case blocks")
                if exact_step_fn is None:
                    exact_config = ml_collections.ConfigDict(config.model.to_dict())
                    exact_config.moe.exchange_factor = 0.0
                    exact_step_fn = experiment.train_step(model=build_model(exact_config))
                state, metrics = exact_step_fn(state, batch)
                metrics = jax.device_get(metrics)
            if step > start_step:
                interval_time += time.time() - t0
                timed_steps += 1
            step += 1
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                stop_non_finite(f"non-finite loss at step {step} (loss={loss}, grad_norm={grad_norm})")
            writer.write_record({"split": "train", "step": step,
                                 **{k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}})
            final.update(step=step, train_loss=loss)
            interval.append(metrics)
            if bar is not None:
                bar.update(1)
            if step % train_cfg.log_every == 0 or step == num_steps:
                log_interval(step, interval, timed_steps, interval_time)
                interval, interval_time, timed_steps = [], 0.0, 0
            if preemption.should_stop():  # before eval: the grace period is short
                note(f"step {step}: SIGTERM received; saving a checkpoint and stopping")
                save(step)
                final["stopped"] = "preempted"
                break
            if train_cfg.eval_every > 0 and (step % train_cfg.eval_every == 0 or step == num_steps):
                run_eval(step)
            if step % train_cfg.checkpoint_every == 0 or step == num_steps:
                save(step)
        ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    final["checkpoint_step"] = ckpt.latest_step()
    return final
