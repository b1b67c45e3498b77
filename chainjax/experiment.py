"""The composition layer: a config (and optionally a workdir) -> everything a run is made of.

`Experiment(config)` validates the config against the task and the devices, then builds,
once: the task, the mesh, the chain (as a graph definition), the chain loss, the phases of
the chain mode (each with its optimizer, LR schedules and jitted train and eval steps),
and the train state's shardings. The trainer, the benchmarks and every tool that needs a
model from a config or a workdir start here, so they all run the same step:

    exp = experiment.Experiment(config)
    state = exp.init_state()                        # or exp.restore(workdir)
    phase = exp.phases[0]
    sums = phase.zero_sums()
    state, sums, metrics = phase.train_step(state, sums, exp.put_batch(next(train_iter)))
    eval_metrics = exp.evaluate(state, exp.task.eval_iterator(config.eval_batch_size, shard))

`restore(workdir, params_only=True)` reads only the parameters (and BatchNorm statistics)
of the newest good checkpoint, for evaluation or export; `init_state()` reads them from
`config.compress.init_from` when that is set (fine-tuning, e.g. a float run with QAT).

With `config.compress.qat.start_step > 0`, the updates before it train the float model: each
phase they touch has a float twin (`float_phases`, same optimizer and schedules, its own
compiled steps with quantization off) that `phase_at` returns for them.

Validation that needs several parts (the task's shapes against the stages, phase budgets
against the resolved number of updates, memory) lives here too (`validate`); each part
checks its own fields (`config.validate`, `chain.check_config`, `optim.validate`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from chainjax import chain as chain_lib
from chainjax import checkpoint as checkpoint_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import metrics as metrics_lib
from chainjax import optim as optim_lib
from chainjax import parallel
from chainjax import precision
from chainjax.compress import prune as prune_lib
from chainjax.compress import quant
from chainjax.data import line_parity
from chainjax.errors import ConfigError

# --------------------------------------------------------------------------------------------
# The train state.
# --------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
  """Everything that changes during training (a pytree; checkpointed as a dict of these fields)."""

  step: jax.Array  # [] int32: optimizer updates done
  params: Any  # nnx.State of the chain's nnx.Param leaves
  rest: Any  # every other variable (BatchNorm statistics)
  opt_state: Any
  nonfinite_step: jax.Array  # [] int32: the first step whose loss or gradient was not finite; -1: none

  def to_dict(self) -> dict:
    """The checkpoint layout (unchanged since the state was a dict)."""
    return self._asdict()

  @classmethod
  def from_dict(cls, tree: dict) -> "TrainState":
    return cls(**tree)


def init_train_state(model: chain_lib.Chain, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
  """Splits the model into (graphdef, state): params, other variables (e.g. BatchNorm stats), opt state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                              nonfinite_step=jnp.full((), -1, jnp.int32))


def train_state_shardings(config: ml_collections.ConfigDict, state: TrainState, mesh) -> TrainState:
  """Replicated everywhere except the kernels of stages with `shard="model"` (and their moments)."""
  sharded = {stage.name for stage in config.chain.stages if stage.shard == "model"}
  params = parallel.param_shardings(state.params, mesh, lambda path, leaf: chain_lib.stage_of_path(path) in sharded)
  replicated = parallel.replicated(mesh)
  return TrainState(step=replicated, params=params, rest=jax.tree.map(lambda _: replicated, state.rest),
                    opt_state=parallel.like_params(state.opt_state, state.params, params, mesh),
                    nonfinite_step=replicated)


def build_tx(config: ml_collections.ConfigDict, num_updates: int, steps_per_epoch: int = 0
             ) -> optax.GradientTransformation:
  """The optimizer of `config.optim` for `num_updates` updates, with loss scaling and accumulation.

  The loss-scale wrapper (`config.precision.loss_scale`) sits around the optimizer; with
  `accum_impl="optax"`, `optax.MultiSteps` sits around both, so the accumulated (scaled)
  gradient is unscaled and checked once per update.
  """
  tx = optim_lib.build_optimizer(config.optim, num_updates, chain_lib.stage_names(config), steps_per_epoch,
                                 prune=config.compress.prune)
  tx = precision.build_loss_scale(config.precision.loss_scale, tx)
  if config.optim.accum_impl == "optax" and config.optim.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.optim.accum_steps).gradient_transformation()
  return tx


# --------------------------------------------------------------------------------------------
# Train and eval steps.
# --------------------------------------------------------------------------------------------


def _cast_predictions(output: chain_lib.ChainOutput, policy: precision.Policy) -> chain_lib.ChainOutput:
  """The heads' predictions in the policy's output dtype, as the losses and metrics read them."""
  return dataclasses.replace(output, predictions=tuple(
      None if y is None else policy.cast_to_output(y) for y in output.predictions))


def make_train_step(graphdef, loss_fn: chain_lib.ChainLoss, tx: optax.GradientTransformation, *,
                    seed: int, phase: int | None = None, stage_names: tuple[str, ...] = (),
                    accum_steps: int = 1, policy: precision.Policy | None = None,
                    dynamic_loss_scale: bool = False, quantized: bool = True):
  """One optimizer update on one global batch: `train_step(state, batch) -> (state, metrics)`.

  `accum_steps > 1` splits the global batch into that many micro-batches (example j goes
  to micro-batch j % accum_steps, so every micro-batch stays spread over all devices) and
  sums their gradients in a `lax.scan`; each micro-batch loss is divided by the number of
  real examples in the *whole* global batch, so the summed gradient equals the gradient of
  the global-batch mean. The accumulated gradient (one parameter-sized buffer in the scan
  carry) is the only extra parameter-sized buffer. BatchNorm statistics are those of each
  micro-batch, and running averages are updated once per micro-batch, in order.

  `phase` (static; 0 when None) is the phase of the chain mode (`loss_fn.mode`): in a
  phase that trains only some stages, the parameters of every other stage are carried
  over unchanged, bit for bit.

  `train_step` also takes `denominator` (the real-example count the loss is divided by;
  default: the mask sum of `batch`) and `micro_step` (for `accum_impl="optax"`, where each
  call is one micro-batch and only every `accum_steps`-th call is an optimizer update).

  Mixed precision (`policy`): parameters stay in their dtype (float32) and are cast to the
  compute dtype inside the differentiated function, so gradients arrive in float32; the
  predictions are cast to the output dtype and the losses computed in float32. The loss is
  multiplied by the loss scale held in the optimizer state (1.0 without loss scaling); the
  loss-scale wrapper in `tx` unscales the gradients. A step that the dynamic loss scale
  skips leaves the parameters bit-identical.

  `quantized` (static): whether the chain's quantizers act (`quant.enabled`); False trains the float
  model on the same state, observers untouched (the updates before `compress.qat.start_step`).
  """
  base_key = jax.random.fold_in(jax.random.key(seed), 1)
  policy = policy or precision.get_policy("float32")
  rule = loss_fn.mode.phase(len(loss_fn.specs), phase or 0)
  trained = {name for i, name in enumerate(stage_names) if rule.trains(i)}

  def grads_of_batch(params, rest, batch, key, denominator, loss_scale):
    def objective(params):
      model = nnx.merge(graphdef, policy.cast_to_compute(params), rest, copy=True)
      with quant.enabled(quantized):
        output = model(policy.cast_to_compute(batch["inputs"]), mode=loss_fn.mode, train=True, key=key,
                       phase=phase)
      loss, metrics = loss_fn(_cast_predictions(output, policy), batch["labels"], batch["mask"], phase=phase,
                              denominator=denominator)
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
    key = jax.random.fold_in(base_key, state.step)
    if micro_step is not None:
      key = jax.random.fold_in(key, micro_step)
    if denominator is None:
      denominator = jnp.maximum(batch["mask"].sum(), 1.0)
    compute = accumulated_grads if accum_steps > 1 and micro_step is None else grads_of_batch
    loss_scale = precision.current_loss_scale(state.opt_state)
    grads, rest, metrics = compute(state.params, state.rest, batch, key, denominator, loss_scale)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    applied = precision.is_finite_step(state.opt_state, opt_state)
    params = jax.tree.map(lambda new, old: jnp.where(applied, new, old), params, state.params)
    rest = jax.tree.map(lambda new, old: jnp.where(applied, new, old), rest, state.rest)  # BatchNorm stats
    if not rule.trains_every_stage:
      params = jax.tree.map_with_path(
          lambda path, new, old: new if chain_lib.stage_of_path(path) in trained else old, params, state.params)
    grad_norm = optax.tree.norm(grads) / loss_scale
    if dynamic_loss_scale:  # overflow is expected and skipped; stop only when the scale is at its floor
      floor = precision.find_loss_scale_state(state.opt_state).min_scale
      finite = jnp.isfinite(metrics["loss"]) & (applied | (loss_scale > floor))
    else:
      finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    step = state.step + (1 if micro_step is None else (micro_step == accum_steps - 1).astype(jnp.int32))
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step)
    new_state = TrainState(step=step, params=params, rest=rest, opt_state=opt_state, nonfinite_step=nonfinite_step)
    metrics.update(optim_lib.per_stage_norms(jax.tree.map(lambda g: g / loss_scale, grads), "grad_norm"))
    metrics.update(optim_lib.per_stage_norms(params, "param_norm"))
    metrics.update(optim_lib.per_stage_norms(updates, "update_norm"))
    metrics.update(grad_norm=grad_norm, skipped=1.0 - applied.astype(jnp.float32),
                   loss_scale=precision.current_loss_scale(opt_state),
                   skipped_steps=precision.skipped_steps(opt_state).astype(jnp.float32))
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, loss_fn: chain_lib.ChainLoss, phase: int | None = None,
                   policy: precision.Policy | None = None, quantized: bool = True):
  """`eval_step(params, rest, batch) -> (sums, scores)` on one padded eval batch.

  It needs only the parameters and the other variables (a state restored without its
  optimizer state evaluates too). `sums`: chain loss, per-stage loss and accuracy summed over real examples, and their
  count. `scores`: per stage with one binary label, its logits, labels and mask, for the
  exact ROC AUC over the whole held-out set. `quantized`: as in `make_train_step`.
  """
  policy = policy or precision.get_policy("float32")

  def eval_step(params, rest, batch) -> tuple[dict, dict]:
    model = nnx.merge(graphdef, policy.cast_to_compute(params), rest)
    with quant.enabled(quantized):
      output = _cast_predictions(model(policy.cast_to_compute(batch["inputs"]), mode=loss_fn.mode, train=False,
                                       phase=phase), policy)
    loss, metrics = loss_fn(output, batch["labels"], batch["mask"], phase=phase,
                            denominator=jnp.ones((), jnp.float32))
    metrics = {k: v for k, v in metrics.items() if not k.endswith(metrics_lib.AUC_COUNTS)}
    scores = {}
    for i, (y, label, spec) in enumerate(zip(output.predictions, batch["labels"], loss_fn.specs)):
      if y is not None and spec.is_binary and spec.shape == ():
        scores[f"stage_{i + 1}"] = (y.astype(jnp.float32).reshape(-1), label, batch["mask"])
    return {"loss": loss, "count": batch["mask"].sum(), **metrics}, scores

  return eval_step


# --------------------------------------------------------------------------------------------
# Phases and the experiment.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
  """One phase of the chain mode: updates [start, end), its optimizer, LR schedules and steps.

  `train_step(state, sums, batch[, denominator, micro_step]) -> (state, sums, metrics)`:
  the jitted update of `make_train_step` (`step_fn`), with the interval's metric sums added
  inside the same program (`zero_sums()` starts an interval; `metrics.mean_of_sums` reads one). The
  state and the sums are donated. `eval_step(params, rest, sums, batch) -> (sums, scores, count)`: the
  jitted `make_eval_step` (`eval_fn`) on (params, rest), eval sums added on device, and the batch's
  count (not donated: what the dispatch window waits on). Both compile on first use.

  `quantized`: whether its steps run the chain's quantizers (False: a float twin, see the module docstring).
  """

  index: int
  start: int
  end: int
  tx: optax.GradientTransformation
  schedules: dict[str, optax.Schedule]
  step_fn: Callable
  eval_fn: Callable
  experiment: "Experiment" = dataclasses.field(repr=False)
  quantized: bool = True

  @property
  def num_updates(self) -> int:
    return self.end - self.start

  @functools.cached_property
  def train_step(self) -> Callable:
    exp = self.experiment
    step_fn, shardings, batch, replicated = self.step_fn, exp.state_shardings, exp.batch_sharding, exp.replicated

    def step_and_sums(state, sums, batch, *args):
      state, metrics = step_fn(state, batch, *args)
      return state, metrics_lib.add_to_sums(sums, metrics), metrics

    if exp.accum_by_optax:  # one call per micro-batch: (state, sums, micro_batch, denominator, micro_step)
      return jax.jit(step_and_sums, in_shardings=(shardings, replicated, batch, replicated, replicated),
                     out_shardings=(shardings, replicated, replicated), donate_argnums=(0, 1))
    return jax.jit(lambda state, sums, b: step_and_sums(state, sums, b), in_shardings=(shardings, replicated, batch),
                   out_shardings=(shardings, replicated, replicated), donate_argnums=(0, 1))

  @functools.cached_property
  def eval_step(self) -> Callable:
    exp, eval_fn = self.experiment, self.eval_fn

    def eval_and_sums(params, rest, sums, batch):
      out, scores = eval_fn(params, rest, batch)
      return jax.tree.map(jnp.add, sums, out), scores, out["count"]

    shardings = exp.state_shardings
    return jax.jit(eval_and_sums, in_shardings=(shardings.params, shardings.rest, exp.replicated, exp.batch_sharding),
                   out_shardings=(exp.replicated, exp.batch_sharding, exp.replicated), donate_argnums=2)

  @functools.cached_property
  def _sum_shapes(self) -> dict:
    exp = self.experiment
    args = (jnp.ones(()), jnp.int32(0)) if exp.accum_by_optax else ()
    _, metrics = jax.eval_shape(self.step_fn, exp.abstract_state(), exp.abstract_batch(), *args)
    return {**metrics, "steps": jax.ShapeDtypeStruct((), jnp.float32)}

  def zero_sums(self) -> dict:
    """Train-metric sums of an empty interval (replicated zeros)."""
    return {k: jnp.zeros(s.shape, s.dtype, device=self.experiment.replicated) for k, s in self._sum_shapes.items()}

  def zero_eval_sums(self, state: TrainState, batch) -> dict:
    """Eval sums of no batch yet, shaped like `eval_fn`'s sums for `batch`."""
    sums, _ = jax.eval_shape(self.eval_fn, state.params, state.rest, batch)
    return {k: jnp.zeros(s.shape, s.dtype, device=self.experiment.replicated) for k, s in sums.items()}


class Experiment:
  """The validated parts of one config's run (see the module docstring); builds nothing twice."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None):
    self.task = validate(config, jax.device_count(), workdir=workdir)
    self.config, self.steps_per_epoch = resolve_epochs(config, self.task)
    config = self.config
    self.mode = chain_lib.get_mode(config.chain.mode)
    self.stage_names = chain_lib.stage_names(config)
    self.num_stages = len(self.stage_names)
    self.mesh = parallel.make_mesh(model=config.mesh.model)
    self.policy = precision.get_policy(config.precision.policy)
    self.loss_fn = chain_lib.ChainLoss.from_config(config, self.task.label_specs)
    starts = chain_lib.phase_starts(config)
    ends = starts[1:] + (config.total_steps,)
    self.phase_starts = starts
    txs = [build_tx(config, end - start, self.steps_per_epoch) for start, end in zip(starts, ends)]
    self.graphdef, params, rest = nnx.split(nnx.eval_shape(self._build_chain), nnx.Param, ...)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    self._abstract = TrainState(step=scalar, params=params, rest=rest, opt_state=jax.eval_shape(txs[0].init, params),
                                nonfinite_step=scalar)
    self.state_shardings = train_state_shardings(config, self._abstract, self.mesh)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.replicated = parallel.replicated(self.mesh)
    self.accum_by_optax = config.optim.accum_impl == "optax" and config.optim.accum_steps > 1
    self.window = parallel.DispatchWindow()  # every program `update` and `evaluate` dispatch goes through it
    self.phases = tuple(self._phase(j, start, end, tx) for j, (start, end, tx) in enumerate(zip(starts, ends, txs)))
    self.qat_start = config.compress.qat.start_step
    self.float_phases = {p.index: self._phase(p.index, p.start, p.end, p.tx, quantized=False)
                         for p in self.phases if p.start < self.qat_start}

  def _phase(self, index: int, start: int, end: int, tx: optax.GradientTransformation,
             quantized: bool = True) -> Phase:
    config = self.config
    schedules = optim_lib.stage_schedules(config.optim, end - start, self.stage_names, self.steps_per_epoch)
    step_fn = make_train_step(self.graphdef, self.loss_fn, tx, seed=config.seed, phase=index,
                              stage_names=self.stage_names, accum_steps=config.optim.accum_steps,
                              policy=self.policy, dynamic_loss_scale=config.precision.loss_scale.startswith("dynamic"),
                              quantized=quantized)
    eval_fn = make_eval_step(self.graphdef, self.loss_fn, index, self.policy, quantized)
    return Phase(index, start, end, tx, schedules, step_fn, eval_fn, self, quantized)

  # Shapes and states.

  def abstract_batch(self, batch_size: int | None = None) -> dict:
    """Shapes and sharding of one global train batch (one micro-batch with `accum_impl="optax"`)."""
    size = batch_size or self.config.batch_size
    if self.accum_by_optax and batch_size is None:
      size //= self.config.optim.accum_steps
    struct = lambda shape, dtype: jax.ShapeDtypeStruct((size,) + tuple(shape), np.dtype(dtype),
                                                       sharding=self.batch_sharding)
    label_dtype = lambda spec: np.float32 if spec.is_binary else np.int32  # what every task's batches hold
    return {"inputs": struct(self.task.input_shape, self.task.input_dtype),
            "labels": tuple(struct(s.shape, label_dtype(s)) for s in self.task.label_specs),
            "mask": struct((), np.float32)}

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state (nothing allocated)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self._abstract, self.state_shardings)

  def _build_chain(self) -> chain_lib.Chain:
    return chain_lib.build_chain(self.config, self.task, rngs=nnx.Rngs(self.config.seed))

  def init_state(self) -> TrainState:
    """The initial train state (parameters from `config.seed`), placed with its shardings.

    Built eagerly, then placed: compiling the initializers as one program would let XLA fold
    some of them differently (embedding tables differ in the last bit). With
    `config.compress.init_from`, the parameters and other variables then come from that workdir
    (`_state_from`).
    """
    state = jax.device_put(init_train_state(self._build_chain(), self.phases[0].tx)[1], self.state_shardings)
    if self.config.compress.init_from:
      state = self._state_from(self.config.compress.init_from, state)
    return state

  def _state_from(self, source: str, fresh: TrainState) -> TrainState:
    """`fresh` with the parameters and other variables (BatchNorm statistics, observers) of the newest good
    checkpoint of the workdir `source`, read-only, and a new optimizer state for them.

    The variables of activation quantizers (`quant.is_quantizer_path`) come from `source` only when it has
    all of them; otherwise, e.g. a float run fine-tuned with QAT, they stay fresh. Raises `ConfigError` for
    `compress.init_from` when no checkpoint restores or the parameters do not fit this config.
    """
    abstract = self.abstract_state()
    full = {"params": abstract.params, "rest": abstract.rest}
    without_quantizers = {k: nnx.filter_state(v, lambda path, _: not quant.is_quantizer_path(path))
                          for k, v in full.items()}
    targets = [full]
    if jax.tree.structure(without_quantizers) != jax.tree.structure(full):  # for a source without (all of) them
      targets.append(without_quantizers)
    targets = [{k: v for k, v in t.items() if jax.tree.leaves(v)} for t in targets]  # an empty part: nothing to read
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(source, "checkpoints"), read_only=True)
    try:
      for attempt, wanted in enumerate(targets):
        try:
          restored = checkpointer.restore_latest(wanted, partial=True)
          break
        except ValueError as e:  # a path the checkpoint lacks, or another shape: nothing was read
          error = e
      else:
        raise ConfigError("compress.init_from", f"the checkpoint in {source} does not fit this config: "
                          f"{str(error).splitlines()[0]}")
    finally:
      checkpointer.close()
    if restored is None:
      raise ConfigError("compress.init_from", f"no checkpoint in {source} restores")
    step, tree, _ = restored
    values = {_names(path): leaf for path, leaf in jax.tree.leaves_with_path(tree)}
    take = lambda part: jax.tree.map_with_path(lambda path, x: values.get((part,) + _names(path), x),
                                               getattr(fresh, part))
    params, rest = take("params"), take("rest")
    opt_state = jax.jit(self.phases[0].tx.init, out_shardings=self.state_shardings.opt_state)(params)
    logging.info("Initial parameters and non-parameter state from %s, step %d%s.", source, step,
                 " (activation quantizers start fresh: the source lacks them)" if attempt else "")
    return fresh._replace(params=params, rest=rest, opt_state=opt_state)

  def enter_phase(self, state: TrainState, phase: Phase) -> TrainState:
    """`state` at the start of a later `phase`: a fresh optimizer state for it; the loss scale carries on."""
    return state._replace(opt_state=jax.jit(
        lambda params, old: precision.with_loss_scale_of(phase.tx.init(params), old),
        out_shardings=self.state_shardings.opt_state)(state.params, state.opt_state))

  def restore(self, workdir_or_checkpointer, params_only: bool = False
              ) -> tuple[int, TrainState, dict] | None:
    """`(step, state, metadata)` of the newest good checkpoint of a workdir (or `Checkpointer`); None without one.

    A workdir is opened read-only: a step that does not restore is skipped, never moved aside
    (a trainer may be writing it).

    `params_only`: only the parameters and BatchNorm statistics are read (the optimizer state
    stays on disk; `state.opt_state` is None), e.g. for evaluation or export.
    """
    checkpointer = workdir_or_checkpointer
    own = not isinstance(checkpointer, checkpoint_lib.Checkpointer)
    if own:  # a workdir is only read: nothing is created, nothing moved aside
      directory = os.path.join(workdir_or_checkpointer, "checkpoints")
      if not epath.Path(directory).exists():
        return None
      checkpointer = checkpoint_lib.Checkpointer(directory, read_only=True)
    try:
      target = self.abstract_state().to_dict()
      if params_only:
        del target["opt_state"]
      try:
        restored = checkpointer.restore_latest(target, partial=params_only)
      except ValueError as e:  # the model or optimizer changed shape (only with --allow_config_change)
        # Quantizer variables in the difference: QAT was switched on or off (or its rules changed).
        field = "compress.qat.rules" if any(q in str(e) for q in quant.QUANTIZER_ATTRIBUTES) else "chain"
        raise ConfigError(field, f"the checkpoint does not fit this config: {e}") from None
    finally:
      if own:
        checkpointer.close()
    if restored is None:
      return None
    step, tree, meta = restored
    if params_only:
      tree["opt_state"] = None
    return step, TrainState.from_dict(tree), meta

  # Steps.

  def phase_at(self, step: int) -> Phase:
    """The phase that update `step` (0-based) belongs to (its float twin before `compress.qat.start_step`)."""
    index = chain_lib.phase_at(self.phase_starts, step)
    return self.float_phases[index] if step < self.qat_start else self.phases[index]

  @functools.cached_property
  def micro_denominator(self) -> Callable:
    """`accum_impl="optax"`: global mask -> what every micro-batch's loss is divided by (the global batch's
    real-example count over `accum_steps`), replicated."""
    accum_steps = self.config.optim.accum_steps
    return jax.jit(lambda mask: jnp.maximum(mask.sum(), 1.0) / accum_steps, out_shardings=self.replicated)

  def update(self, phase: Phase, state: TrainState, sums: dict, local_batch) -> tuple[TrainState, dict, dict]:
    """One optimizer update on this process's rows of a global batch: `(state, sums, metrics)`.

    `state` and `sums` are donated. With `accum_impl="optax"` it is `accum_steps` calls of the step,
    micro-batch i holding examples i, i + A, i + 2A, ... as the scan of `make_train_step` does.
    Every call goes through the experiment's `parallel.DispatchWindow` (see its docstring): the
    loop of the trainer and every benchmark run the same dispatch as well as the same step.
    """
    if not self.accum_by_optax:
      state, sums, metrics = phase.train_step(state, sums, self.put_batch(local_batch))
      self.window.add(metrics)
      return state, sums, metrics
    accum_steps = self.config.optim.accum_steps
    denominator = self.micro_denominator(self.put_batch(local_batch["mask"]))
    self.window.add(denominator)
    micro_size = self.config.batch_size // accum_steps
    for i in range(accum_steps):
      micro = self.put_batch(jax.tree.map(lambda x: x[i::accum_steps], local_batch), micro_size)
      state, sums, metrics = phase.train_step(state, sums, micro, denominator, np.int32(i))
      self.window.add(metrics)
    return state, sums, metrics

  def put_batch(self, local_batch, batch_size: int | None = None):
    """This process's rows of a global batch (numpy) -> global arrays sharded along `data`."""
    return parallel.put_local_batch(local_batch, self.mesh, batch_size or self.config.batch_size)

  def evaluate(self, state: TrainState, batches, phase: Phase | None = None, prefix: str = "eval",
               heartbeat: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Metrics over a whole held-out set of process-local padded `batches` (padding masked out).

    `<prefix>/loss`, `<prefix>/accuracy` (the last stage's), `<prefix>/stage_<i>/{loss,accuracy}`,
    and the exact ROC AUC `<prefix>/stage_<i>/auc` of every stage with one binary label. The sums
    stay on device until the end; each stage's AUC inputs are joined on device and gathered once,
    after the last batch.
    """
    phase = phase or self.phases[-1]
    window = self.window
    sums, scores = None, {}
    for batch in batches:
      batch = self.put_batch(batch, self.config.eval_batch_size)
      if sums is None:
        sums = phase.zero_eval_sums(state, batch)
      sums, batch_scores, count = phase.eval_step(state.params, state.rest, sums, batch)
      window.add(count)  # the sums are donated to the next batch's program: the window waits on the count
      heartbeat()
      for name, arrays in batch_scores.items():
        scores.setdefault(name, []).append(arrays)
    if sums is None:
      raise ValueError(f"the {prefix} set of {self.task.name} has no batches")
    sums = jax.device_get(sums)
    count = float(sums.pop("count"))
    metrics = {k: float(v) / count for k, v in sums.items()}
    for name, parts in scores.items():
      logits, labels, mask = host_arrays(tuple(jnp.concatenate([p[j] for p in parts]) for j in range(3)))
      metrics[f"{name}/auc"] = metrics_lib.roc_auc(logits, labels, mask)
    return with_headline(metrics, prefix, self.num_stages)


def _names(path) -> tuple[str, ...]:
  """A tree path as plain strings (dict key, attribute or index), as checkpoints spell it."""
  return tuple(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def host_arrays(tree: Any) -> Any:
  """A pytree of global arrays' values on every process (gathered from the other processes on multi-host)."""
  if jax.process_count() > 1:
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return jax.tree.map(np.asarray, jax.device_get(tree))


def with_headline(metrics: dict[str, float], prefix: str, num_stages: int) -> dict[str, float]:
  """Prefixes keys and adds `<prefix>/accuracy` (and `/auc`) = the last stage's."""
  out = {f"{prefix}/{k}": v for k, v in metrics.items()}
  for name in ("accuracy", "auc"):
    last = f"{prefix}/stage_{num_stages}/{name}"
    if last in out:
      out[f"{prefix}/{name}"] = out[last]
  return out


# --------------------------------------------------------------------------------------------
# Validation of the parts together.
# --------------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, workdir: str | None = None):
  """Raises `ConfigError` for the first bad field; returns the task. Nothing is compiled.

  The config's own fields first (`config.validate`), then what each module owns (the chain
  mode, the optimizers and schedules, the precision policy), then the task (a TFDS dataset
  is opened, not read through; `workdir` holds a text vocabulary), the chain against the
  task (built abstractly: shapes only), the optimizer against the resolved number of
  updates, and whether a batch and the train state fit in memory.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  config_lib.validate(config, num_devices)
  chain_lib.get_mode(config.chain.mode)
  optim_lib.check_names(config.optim)
  for field, parse in (("precision.policy", precision.get_policy),
                       ("precision.loss_scale", precision.parse_loss_scale)):
    try:
      parse(config_lib._get(config, field))  # pylint: disable=protected-access
    except ValueError as e:
      raise ConfigError(field, str(e)) from None
  memory = available_memory()
  example = _synthetic_example(config)  # known before the task exists, which would allocate its held-out set
  if example is not None:
    _check_data_memory(config, num_devices, example, memory)
  try:
    task = data_lib.get_task(config, workdir)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError("data", str(e)) from None
  train_size = getattr(task, "train_size", 0)
  if train_size and config.batch_size > train_size:
    raise ConfigError("batch_size", f"{config.batch_size} is larger than the {train_size} training examples of "
                      f"{task.name} (split {config.data.split_train!r})")
  if config.num_epochs and not train_size:
    raise ConfigError("num_epochs", f"the {task.name} task is an endless stream with no epochs; set "
                      "total_steps instead")
  if example is None:
    _check_data_memory(config, num_devices, _task_example(config, task), memory)
  updates = config_lib.num_updates(config, train_size)
  chain_lib.check_config(config, task.label_specs, updates, task.name)
  _check_init_from(config, workdir)
  model = _abstract_chain(config, task)
  _check_model_sharding(config, model)
  optim_lib.validate(config, updates, bool(train_size), task.name)
  prune_lib.validate(config, updates, chain_lib.get_mode(config.chain.mode).stagewise)
  _check_prunable(config, model, updates)
  _check_state_memory(config, task, num_devices, model, memory)
  return task


def _check_init_from(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """`compress.init_from` names a workdir with a checkpoint; not checked when `workdir` has checkpoints of its own
  (the run resumes them and never reads `init_from`). Whether its parameters fit is checked when they are read."""
  source = config.compress.init_from
  if not source or (workdir and _has_steps(os.path.join(workdir, "checkpoints"))):
    return
  if not epath.Path(source).is_dir():
    raise ConfigError("compress.init_from", f"{source} is not a directory")
  if not _has_steps(os.path.join(source, "checkpoints")):
    raise ConfigError("compress.init_from", f"{source} has no checkpoint (no {os.path.join(source, 'checkpoints')}"
                      "/<step> folder): give the workdir of a run")


def _has_steps(directory: str) -> bool:
  """Whether `directory` holds a step folder of a `Checkpointer`."""
  path = epath.Path(directory)
  return path.is_dir() and any(p.name.isdigit() and p.is_dir() for p in path.iterdir())


def _check_prunable(config: ml_collections.ConfigDict, model: chain_lib.Chain, updates: int) -> None:
  """N:M pruning needs every pruned kernel's input axis to split into groups of M (shapes only)."""
  if not config.compress.prune.n_m or not any(prune_lib.stage_targets(config.compress.prune,
                                                                       chain_lib.stage_names(config)).values()):
    return
  try:
    jax.eval_shape(build_tx(config, updates).init, nnx.state(model, nnx.Param))
  except ValueError as e:
    raise ConfigError("compress.prune.n_m", str(e).splitlines()[0]) from None


def resolve_epochs(config: ml_collections.ConfigDict, task) -> tuple[ml_collections.ConfigDict, int]:
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


def _abstract_chain(config: ml_collections.ConfigDict, task) -> chain_lib.Chain:
  """The chain of `config` for `task`, shapes only (no parameters allocated, nothing compiled)."""
  try:
    return nnx.eval_shape(lambda: chain_lib.build_chain(config, task, rngs=nnx.Rngs(0)))
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError("chain.stages", f"do not fit the {task.name} input (shape {tuple(task.input_shape)}, "
                      f"{task.input_dtype}): {detail}") from None


def _check_model_sharding(config, model) -> None:
  """A `shard="model"` stage's kernels must split evenly along the `model` axis (else they would silently
  stay replicated)."""
  sharded = {i: stage.name for i, stage in enumerate(config.chain.stages) if stage.shard == "model"}
  if config.mesh.model <= 1 or not sharded:
    return
  for path, leaf in jax.tree.leaves_with_path(nnx.state(model, nnx.Param)):
    stage = chain_lib.stage_of_path(path)
    if stage in sharded.values() and len(leaf.shape) >= 2 and leaf.shape[-1] % config.mesh.model:
      index = next(i for i, name in sharded.items() if name == stage)
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ConfigError(f"chain.stages[{index}].shard", f"'model' splits kernels along their output axis, but "
                        f"{name} has {leaf.shape[-1]} outputs, not divisible by mesh.model={config.mesh.model}")


# --------------------------------------------------------------------------------------------
# Memory: what one batch and the train state need, against what the machine has.
# --------------------------------------------------------------------------------------------


def available_memory() -> tuple[int, int | None]:
  """(host bytes, bytes of one accelerator or None where devices share host memory, e.g. CPU).

  Host: physical memory, or a smaller cgroup limit (a container). Device: the allocator's
  `bytes_limit` of the first local device, where JAX reports one.
  """
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(limit_file) as f:
        limit = f.read().strip()
    except OSError:
      continue
    if limit.isdigit() and 0 < int(limit) < host:
      host = int(limit)
  device = None
  try:
    stats = jax.local_devices()[0].memory_stats()
    if stats and stats.get("bytes_limit"):
      device = int(stats["bytes_limit"])
  except Exception:  # a backend without memory statistics: its devices use host memory
    device = None
  return host, device


class _Example:
  """One example's bytes (inputs + labels + mask), how it is described, and the field that sets its size."""

  def __init__(self, input_shape, input_dtype, label_values: int, size_field: str = "", size_value=None):
    input_dtype = np.dtype(input_dtype)
    self.bytes = math.prod(input_shape) * input_dtype.itemsize + 4 * label_values + 4  # float32/int32, mask
    self.describe = f"inputs {tuple(input_shape)} {input_dtype.name} + labels + mask"
    self.size_field, self.size_value = size_field, size_value


def _synthetic_example(config) -> _Example | None:
  """The example of a synthetic task, from the config alone (None for other tasks and bad sizes)."""
  data = config.data
  if data.name == "parity" and data.levels >= 1 and data.d >= 1 and data.levels < 64 and 2**data.levels <= data.d:
    return _Example((data.d,), "float32", 2**data.levels - 1, "data.d", data.d)  # XOR levels 2**(L-1) + .. + 1
  if data.name == "line_parity" and data.num_images >= 1:
    size = line_parity.IMAGE_SIZE
    return _Example((data.num_images, size, size, 1), "float32", data.num_images + 1, "data.num_images",
                    data.num_images)
  return None


def _task_example(config, task) -> _Example:
  labels = sum(math.prod(spec.shape) for spec in task.label_specs)
  size_field = "data.max_len" if config.data.name in data_lib.TEXT else ""
  return _Example(tuple(task.input_shape), task.input_dtype, labels, size_field,
                  config.data.max_len if size_field else None)


def _bytes(n: int) -> str:
  return f"{n} bytes ({n / 1e9:.1f} GB)"


def _need(per_device: int, num_devices: int, memory) -> tuple[int, int, str] | None:
  """(needed, available, description) when `per_device` bytes on every device do not fit, else None."""
  host, device = memory
  if device is not None:
    return (per_device, device, " per device") if per_device > device else None
  total = per_device * num_devices  # devices without memory of their own (CPU) all use host memory
  return (total, host, "") if total > host else None


def _where(memory) -> str:
  return "host memory" if memory[1] is None else "device memory"


def _check_data_memory(config, num_devices: int, example: _Example, memory) -> None:
  """A batch of each kind, per device and on the host, and a synthetic task's held-out set (host)."""
  host = memory[0]
  size_note = f"; the example size is set by {example.size_field}={example.size_value}" if example.size_field else ""
  if example.size_field:  # not even one example per device fits: the example is the problem, not a count
    short = _need(example.bytes, num_devices, memory)
    if short:
      need, available, per = short
      raise ConfigError(example.size_field, f"one example ({example.describe}, {example.size_field}="
                        f"{example.size_value}) is {_bytes(example.bytes)}; one per device needs {_bytes(need)}"
                        f"{per}, more than the {_bytes(available)} of {_where(memory)}")
  for field, kind in (("batch_size", "train"), ("eval_batch_size", "eval")):
    size = config[field]
    head = f"one {kind} batch ({size} examples of {example.bytes} bytes: {example.describe}) needs"
    short = _need(-(-size // num_devices) * example.bytes, num_devices, memory)
    if short:
      need, available, per = short
      raise ConfigError(field, f"{head} {_bytes(need)}{per}, more than the {_bytes(available)} of "
                        f"{_where(memory)}{size_note}")
    if size * example.bytes > host:  # the host assembles every batch before it goes to the devices
      raise ConfigError(field, f"{head} {_bytes(size * example.bytes)}, more than the {_bytes(host)} of host "
                        f"memory{size_note}")
  if config.data.name in ("parity", "line_parity") and config.data.eval_size * example.bytes > host:
    raise ConfigError("data.eval_size", f"the held-out set ({config.data.eval_size} examples of {example.bytes} "
                      f"bytes: {example.describe}) is kept in host memory and needs "
                      f"{_bytes(config.data.eval_size * example.bytes)}, more than the {_bytes(host)} of host "
                      f"memory{size_note}")


def _check_state_memory(config, task, num_devices: int, model, memory) -> None:
  """Parameters + optimizer state from shapes alone (`jax.eval_shape` of `tx.init`: traced, never compiled)."""
  if model is None:
    return
  params = nnx.state(model, nnx.Param)
  leaves = [x for x in jax.tree.leaves(params) if hasattr(x, "shape")]
  param_values = sum(math.prod(x.shape) for x in leaves)
  param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
  try:
    tx = optim_lib.build_optimizer(config.optim, max(config_lib.num_updates(config, getattr(task, "train_size", 0)), 1),
                                   chain_lib.stage_names(config))
    opt_leaves = jax.tree.leaves(jax.eval_shape(tx.init, params))
    opt_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in opt_leaves if hasattr(x, "shape"))
  except (ValueError, TypeError):  # the optimizer's own errors surface when it is built for the run
    opt_bytes = 0
  per_device = -(-(param_bytes + opt_bytes) // config.mesh.model)  # the `model` axis splits the state
  short = _need(per_device, num_devices, memory)
  if short:
    need, available, per = short
    replicas = "" if per else f" ({num_devices} devices x {_bytes(per_device)})"
    raise ConfigError("chain.stages", f"the parameters ({param_values} values) and the {config.optim.optimizer} "
                      f"state need {_bytes(need)}{per}{replicas}, more than the {_bytes(available)} of "
                      f"{_where(memory)} (the {task.name} input is {tuple(task.input_shape)})")
