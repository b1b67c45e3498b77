"""`train_and_evaluate(config, workdir)`: the training loop of every chainjax experiment.

Reads top to bottom: validate -> mesh -> input -> model -> optimizer -> train
state -> checkpoint restore -> jitted steps -> loop (train, log, eval, early
stop, checkpoint) -> final metrics.
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
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from etils import epath
from flax import nnx

from chainjax import chain as chain_lib
from chainjax import checkpoint as checkpoint_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import metrics as metrics_lib
from chainjax import optim as optim_lib
from chainjax import parallel
from chainjax import precision
from chainjax import preemption as preemption_lib

TrainState = dict  # {"step", "params", "rest", "opt_state", "nonfinite_step"}


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the train step."""


class WorkdirError(RuntimeError):
  """The workdir's files cannot be written (e.g. `config.json` is a folder); one line naming the file."""


class DivergedError(NonFiniteLossError):
  """The loss grew past `config.divergence_factor` times its first logged value (handled as NaN is)."""


# --------------------------------------------------------------------------------------------
# Train and eval steps.
# --------------------------------------------------------------------------------------------


def init_train_state(model: chain_lib.Chain, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
  """Splits the model into (graphdef, state): params, other variables (e.g. BatchNorm stats), opt state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "rest": rest,
      "opt_state": tx.init(params),
      "nonfinite_step": jnp.full((), -1, jnp.int32),
  }
  return graphdef, state


def make_train_step(graphdef, loss_fn: chain_lib.ChainLoss, tx: optax.GradientTransformation, *,
                    seed: int, phase: int | None = None, stage_names: tuple[str, ...] = (),
                    accum_steps: int = 1, policy: precision.Policy | None = None,
                    dynamic_loss_scale: bool = False):
  """One optimizer update on one global batch: `train_step(state, batch) -> (state, metrics)`.

  `accum_steps > 1` splits the global batch into that many micro-batches (example j goes
  to micro-batch j % accum_steps, so every micro-batch stays spread over all devices) and
  sums their gradients in a `lax.scan`; each micro-batch loss is divided by the number of
  real examples in the *whole* global batch, so the summed gradient equals the gradient of
  the global-batch mean. The accumulated gradient (one parameter-sized buffer in the scan
  carry) is the only extra parameter-sized buffer. BatchNorm statistics are those of each
  micro-batch, and running averages are updated once per micro-batch, in order.

  `phase` (progressive mode, static) is the index of the one stage that trains:
  the parameters of every other stage are carried over unchanged, bit for bit.

  `train_step` also takes `denominator` (the real-example count the loss is divided by;
  default: the mask sum of `batch`) and `micro_step` (for `accum_impl="optax"`, where each
  call is one micro-batch and only every `accum_steps`-th call is an optimizer update).

  Mixed precision (`policy`): parameters stay in their dtype (float32) and are cast to the
  compute dtype inside the differentiated function, so gradients arrive in float32; losses
  are computed in float32. The loss is multiplied by the loss scale held in the optimizer
  state (1.0 without loss scaling); the loss-scale wrapper in `tx` unscales the gradients.
  A step that the dynamic loss scale skips leaves the parameters bit-identical.
  """
  base_key = jax.random.fold_in(jax.random.key(seed), 1)
  policy = policy or precision.get_policy("float32")

  def grads_of_batch(params, rest, batch, key, denominator, loss_scale):
    def objective(params):
      model = nnx.merge(graphdef, policy.cast_to_compute(params), rest, copy=True)
      output = model(policy.cast_to_compute(batch["inputs"]), mode=loss_fn.mode, train=True, key=key, phase=phase)
      loss, metrics = loss_fn(output, batch["labels"], batch["mask"], phase=phase, denominator=denominator)
      new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), nnx.state(model, nnx.Not(nnx.Param)), rest)
      return loss * loss_scale, (loss, metrics, new_rest)

    grads, (loss, metrics, rest) = jax.grad(objective, has_aux=True)(params)
    return grads, rest, {"loss": loss, **metrics}

  def accumulated_grads(params, rest, batch, key, denominator, loss_scale):
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, xs):
      grads_sum, rest, metrics_sum = carry
      micro_batch, i = xs
      grads, rest, metrics = grads_of_batch(params, rest, micro_batch, jax.random.fold_in(key, i), denominator,
                                            loss_scale)
      return (jax.tree.map(jnp.add, grads_sum, grads), rest, jax.tree.map(jnp.add, metrics_sum, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grads_of_batch(params, rest, first, key, denominator, loss_scale))
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = (zeros(shapes[0]), rest, zeros(shapes[2]))
    (grads, rest, metrics), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum_steps)))
    return grads, rest, metrics

  def train_step(state: TrainState, batch, denominator=None, micro_step=None) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(base_key, state["step"])
    if micro_step is not None:
      key = jax.random.fold_in(key, micro_step)
    if denominator is None:
      denominator = jnp.maximum(batch["mask"].sum(), 1.0)
    compute = accumulated_grads if accum_steps > 1 and micro_step is None else grads_of_batch
    loss_scale = precision.current_loss_scale(state["opt_state"])
    grads, rest, metrics = compute(state["params"], state["rest"], batch, key, denominator, loss_scale)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    applied = precision.is_finite_step(state["opt_state"], opt_state)
    params = jax.tree.map(lambda new, old: jnp.where(applied, new, old), params, state["params"])
    rest = jax.tree.map(lambda new, old: jnp.where(applied, new, old), rest, state["rest"])  # BatchNorm stats
    if phase is not None:
      params = jax.tree.map_with_path(
          lambda path, new, old: new if chain_lib.stage_of_path(path) == stage_names[phase] else old,
          params, state["params"])
    grad_norm = optax.tree.norm(grads) / loss_scale
    if dynamic_loss_scale:  # overflow is expected and skipped; stop only when the scale is at its floor
      floor = precision.find_loss_scale_state(state["opt_state"]).min_scale
      finite = jnp.isfinite(metrics["loss"]) & (applied | (loss_scale > floor))
    else:
      finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    step = state["step"] + (1 if micro_step is None else (micro_step == accum_steps - 1).astype(jnp.int32))
    nonfinite_step = jnp.where((state["nonfinite_step"] < 0) & ~finite, state["step"] + 1,
                               state["nonfinite_step"])
    new_state = {"step": step, "params": params, "rest": rest, "opt_state": opt_state,
                 "nonfinite_step": nonfinite_step}
    metrics.update(optim_lib.per_stage_norms(jax.tree.map(lambda g: g / loss_scale, grads), "grad_norm"))
    metrics.update(optim_lib.per_stage_norms(params, "param_norm"))
    metrics.update(optim_lib.per_stage_norms(updates, "update_norm"))
    metrics.update(grad_norm=grad_norm, skipped=1.0 - applied.astype(jnp.float32),
                   loss_scale=precision.current_loss_scale(opt_state),
                   skipped_steps=precision.skipped_steps(opt_state).astype(jnp.float32))
    return new_state, metrics

  return train_step


def train_state_shardings(config: ml_collections.ConfigDict, state: TrainState, mesh) -> dict:
  """Replicated everywhere except the kernels of stages with `shard="model"` (and their moments)."""
  sharded = {stage.name for stage in config.chain.stages if stage.shard == "model"}
  params = parallel.param_shardings(state["params"], mesh,
                                    lambda path, leaf: chain_lib.stage_of_path(path) in sharded)
  replicated = parallel.replicated(mesh)
  return {"step": replicated, "params": params, "rest": jax.tree.map(lambda _: replicated, state["rest"]),
          "opt_state": parallel.like_params(state["opt_state"], state["params"], params, mesh),
          "nonfinite_step": replicated}


def build_tx(config: ml_collections.ConfigDict, num_updates: int, steps_per_epoch: int = 0
             ) -> optax.GradientTransformation:
  """The optimizer of `config.optim` for `num_updates` updates, with loss scaling and accumulation.

  The loss-scale wrapper (`config.precision.loss_scale`) sits around the optimizer; with
  `accum_impl="optax"`, `optax.MultiSteps` sits around both, so the accumulated (scaled)
  gradient is unscaled and checked once per update.
  """
  tx = optim_lib.build_optimizer(config.optim, num_updates, chain_lib.stage_names(config), steps_per_epoch)
  tx = precision.build_loss_scale(config.precision.loss_scale, tx)
  if config.optim.accum_impl == "optax" and config.optim.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.optim.accum_steps).gradient_transformation()
  return tx


def make_eval_step(graphdef, loss_fn: chain_lib.ChainLoss, phase: int | None = None,
                   policy: precision.Policy | None = None):
  """One padded eval batch -> (sums, scores).

  `sums`: chain loss, per-stage loss and accuracy summed over real examples, and their
  count. `scores`: per stage with one binary label, its logits, labels and mask, for the
  exact ROC AUC over the whole held-out set.
  """
  policy = policy or precision.get_policy("float32")

  def eval_step(state: TrainState, batch) -> tuple[dict, dict]:
    model = nnx.merge(graphdef, policy.cast_to_compute(state["params"]), state["rest"])
    output = model(policy.cast_to_compute(batch["inputs"]), mode=loss_fn.mode, train=False, phase=phase)
    loss, metrics = loss_fn(output, batch["labels"], batch["mask"], phase=phase,
                            denominator=jnp.ones((), jnp.float32))
    metrics = {k: v for k, v in metrics.items() if not k.endswith(metrics_lib.AUC_COUNTS)}
    scores = {}
    for i, (y, label, spec) in enumerate(zip(output.predictions, batch["labels"], loss_fn.specs)):
      if y is not None and spec.is_binary and spec.shape == ():
        scores[f"stage_{i + 1}"] = (y.astype(jnp.float32).reshape(-1), label, batch["mask"])
    return {"loss": loss, "count": batch["mask"].sum(), **metrics}, scores

  return eval_step


def _with_headline(metrics: dict[str, float], prefix: str, num_stages: int) -> dict[str, float]:
  """Prefixes keys and adds `<prefix>/accuracy` (and `/auc`) = the last stage's."""
  out = {f"{prefix}/{k}": v for k, v in metrics.items()}
  for name in ("accuracy", "auc"):
    last = f"{prefix}/stage_{num_stages}/{name}"
    if last in out:
      out[f"{prefix}/{name}"] = out[last]
  return out


def _host_array(x: jax.Array) -> np.ndarray:
  """A global array's value on every process (gathered when it spans processes)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def evaluate(eval_step, state: TrainState, batches, mesh, batch_size: int, num_stages: int,
             prefix: str = "eval", heartbeat: Callable[[], None] = lambda: None) -> dict[str, float]:
  """Metrics over a whole held-out set of process-local padded `batches` (padding masked out).

  `<prefix>/loss`, `<prefix>/stage_<i>/{loss,accuracy}`, and the exact ROC AUC
  `<prefix>/stage_<i>/auc` of every stage with one binary label.
  """
  window = parallel.DispatchWindow()
  outs, scores = [], {}
  for batch in batches:
    out, batch_scores = eval_step(state, parallel.put_local_batch(batch, mesh, batch_size))
    window.add(out)
    heartbeat()
    outs.append(out)
    for name, arrays in batch_scores.items():
      scores.setdefault(name, []).append(arrays)
  sums = {k: sum(np.float64(out[k]) for out in jax.device_get(outs)) for k in outs[0]}
  count = float(sums.pop("count"))
  metrics = {k: float(v) / count for k, v in sums.items()}
  for name, parts in scores.items():
    logits, labels, mask = (np.concatenate([_host_array(p[j]) for p in parts]) for j in range(3))
    metrics[f"{name}/auc"] = metrics_lib.roc_auc(logits, labels, mask)
  return _with_headline(metrics, prefix, num_stages)


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
  bad = int(jax.device_get(state["nonfinite_step"]))
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
# the data is read from and how, and the divergence check (which its own message tells users to turn off).
RESUMABLE_CHANGES = ("eval_every", "log_every", "checkpoint_every", "max_to_keep", "total_steps", "num_epochs",
                     "eval_batch_size", "divergence_factor", "data.data_dir", "data.num_threads", "data.prefetch",
                     "data.cache")


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
  if config.chain.mode == "progressive" and "total_steps" in changes:  # the phase boundaries would move
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


def _resolve_epochs(config: ml_collections.ConfigDict, task) -> tuple[ml_collections.ConfigDict, int]:
  """(config with `total_steps` in updates, steps per epoch); epoch runs eval and checkpoint every epoch."""
  steps_per_epoch = getattr(task, "train_size", 0) // config.batch_size
  if config.num_epochs <= 0:
    return config, steps_per_epoch
  config = ml_collections.ConfigDict(config.to_dict())
  config.total_steps = config_lib.num_updates(config, task.train_size)
  config.eval_every = steps_per_epoch
  config.checkpoint_every = min(config.checkpoint_every, steps_per_epoch)
  config.log_every = min(config.log_every, steps_per_epoch)
  return config, steps_per_epoch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       heartbeat: Callable[[], None] = lambda: None,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its latest good checkpoint); returns final metrics.

  `heartbeat()` is called whenever a train step or an eval batch completes (a watchdog's
  sign of life). Raises `config.ConfigError` (before anything is written) for a bad config
  or dataset, and for a config that differs from the checkpoint's (see `_check_resume`;
  `allow_config_change` accepts the difference).
  """
  task = config_lib.validate(config, jax.device_count(), workdir=workdir)
  config, steps_per_epoch = _resolve_epochs(config, task)
  is_main = jax.process_index() == 0

  # Mesh and input.
  mesh = parallel.make_mesh(model=config.mesh.model)
  shard = data_lib.Shard.of_this_process()
  train_iter = task.train_iterator(config.batch_size, shard)
  progressive = config.chain.mode == "progressive"
  phase_starts = chain_lib.phase_starts(config) if progressive else (0,)

  # Model, loss, optimizer, train state.
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(config.seed))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  phase_ends = phase_starts[1:] + (config.total_steps,)
  txs = [build_tx(config, end - start, steps_per_epoch) for start, end in zip(phase_starts, phase_ends)]
  lr_schedules = [optim_lib.stage_schedules(config.optim, end - start, chain_lib.stage_names(config),
                                            steps_per_epoch) for start, end in zip(phase_starts, phase_ends)]
  graphdef, state = init_train_state(model, txs[0])
  del model
  replicated = parallel.replicated(mesh)
  state_shardings = train_state_shardings(config, state, mesh)
  state = jax.device_put(state, state_shardings)

  # Checkpoint restore (the saved config checked first), then the workdir and writers.
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, max_to_keep=config.max_to_keep)
  try:
    saved = checkpointer.latest_metadata()
    changes = _check_resume(config, saved, allow_config_change, checkpoint_dir)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    try:
      restored = checkpointer.restore_latest(abstract)
    except ValueError as e:  # the model or optimizer changed shape (only with --allow_config_change)
      raise config_lib.ConfigError("chain", f"the checkpoint does not fit this config: {e}") from None
    if restored is not None and saved is not None and restored[0] != saved[0]:  # fell back to an older step
      changes = _check_resume(config, (restored[0], restored[2]), allow_config_change, checkpoint_dir)
  except BaseException:
    checkpointer.close()
    raise
  meta: dict[str, Any] = {}
  restored_step = 0
  if restored is not None:
    restored_step, state, meta = restored
    logging.info("Resumed from %s at step %d.", checkpoint_dir, restored_step)
    longer = config.total_steps > meta.get("config", {}).get("total_steps", config.total_steps)
    if meta.get("finished") and not longer:  # a finished run trains on only when asked for more steps
      logging.info("This run already finished at step %d; final metrics: %s", restored_step,
                   json.dumps(meta["final_metrics"]))
      checkpointer.close()
      return meta["final_metrics"]
  config_json, config_hash = config_record(config)
  config_history = list(meta.get("config_changes", []))
  if changes:
    config_history.append({"step": restored_step, "changes": {k: list(v) for k, v in changes.items()}})
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
  stopper = EarlyStopping(config.early_stopping.metric, config.early_stopping.mode,
                          config.early_stopping.patience, config.early_stopping.min_delta,
                          **meta.get("early_stopping", {}))

  # Jitted steps (one per progressive phase; one in every other mode).
  accum_steps, accum_by_optax = config.optim.accum_steps, config.optim.accum_impl == "optax"
  batch_sharding = parallel.batch_sharding(mesh)

  def jit_train_step(phase: int | None):
    step_fn = make_train_step(graphdef, loss_fn, txs[phase or 0], seed=config.seed, phase=phase,
                              stage_names=chain_lib.stage_names(config), accum_steps=accum_steps,
                              policy=precision.get_policy(config.precision.policy),
                              dynamic_loss_scale=config.precision.loss_scale.startswith("dynamic"))
    if accum_by_optax:  # one call per micro-batch: (state, micro_batch, denominator, micro_step)
      return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated, replicated),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    return jax.jit(lambda state, batch: step_fn(state, batch), in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)

  # accum_impl="optax": the loss of every micro-batch is divided by the global batch's real-example count.
  micro_denominator = jax.jit(lambda mask: jnp.maximum(mask.sum(), 1.0) / accum_steps, out_shardings=replicated)

  window = parallel.DispatchWindow()  # every program of the loop goes through it: see its docstring

  def run_update(train_step, state: TrainState) -> tuple[TrainState, list[dict]]:
    """One optimizer update on the next global batch (accum_impl="optax": one call per micro-batch)."""
    local_batch = next(train_iter)
    if not accum_by_optax:
      state, metrics = train_step(state, parallel.put_local_batch(local_batch, mesh, config.batch_size))
      window.add(metrics)
      return state, [metrics]
    records = []
    global_mask = parallel.put_local_batch(local_batch["mask"], mesh, config.batch_size)
    denominator = micro_denominator(global_mask)
    window.add(denominator)
    for i in range(accum_steps):  # micro-batch i holds examples i, i + A, i + 2A, ... as in the scan
      micro = jax.tree.map(lambda x: x[i::accum_steps], local_batch)
      micro = parallel.put_local_batch(micro, mesh, config.batch_size // accum_steps)
      state, metrics = train_step(state, micro, denominator, np.int32(i))
      window.add(metrics)
      records.append(metrics)
    return state, records

  train_steps: dict[int | None, Any] = {}
  eval_steps: dict[int | None, Any] = {}

  def phase_of(step: int) -> int | None:
    return chain_lib.phase_at(phase_starts, step) if progressive else None

  # Loop.
  step = int(jax.device_get(state["step"]))
  progress = metrics_lib.ProgressBar(config.total_steps, step, enabled=is_main)
  train_records: list[dict] = []
  interval_start, interval_steps = None, 0
  final_metrics: dict[str, float] = dict(meta.get("final_metrics") or {})
  reference_loss: float | None = meta.get("reference_loss")  # the run's first logged train loss
  phase_skipped_base = meta.get("phase_skipped_base", 0)  # skipped steps before this progressive phase
  stop = preempted = False
  epoch_start = time.perf_counter()
  try:
    with jax.set_mesh(mesh), preemption_lib.Preemption(step) as preemption:
      while step < config.total_steps and not (stop or preempted):
        phase = phase_of(step)
        if progressive and phase > 0 and step == phase_starts[phase]:
          state["opt_state"] = jax.jit(  # a fresh optimizer per phase; the loss scale carries on
              lambda params, old: precision.with_loss_scale_of(txs[phase].init(params), old),
              out_shardings=state_shardings["opt_state"])(state["params"], state["opt_state"])
          phase_skipped_base = int(jax.device_get(precision.skipped_steps(state["opt_state"])))
          reference_loss = None  # each phase trains another loss: divergence is measured within the phase
        if phase not in train_steps:
          train_steps[phase] = jit_train_step(phase)
        state, step_records = run_update(train_steps[phase], state)
        heartbeat()
        checkpointer.raise_if_save_failed()  # a failed background save stops the run now (no host sync)
        step += 1
        step_metrics = step_records[-1]
        train_records.extend(step_records)
        if interval_start is None:  # the first step compiles: time from after it
          jax.block_until_ready(step_metrics)
          interval_start, interval_steps, train_records = time.perf_counter(), 0, step_records
        else:
          interval_steps += 1

        if step % config.log_every == 0 or step == config.total_steps:
          _check_finite(state)
          loss = float(jax.device_get(step_metrics["loss"]))
          _check_divergence(config, step, loss, reference_loss)
          reference_loss = loss if reference_loss is None else reference_loss
          progress.update(step, loss)

        if step % config.eval_every == 0 or step == config.total_steps:
          _check_finite(state)
          train_summary = metrics_lib.mean_metrics(jax.device_get(train_records))
          elapsed = time.perf_counter() - interval_start
          record = _with_headline(train_summary, "train", len(task.label_specs))
          # The LR of the last applied update (0-based within its progressive phase): skipped steps
          # (dynamic loss scale) do not advance the schedule.
          skipped = int(jax.device_get(precision.skipped_steps(state["opt_state"]))) - phase_skipped_base
          last_update = max(step - 1 - phase_starts[phase or 0] - skipped, 0)
          record.update(optim_lib.stage_learning_rates(lr_schedules[phase or 0], last_update, state["opt_state"]))
          if interval_steps:
            record["train/steps_per_sec"] = interval_steps / elapsed
            record["train/examples_per_sec"] = interval_steps * config.batch_size / elapsed
          if phase not in eval_steps:
            eval_steps[phase] = jax.jit(make_eval_step(graphdef, loss_fn, phase,
                                                       precision.get_policy(config.precision.policy)),
                                        in_shardings=(state_shardings, parallel.batch_sharding(mesh)))
          record.update(evaluate(eval_steps[phase], state, task.eval_iterator(config.eval_batch_size, shard), mesh,
                                 config.eval_batch_size, len(task.label_specs), heartbeat=heartbeat))
          if optim_lib.uses_plateau(config.optim):  # reduce-on-plateau: the scale lives in the opt state
            state["opt_state"] = jax.device_put(
                optim_lib.report_eval_metric(state["opt_state"], record[config.optim.plateau_metric]),
                state_shardings["opt_state"])
          stop = stopper.update(step, record)
          test_batches = None
          if (stop or step == config.total_steps) and hasattr(task, "test_iterator"):
            test_batches = task.test_iterator(config.eval_batch_size, shard)
          if test_batches is not None:  # the test split, once, with the final parameters
            record.update(evaluate(eval_steps[phase], state, test_batches, mesh, config.eval_batch_size,
                                   len(task.label_specs), prefix="test", heartbeat=heartbeat))
          writer.write(step, record)
          progress.clear()
          if config.num_epochs > 0:
            now = time.perf_counter()
            logging.info(metrics_lib.epoch_line(-(-step // steps_per_epoch), config.num_epochs, now - epoch_start,
                                                record))
            epoch_start = now
          else:
            logging.info(metrics_lib.keras_line(step, record))
          final_metrics = {"step": step, **record}
          if stop:
            logging.info("Early stopping at step %d: %s has not improved for %d evals (best %.4f at step %d).",
                         step, stopper.metric, stopper.patience, stopper.best, stopper.best_step)
          train_records, interval_start, interval_steps = [], time.perf_counter(), 0

        preempted = preemption.should_stop(step) and not (stop or step == config.total_steps)  # same step everywhere
        if step % config.checkpoint_every == 0 or step == config.total_steps or stop or preempted:
          _check_finite(state)
          _check_divergence(config, step, float(jax.device_get(step_metrics["loss"])), reference_loss)
          finished = stop or step == config.total_steps
          checkpointer.save(step, state, {"early_stopping": stopper.to_json(), "finished": finished,
                                          "final_metrics": final_metrics if finished else None,
                                          "reference_loss": reference_loss, "config": config_json,
                                          "config_hash": config_hash, "config_changes": config_history,
                                          "phase_skipped_base": phase_skipped_base},
                            data_state=train_iter.get_state())
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
    raise preemption_lib.PreemptedError(step)
  return final_metrics

