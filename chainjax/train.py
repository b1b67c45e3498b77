"""`train_and_evaluate(config, workdir)`: the training loop of every chainjax experiment.

The parts of a run (task, chain, loss, phases with their optimizers and jitted steps,
train state and shardings) come from `experiment.Experiment`; this module is the loop
over them: resume (the saved config checked first), then per update train, log, eval,
early stop, checkpoint, and the final metrics. The train step adds its metrics into
running sums on device; the host reads them once per log and eval interval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from chainjax import chain as chain_lib
from chainjax import checkpoint as checkpoint_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import experiment as experiment_lib
from chainjax import metrics as metrics_lib
from chainjax import optim as optim_lib
from chainjax import precision
from chainjax import preemption as preemption_lib
from chainjax.compress import prune as prune_lib
from chainjax.errors import DivergedError, NonFiniteLossError, WorkdirError
from chainjax.experiment import TrainState

# --------------------------------------------------------------------------------------------
# Early stopping.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EarlyStopping:
  """Stops after `patience` evals without an improvement of `metric` by more than `min_delta`."""

  metric: str
  mode: str = "max"
  patience: int = 3
  min_delta: float = 0.0
  best: float | None = None
  best_step: int = 0
  bad_evals: int = 0

  def update(self, step: int, metrics: dict[str, float]) -> bool:
    """Records one eval; returns True when training should stop."""
    if not self.metric:
      return False
    if self.metric not in metrics:
      raise KeyError(f"config.early_stopping.metric: {self.metric!r} is not an eval metric; "
                     f"available: {', '.join(sorted(metrics))}")
    value = metrics[self.metric]
    if not math.isfinite(value):  # e.g. the AUC of an eval set with one class: no evidence either way
      logging.warning("Early stopping skips this eval: %s is %s.", self.metric, value)
      return False
    sign = 1.0 if self.mode == "max" else -1.0
    if self.best is None or sign * (value - self.best) > self.min_delta:
      self.best, self.best_step, self.bad_evals = value, step, 0
      return False
    self.bad_evals += 1
    return self.bad_evals >= self.patience

  def to_json(self) -> dict:
    return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def _restore_input_position(train_iter, checkpointer: checkpoint_lib.Checkpointer, step: int) -> None:
  """Moves the training input to where the checkpoint of `step` left it.

  Normally from the iterator state saved with the checkpoint. A checkpoint without
  one for this process (older runs, a different process count) positions the input
  by step, which is exact too: every pipeline's order is a function of the step.
  """
  saved = checkpointer.restore_data_state(step)
  if saved is None:
    logging.info("No input state saved for this process at step %d; positioning the input by step.", step)
    saved = data_lib.base.iterator_state_at(train_iter, step)
  train_iter.set_state(saved)


def _check_finite(state: TrainState) -> None:
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    raise NonFiniteLossError(f"the loss or its gradient became NaN/inf at train step {bad}; the run stopped "
                             "without checkpointing it (lower optim.learning_rate or set optim.grad_clip_norm)")


def _check_divergence(config: ml_collections.ConfigDict, step: int, loss: float, reference: float | None) -> None:
  """Raises `DivergedError` when `loss` exceeds `config.divergence_factor` times `reference`."""
  if config.divergence_factor and reference and reference > 0 and loss > config.divergence_factor * reference:
    raise DivergedError(
        f"the loss diverged at train step {step}: {loss:.4g} is more than config.divergence_factor="
        f"{config.divergence_factor:g} times its first logged value {reference:.4g}; the run stopped without "
        "checkpointing it (lower optim.learning_rate or set optim.grad_clip_norm; divergence_factor=0 turns "
        "this check off)")


# Fields that may differ between a run and its resumption: how often things happen, the length, where
# the data is read from and how, the divergence check (which its own message tells users to turn off),
# and profiling (which traces the updates without changing them).
RESUMABLE_CHANGES = ("eval_every", "log_every", "checkpoint_every", "max_to_keep", "total_steps", "num_epochs",
                     "eval_batch_size", "divergence_factor", "data.data_dir", "data.num_threads", "data.prefetch",
                     "data.cache", "profile_steps",
                     # read only by --mode=export/serve/early_exit_report/diagnose, never by training
                     "inference.exit_threshold", "inference.stage_exit_threshold", "inference.report_thresholds",
                     "diagnostics.modes", "diagnostics.num_batches", "diagnostics.batch_size", "diagnostics.step")


def config_record(config: ml_collections.ConfigDict) -> tuple[dict, str]:
  """(the config as plain JSON data, its SHA-256): what every checkpoint stores about its run."""
  data = json.loads(config.to_json_best_effort(sort_keys=True))
  return data, hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """`{field: (saved value, new value)}` for every field of `config` that differs from `saved`.

  A field the saved config lacks (added to chainjax after the checkpoint) counts only when its value
  is not the default.
  """
  old, new = _flat(saved), _flat(config_record(config)[0])
  defaults = _flat(config_record(config_lib.base_config())[0])
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k) and not (k not in old and k in defaults and new.get(k) == defaults[k])}


def _check_resume(config: ml_collections.ConfigDict, saved: tuple[int, dict] | None, allow_change: bool,
                  directory: str) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the one the newest checkpoint was saved with; returns the changes to record.

  A longer run (`total_steps` up, also after the run finished) is logged and trains on, with
  schedules over the new length; `RESUMABLE_CHANGES` may change freely. Any other difference is a
  `ConfigError` naming the fields, unless `allow_change` (then it is logged, and recorded in every
  later checkpoint). Raised before anything is written to the workdir.
  """
  if saved is None:
    return {}
  step, meta = saved
  if config.total_steps < step or (config.total_steps == step and not meta.get("finished")):
    raise config_lib.ConfigError(
        "total_steps", f"{config.total_steps} is not above step {step}, where the newest checkpoint in "
        f"{directory} was saved; give a larger total_steps, or a new --workdir")
  if "config" not in meta:
    logging.info("The checkpoint at step %d stores no config (an older chainjax): not compared.", step)
    return {}
  changes = config_changes(meta["config"], config)
  if "total_steps" in changes:
    logging.info("total_steps changed from %s to %s: training on from step %d, with schedules over %s updates.",
                 *changes["total_steps"], step, config.total_steps)
  others = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
  if chain_lib.get_mode(config.chain.mode).stagewise and "total_steps" in changes:  # phase boundaries would move
    others["total_steps"] = changes["total_steps"]
  if others and not allow_change:
    listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(others.items())[:6])
    more = f" and {len(others) - 6} more" if len(others) > 6 else ""
    raise config_lib.ConfigError(
        next(iter(others)), f"differs from the config of the checkpoint at step {step} in {directory}: {listed}"
        f"{more}; resume with the same config, use a new --workdir, or pass --allow_config_change")
  if others:
    logging.warning("--allow_config_change: resuming step %d with changed fields: %s", step,
                    ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in others.items()))
  return others


@dataclasses.dataclass
class LoopState:
  """What the loop carries between updates besides the train state (and saves with each checkpoint)."""

  step: int
  stopper: EarlyStopping
  final_metrics: dict[str, float]
  reference_loss: float | None  # the first logged train loss of the current phase (divergence check)
  phase_skipped_base: int  # steps the dynamic loss scale skipped before the current phase
  config_history: list[dict]
  checked_step: int = -1  # the last step whose state passed the finite check

  def check_finite(self, state: TrainState) -> None:
    """One finite check per step, however many of log, eval and checkpoint fall on it."""
    if self.checked_step != self.step:
      _check_finite(state)
      self.checked_step = self.step


class TrainClock:
  """Seconds spent in train steps only: eval, checkpoints and compiling are not counted.

  `start()` before a stretch of train steps; `stop(outputs)` waits for `outputs` (the last
  step's) and adds the stretch. A step that compiles is excluded by the caller (`skip`).
  """

  def __init__(self):
    self.seconds, self.steps, self._t0 = 0.0, 0, None

  def start(self) -> None:
    if self._t0 is None:
      self._t0 = time.perf_counter()

  def stop(self, outputs: Any) -> None:
    if self._t0 is not None:
      jax.block_until_ready(outputs)
      self.seconds += time.perf_counter() - self._t0
      self._t0 = None

  def reset(self) -> None:
    self.seconds, self.steps, self._t0 = 0.0, 0, None


class StepProfiler:
  """A `jax.profiler` trace of the updates `config.profile_steps` names, for TensorBoard's Profile tab.

  Updates are numbered as the loop logs them: update k is the one after which `step == k`, so
  "3:6" traces updates 3, 4 and 5, each annotated as step k of "train" (the Profile tab groups
  the trace by these). The trace goes to `log_dir` (the run's TensorBoard directory), where
  `jax.profiler` writes `plugins/profile/<run>/<host>.xplane.pb`. Only `enabled` (process 0)
  traces. A window already behind the first update of the run (a resumed run) traces nothing.
  Used as a context manager around the loop: leaving it stops a trace still running (the run
  ended or raised before END), so a failed run still leaves its trace and the profiler free.
  """

  def __init__(self, spec: str, log_dir: str, *, enabled: bool):
    self.spec, self.log_dir = spec, log_dir
    self.window = config_lib.parse_profile_steps(spec) if enabled else None
    self.active = False
    self.first = self.last = 0  # the first and the last traced update
    self._outputs: Any = None  # the last traced update's results, waited for before the trace stops
    self._before: set[str] = set()

  def due(self, update: int) -> bool:
    """Whether the trace should start before `update` (the number the next update will have)."""
    return bool(self.window) and not self.active and self.window[0] <= update < self.window[1]

  def start(self, update: int) -> None:
    self._before = set(self._trace_files())
    jax.profiler.start_trace(self.log_dir)
    self.active, self.first, self.last = True, update, update - 1
    logging.info("Profiling updates %d..%d (config.profile_steps=%r) into %s.", update, self.window[1] - 1,
                 self.spec, self.log_dir)

  def step(self, update: int):
    """The context of one update: a step annotation while tracing, nothing otherwise."""
    if not self.active:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=update)

  def traced(self, update: int, outputs: Any) -> bool:
    """Records that `update` ran with `outputs`; True when it was the window's last (then call `stop`)."""
    if not self.active:
      return False
    self.last, self._outputs = update, outputs
    return update >= self.window[1] - 1

  def stop(self) -> None:
    """Waits for the last traced update's results on device, then writes the trace."""
    if not self.active:
      return
    try:  # an update that raised may have consumed the donated state: wait for what is still there
      jax.block_until_ready([x for x in jax.tree.leaves(self._outputs)
                             if not (isinstance(x, jax.Array) and x.is_deleted())])
    finally:
      self.active, self._outputs = False, None
      jax.profiler.stop_trace()
    written = sorted(set(self._trace_files()) - self._before)
    updates = f"updates {self.first}..{self.last}" if self.last >= self.first else "no complete update"
    logging.info("Profile of %s written to %s; open it with `tensorboard --logdir %s` (Profile tab).", updates,
                 ", ".join(written) or os.path.join(self.log_dir, "plugins", "profile"), self.log_dir)

  def _trace_files(self) -> list[str]:
    root = epath.Path(self.log_dir) / "plugins" / "profile"
    return [str(p) for p in root.glob("*/*.xplane.pb")] if root.exists() else []

  def __enter__(self) -> StepProfiler:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.stop()
    else:  # a run that raised: still write the trace, without masking the error
      with contextlib.suppress(Exception):
        self.stop()


def _stopper(config: ml_collections.ConfigDict, saved: dict | None = None) -> EarlyStopping:
  """Early stopping as `config.early_stopping` says, continuing from a checkpoint's `saved` state."""
  return EarlyStopping(config.early_stopping.metric, config.early_stopping.mode, config.early_stopping.patience,
                       config.early_stopping.min_delta, **(saved or {}))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       heartbeat: Callable[[], None] = lambda: None,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest good checkpoint); returns final metrics.

  `heartbeat()` is called whenever a train step or an eval batch completes (a watchdog's
  sign of life). Raises `config.ConfigError` (before anything is written) for a bad config
  or dataset, and for a config that differs from the checkpoint's (see `_check_resume`;
  `allow_config_change` accepts the difference).
  """
  started = time.perf_counter()
  exp = experiment_lib.Experiment(config, workdir=workdir)
  config, task = exp.config, exp.task
  is_main = jax.process_index() == 0
  shard = data_lib.Shard.of_this_process()
  train_iter = task.train_iterator(config.batch_size, shard)

  # Checkpoint restore (the saved config checked first), then the workdir and writers.
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, max_to_keep=config.max_to_keep)
  try:
    saved = checkpointer.latest_metadata()
    changes = _check_resume(config, saved, allow_config_change, checkpoint_dir)
    restored = exp.restore(checkpointer)
    if restored is not None and saved is not None and restored[0] != saved[0]:  # fell back to an older step
      changes = _check_resume(config, (restored[0], restored[2]), allow_config_change, checkpoint_dir)
    # A fresh start: parameters from the seed, or from compress.init_from (only here; a resumed run never reads it).
    initial = exp.init_state() if restored is None else None
  except BaseException:
    checkpointer.close()
    raise
  meta: dict[str, Any] = {}
  if restored is not None:
    restored_step, state, meta = restored
    logging.info("Resumed from %s at step %d.", checkpoint_dir, restored_step)
    longer = config.total_steps > meta.get("config", {}).get("total_steps", config.total_steps)
    if meta.get("finished") and not longer:  # a finished run trains on only when asked for more steps
      logging.info("This run already finished at step %d; final metrics: %s", restored_step,
                   json.dumps(meta["final_metrics"]))
      checkpointer.close()
      return meta["final_metrics"]
  else:
    restored_step, state = 0, initial
  config_json, config_hash = config_record(config)
  loop = LoopState(
      step=int(jax.device_get(state.step)),
      stopper=_stopper(config, meta.get("early_stopping", {})),
      final_metrics=dict(meta.get("final_metrics") or {}),
      reference_loss=meta.get("reference_loss"),
      phase_skipped_base=meta.get("phase_skipped_base", 0),
      config_history=list(meta.get("config_changes", [])))
  if changes:
    loop.config_history.append({"step": restored_step, "changes": {k: list(v) for k, v in changes.items()}})
  if is_main:  # epath: the workdir may be local or gs://
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
      task.save(workdir)
    except OSError as e:
      checkpointer.close()
      raise WorkdirError(f"--workdir={workdir}: cannot write {e.filename or workdir}: "
                         f"{e.strerror or type(e).__name__}") from None
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  if restored is not None:
    writer.resume(restored_step)  # metrics.jsonl and TensorBoard: steps <= restored_step, each once
    _restore_input_position(train_iter, checkpointer, restored_step)
  else:
    writer.resume(None)  # fresh start: an old run's metrics.jsonl and event files are moved aside

  def save(state: TrainState, finished: bool) -> None:
    checkpointer.save(loop.step, state.to_dict(), {
        "early_stopping": loop.stopper.to_json(), "finished": finished,
        "final_metrics": loop.final_metrics if finished else None, "reference_loss": loop.reference_loss,
        "config": config_json, "config_hash": config_hash, "config_changes": loop.config_history,
        "phase_skipped_base": loop.phase_skipped_base}, data_state=train_iter.get_state())

  pruned = any(prune_lib.stage_targets(config.compress.prune, exp.stage_names).values())
  sparsity_of = jax.jit(prune_lib.stage_sparsity, out_shardings=exp.replicated)  # train/sparsity/<stage>
  progress = metrics_lib.ProgressBar(config.total_steps, loop.step, enabled=is_main)
  clock = TrainClock()
  compiled: set[tuple[int, bool]] = set()  # (phase index, quantized): a float twin compiles on its own
  phase = exp.phase_at(loop.step) if loop.step < config.total_steps else exp.phases[-1]
  sums = phase.zero_sums()
  stop = preempted = False
  epoch_start = time.perf_counter()
  profiler = StepProfiler(config.profile_steps, os.path.join(workdir, "tensorboard"), enabled=is_main)
  if profiler.window and (config.total_steps < profiler.window[0] or profiler.window[1] <= loop.step + 1):
    logging.info("config.profile_steps=%r: no trace, the run trains updates %d..%d.", config.profile_steps,
                 loop.step + 1, config.total_steps)
  try:
    with jax.set_mesh(exp.mesh), preemption_lib.Preemption(loop.step) as preemption, profiler:
      while loop.step < config.total_steps and not (stop or preempted):
        if profiler.due(loop.step + 1):
          clock.stop(state.step)  # starting a trace is not training time
          profiler.start(loop.step + 1)
        new_phase = exp.phase_at(loop.step)
        if new_phase.index > 0 and loop.step == new_phase.start:  # a fresh optimizer; the loss scale carries on
          clock.stop(state.step)  # entering a phase compiles: not training time
          state = exp.enter_phase(state, new_phase)
          loop.phase_skipped_base = int(jax.device_get(precision.skipped_steps(state.opt_state)))
          loop.reference_loss = None  # each phase trains another loss: divergence is measured within it
        if loop.step == exp.qat_start > 0:  # the float model's evals set no bar for the quantized one
          logging.info("Quantization-aware training from update %d on (compress.qat.start_step); early stopping "
                       "and the divergence check start over.", loop.step)
          loop.stopper = _stopper(config)
          loop.reference_loss = None
        phase = new_phase
        first_call = (phase.index, phase.quantized) not in compiled
        if first_call:  # compiling is not training time
          clock.stop(state.step)
          compiled.add((phase.index, phase.quantized))
        else:
          clock.start()
        with profiler.step(loop.step + 1):
          state, sums, step_metrics = exp.update(phase, state, sums, next(train_iter))
        if first_call:
          jax.block_until_ready(step_metrics)
          if len(compiled) == 1:  # time to first step, cold or from the persistent compilation cache
            logging.info("First update done %.1f s after start (building, restoring and compiling included).",
                         time.perf_counter() - started)
        else:
          clock.steps += 1
        heartbeat()
        checkpointer.raise_if_save_failed()  # a failed background save stops the run now (no host sync)
        loop.step += 1
        step = loop.step
        last = step == config.total_steps
        if profiler.traced(step, (state, step_metrics)):
          clock.stop(step_metrics)  # writing the trace is not training time
          profiler.stop()

        if step % config.log_every == 0 or last:
          clock.stop(step_metrics)
          loop.check_finite(state)
          loss = float(jax.device_get(step_metrics["loss"]))
          _check_divergence(config, step, loss, loop.reference_loss)
          loop.reference_loss = loss if loop.reference_loss is None else loop.reference_loss
          progress.update(step, loss)

        if step % config.eval_every == 0 or last:
          clock.stop(step_metrics)
          loop.check_finite(state)
          train_metrics = metrics_lib.mean_of_sums(jax.device_get(sums))
          record = experiment_lib.with_headline(train_metrics, "train", exp.num_stages)
          sums = phase.zero_sums()
          # The LR of the last applied update (0-based within its phase): steps skipped by the dynamic
          # loss scale do not advance the schedule.
          skipped = int(jax.device_get(precision.skipped_steps(state.opt_state))) - loop.phase_skipped_base
          last_update = max(step - 1 - phase.start - skipped, 0)
          record.update(optim_lib.stage_learning_rates(phase.schedules, last_update, state.opt_state))
          if pruned:
            record.update({k: float(v) for k, v in jax.device_get(sparsity_of(state.params)).items()})
          if clock.steps and clock.seconds > 0:
            record["train/steps_per_sec"] = clock.steps / clock.seconds
            record["train/examples_per_sec"] = clock.steps * config.batch_size / clock.seconds
          clock.reset()
          record.update(exp.evaluate(state, task.eval_iterator(config.eval_batch_size, shard), phase,
                                     heartbeat=heartbeat))
          if optim_lib.uses_plateau(config.optim):  # reduce-on-plateau: the scale lives in the opt state
            state = state._replace(opt_state=jax.device_put(
                optim_lib.report_eval_metric(state.opt_state, record[config.optim.plateau_metric]),
                exp.state_shardings.opt_state))
          stop = loop.stopper.update(step, record) and step > exp.qat_start  # never before QAT has trained
          if (stop or last) and hasattr(task, "test_iterator"):  # the test split, once, with the final parameters
            test_batches = task.test_iterator(config.eval_batch_size, shard)
            if test_batches is not None:
              record.update(exp.evaluate(state, test_batches, phase, prefix="test", heartbeat=heartbeat))
          writer.write(step, record)
          progress.clear()
          if config.num_epochs > 0:
            now = time.perf_counter()
            logging.info(metrics_lib.epoch_line(-(-step // exp.steps_per_epoch), config.num_epochs,
                                                now - epoch_start, record))
            epoch_start = now
          else:
            logging.info(metrics_lib.keras_line(step, record))
          loop.final_metrics = {"step": step, **record}
          if stop:
            logging.info("Early stopping at step %d: %s has not improved for %d evals (best %.4f at step %d).",
                         step, loop.stopper.metric, loop.stopper.patience, loop.stopper.best, loop.stopper.best_step)

        preempted = preemption.should_stop(step) and not (stop or last)  # the same step on every process
        if step % config.checkpoint_every == 0 or last or stop or preempted:
          clock.stop(step_metrics)
          loop.check_finite(state)
          _check_divergence(config, step, float(jax.device_get(step_metrics["loss"])), loop.reference_loss)
          save(state, finished=stop or last)
    checkpointer.wait_until_finished()
  except BaseException:  # NaN, divergence, a failed save, Ctrl-C: finish the last good save, close the writers
    with contextlib.suppress(Exception):
      checkpointer.close()
    with contextlib.suppress(Exception):
      writer.close()
    raise

  checkpointer.close()
  writer.close()
  if preempted:
    raise preemption_lib.PreemptedError(loop.step)
  return loop.final_metrics
