"""`config.optim` -> one optax `GradientTransformation`, built in one place.

The chain, in order:

    clip_by_global_norm(grad_clip_norm)          # when > 0; the train step accumulates before it
    partition({stage: stage_transform}, labels)  # one optimizer per chain stage
      stage_transform = optimizer(schedule)      # adam | adamw | sgd | lamb | adafactor | lion
                        [-> plateau_scale]       # schedule == "reduce_on_plateau": last, x scale
                      | freeze()                 # per_stage.<stage>.frozen

Labels come from the parameter paths `('stages', <stage name>, ...)` (see
`chain.stage_of_path`). Every schedule is indexed by optimizer updates: update
n (0-based) uses `schedule(n)`. Decoupled weight decay touches only parameters
with `ndim >= 2` (kernels, embeddings), never biases or norm scales.

`OPTIMIZERS` and `SCHEDULES` are the registries (name -> builder) that `config.optim.optimizer`,
`config.optim.schedule` and `per_stage.<stage>` choose from; `validate` checks `config.optim`
against them before anything is built.

Typical use (what the trainer does):

    tx = build_optimizer(config.optim, config.total_steps, chain.stage_names(config))
    schedules = stage_schedules(config.optim, config.total_steps, chain.stage_names(config))
    ...
    opt_state = report_eval_metric(opt_state, eval_metrics[config.optim.plateau_metric])
    lrs = stage_learning_rates(schedules, update, opt_state)   # {"train/lr/<stage>": float}
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from chainjax import chain as chain_lib
from chainjax import config as config_lib
from chainjax.compress import prune as prune_lib
from chainjax.errors import ConfigError

INHERIT = ""  # per_stage string fields (optimizer, schedule): "" = the default's value
INHERIT_FLOAT = -1.0  # per_stage float fields (learning_rate, weight_decay): -1.0 = the default's value

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "PlateauState", "StageOptim", "build_optimizer", "build_schedule", "check_names",
    "decay_mask", "freeze", "per_stage_norms", "plateau_scale", "plateau_scales", "report_eval_metric",
    "resolve_stages", "stage_labels", "stage_learning_rates", "stage_schedules", "uses_plateau", "validate",
]


# --------------------------------------------------------------------------------------------
# Per-stage settings.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageOptim:
  """The optimizer settings of one stage, overrides and `lr_decay_per_stage` applied."""

  optimizer: str
  learning_rate: float
  schedule: str
  weight_decay: float
  frozen: bool


def resolve_stages(optim: ml_collections.ConfigDict, stage_names: tuple[str, ...]) -> dict[str, StageOptim]:
  """Each stage's settings: `per_stage.<stage>` where set, else the default.

  `lr_decay_per_stage` = d gives stage i of n the learning rate `learning_rate * d**(n-1-i)`
  (the last stage keeps `learning_rate`); an explicit `per_stage.<stage>.learning_rate`
  is used as given, without the decay.
  """
  overrides = optim.get("per_stage") or {}
  unknown = sorted(set(overrides.keys()) - set(stage_names))
  if unknown:
    raise ValueError(f"config.optim.per_stage: {', '.join(unknown)} not stage names; "
                     f"stages: {', '.join(stage_names)}")
  n = len(stage_names)
  out = {}
  for i, name in enumerate(stage_names):
    o = overrides.get(name) or {}
    lr = o.get("learning_rate", INHERIT_FLOAT)
    if lr == INHERIT_FLOAT:
      lr = optim.learning_rate * optim.lr_decay_per_stage ** (n - 1 - i)
    weight_decay = o.get("weight_decay", INHERIT_FLOAT)
    out[name] = StageOptim(
        optimizer=o.get("optimizer", INHERIT) or optim.optimizer,
        learning_rate=float(lr),
        schedule=o.get("schedule", INHERIT) or optim.schedule,
        weight_decay=float(optim.weight_decay if weight_decay == INHERIT_FLOAT else weight_decay),
        frozen=bool(o.get("frozen", False)),
    )
  return out


def stage_labels(stage_names: tuple[str, ...]):
  """The `optax.partition` labels fn: every leaf of a chain parameter tree -> its stage name."""
  known = frozenset(stage_names)

  def label(path, _):
    stage = chain_lib.stage_of_path(path)
    if stage not in known:
      raise ValueError(f"parameter {jax.tree_util.keystr(path)} is in no stage of {stage_names}")
    return stage

  return lambda tree: jax.tree.map_with_path(label, tree)


# --------------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------------


def _steps_per_epoch(optim: ml_collections.ConfigDict, from_data: int) -> int:
  return optim.steps_per_epoch or from_data


def _constant(lr: float, optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  del optim, total_steps, steps_per_epoch
  return optax.constant_schedule(lr)


def _warmup_cosine(lr: float, optim: ml_collections.ConfigDict, total_steps: int,
                   steps_per_epoch: int) -> optax.Schedule:
  del steps_per_epoch
  warmup = optim.warmup_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=lr * optim.end_lr_factor)


def _warmup_linear(lr: float, optim: ml_collections.ConfigDict, total_steps: int,
                   steps_per_epoch: int) -> optax.Schedule:
  del steps_per_epoch
  warmup = optim.warmup_steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup),
       optax.linear_schedule(lr, lr * optim.end_lr_factor, max(total_steps - warmup, 1))],
      [warmup])


def _exponential_per_epoch(lr: float, optim: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  del total_steps
  if steps_per_epoch <= 0:
    raise ValueError("config.optim.steps_per_epoch: exponential_per_epoch needs the epoch length; "
                     "the data gives none, so set it > 0")
  return optax.exponential_decay(init_value=lr, transition_steps=steps_per_epoch,
                                 decay_rate=optim.decay_rate, staircase=True)


def _piecewise_constant(lr: float, optim: ml_collections.ConfigDict, total_steps: int,
                        steps_per_epoch: int) -> optax.Schedule:
  del total_steps, steps_per_epoch
  if len(optim.boundaries) != len(optim.scales):
    raise ValueError(f"config.optim.boundaries: {len(optim.boundaries)} boundaries for "
                     f"{len(optim.scales)} scales")
  return optax.piecewise_constant_schedule(
      lr, {int(b): float(s) for b, s in zip(optim.boundaries, optim.scales)})


# `config.optim.schedule` -> fn(peak lr, config.optim, total updates, steps per epoch) -> optax schedule.
SCHEDULES: dict[str, Callable[[float, ml_collections.ConfigDict, int, int], optax.Schedule]] = {
    "constant": _constant,
    "warmup_cosine": _warmup_cosine,
    "warmup_linear": _warmup_linear,
    "exponential_per_epoch": _exponential_per_epoch,
    "piecewise_constant": _piecewise_constant,
    "reduce_on_plateau": _constant,  # the plateau scale lives in the opt state
}


def _schedule(name: str, lr: float, optim: ml_collections.ConfigDict, total_steps: int,
              steps_per_epoch: int) -> optax.Schedule:
  """The schedule `name` peaking at `lr`; the other shape fields come from `optim`."""
  if name not in SCHEDULES:
    raise ValueError(f"config.optim.schedule: unknown {name!r}; allowed: {', '.join(SCHEDULES)}")
  return SCHEDULES[name](lr, optim, total_steps, steps_per_epoch)


def build_schedule(optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int = 0) -> optax.Schedule:
  """The default learning-rate schedule (no per-stage overrides): its value at n is the LR of update n."""
  return _schedule(optim.schedule, optim.learning_rate, optim, total_steps,
                   _steps_per_epoch(optim, steps_per_epoch))


def stage_schedules(optim: ml_collections.ConfigDict, total_steps: int, stage_names: tuple[str, ...],
                    steps_per_epoch: int = 0) -> dict[str, optax.Schedule]:
  """Each stage's LR schedule as `build_optimizer` builds it (0 for frozen stages).

  With `reduce_on_plateau` the LR is additionally multiplied by the plateau scale in
  the optimizer state: `stage_learning_rates` applies it.
  """
  spe = _steps_per_epoch(optim, steps_per_epoch)
  return {name: optax.constant_schedule(0.0) if s.frozen
          else _schedule(s.schedule, s.learning_rate, optim, total_steps, spe)
          for name, s in resolve_stages(optim, stage_names).items()}


# --------------------------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------------------------


def decay_mask(params: Any) -> Any:
  """Weight-decay mask: True for kernels and embeddings (ndim >= 2), False for biases and norm scales."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def freeze() -> optax.GradientTransformation:
  """`optax.set_to_zero`, but the zeros are -0.0: frozen parameters stay bit-identical.

  `apply_updates` computes `p + u`. IEEE -0.0 is the exact additive identity (x + -0.0 is
  x, bit for bit, for every x, -0.0 and NaN included), whereas +0.0 turns a -0.0
  parameter into +0.0 (-0.0 + +0.0 = +0.0). Inside `jit`, XLA happens to fold `x + 0`
  away, but that is an optimisation, not a guarantee (eager `apply_updates` flips it).

  Example:
    >>> params = {"w": jnp.array([-0.0, 1.0])}
    >>> tx = freeze()
    >>> updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    >>> bool(jnp.signbit(optax.apply_updates(params, updates)["w"][0]))
    True
  """

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def _sgd(schedule: optax.Schedule, weight_decay: float, optim: ml_collections.ConfigDict):
  """SGD with momentum; weight decay is decoupled from the momentum (SGDW) and scaled by the LR."""
  parts = []
  if optim.momentum:
    parts.append(optax.trace(decay=optim.momentum, nesterov=optim.nesterov,
                             accumulator_dtype=optim.mu_dtype or None))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def _adam(schedule: optax.Schedule, weight_decay: float, optim: ml_collections.ConfigDict):
  if weight_decay:
    raise ValueError("config.optim.weight_decay: adam has no weight decay; use adamw")
  return optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, mu_dtype=optim.mu_dtype or None)


def _adamw(schedule: optax.Schedule, weight_decay: float, optim: ml_collections.ConfigDict):
  return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=weight_decay,
                     mask=decay_mask, mu_dtype=optim.mu_dtype or None)


def _lamb(schedule: optax.Schedule, weight_decay: float, optim: ml_collections.ConfigDict):
  return optax.lamb(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=weight_decay,
                    mask=decay_mask)


def _adafactor(schedule: optax.Schedule, weight_decay: float, optim: ml_collections.ConfigDict):
  # optax adds adafactor's decay after the LR: the rate is not LR-scaled.
  return optax.adafactor(schedule, weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask,
                         dtype_momentum=optim.mu_dtype or jnp.float32)


def _lion(schedule: optax.Schedule, weight_decay: float, optim: ml_collections.ConfigDict):
  return optax.lion(schedule, b1=optim.b1, b2=optim.b2, weight_decay=weight_decay, mask=decay_mask,
                    mu_dtype=optim.mu_dtype or None)


# `config.optim.optimizer` -> fn(schedule, weight decay, config.optim) -> optax optimizer.
# `optim.mu_dtype` sets the first moment's dtype where optax supports it (adam, adamw, lion,
# sgd's momentum, adafactor's momentum; lamb keeps the parameters' dtype).
OPTIMIZERS: dict[str, Callable[[optax.Schedule, float, ml_collections.ConfigDict], optax.GradientTransformation]] = {
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
    "lamb": _lamb,
    "adafactor": _adafactor,
    "lion": _lion,
}


def _optimizer(name: str, schedule: optax.Schedule, weight_decay: float,
               optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer `name` of `OPTIMIZERS`."""
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optim.optimizer: unknown {name!r}; allowed: {', '.join(OPTIMIZERS)}")
  return OPTIMIZERS[name](schedule, weight_decay, optim)


def _stage_transform(stage: StageOptim, optim: ml_collections.ConfigDict, total_steps: int,
                     steps_per_epoch: int) -> optax.GradientTransformation:
  if stage.frozen:
    return freeze()
  schedule = _schedule(stage.schedule, stage.learning_rate, optim, total_steps, steps_per_epoch)
  tx = _optimizer(stage.optimizer, schedule, stage.weight_decay, optim)
  if stage.schedule == "reduce_on_plateau":
    tx = optax.chain(tx, plateau_scale(optim.plateau_factor, optim.plateau_patience, optim.plateau_min_scale,
                                       optim.plateau_mode, optim.plateau_min_delta))
  return tx


def build_optimizer(optim: ml_collections.ConfigDict, total_steps: int, stage_names: tuple[str, ...],
                    steps_per_epoch: int = 0, prune: ml_collections.ConfigDict | None = None
                    ) -> optax.GradientTransformation:
  """The optimizer of `config.optim` for a run of `total_steps` updates of a chain with `stage_names`.

  `steps_per_epoch` is the data's epoch length in updates (0 = unknown); a non-zero
  `optim.steps_per_epoch` overrides it. `prune` (`config.compress.prune`) wraps each stage
  with a non-zero target in magnitude pruning (`compress.prune.from_config`); frozen stages
  are never pruned.

  Example:
    >>> from chainjax import config as config_lib
    >>> optim_config = config_lib.base_config().optim
    >>> optim_config.per_stage.s0 = config_lib.stage_optim(frozen=True)
    >>> tx = build_optimizer(optim_config, total_steps=100, stage_names=("s0", "s1"))
    >>> params = {"stages": {"s0": {"body": {"w": jnp.ones(2)}}, "s1": {"body": {"w": jnp.ones(2)}}}}
    >>> updates, opt_state = tx.update(params, tx.init(params), params)  # gradients = params here
    >>> [round(float(u[0]), 6) for u in jax.tree.leaves(updates)]  # s0 frozen, s1 adam
    [-0.0, -0.001]
  """
  spe = _steps_per_epoch(optim, steps_per_epoch)
  stage_names = tuple(stage_names)
  stages = resolve_stages(optim, stage_names)
  transforms = {name: _stage_transform(s, optim, total_steps, spe) for name, s in stages.items()}
  if prune is not None:  # each stage's own pruning, around its optimizer (and after its plateau scale)
    for name, target in prune_lib.stage_targets(prune, stage_names).items():
      if target > 0 and not stages[name].frozen:
        transforms[name] = prune_lib.from_config(transforms[name], target, prune, total_steps)
  tx = optax.partition(transforms,
                       stage_labels(stage_names))
  if optim.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
  return tx


# --------------------------------------------------------------------------------------------
# Reduce on plateau.
# --------------------------------------------------------------------------------------------


class PlateauState(NamedTuple):
  """The reduce-on-plateau state; the rule's settings travel with it (as `inject_hyperparams` does)."""

  scale: jax.Array  # [] f32: multiplies every update of its stage
  best: jax.Array  # [] f32: best metric so far; +inf (min) or -inf (max) before the first eval
  bad_evals: jax.Array  # [] i32: evals without improvement since the last improvement or reduction
  factor: jax.Array  # [] f32: scale *= factor after `patience` bad evals
  patience: jax.Array  # [] i32
  min_scale: jax.Array  # [] f32: the scale never drops below this
  min_delta: jax.Array  # [] f32: an improvement must beat `best` by more than this
  maximize: jax.Array  # [] bool: mode == "max"


def plateau_scale(factor: float = 0.5, patience: int = 3, min_scale: float = 0.0, mode: str = "min",
                  min_delta: float = 0.0) -> optax.GradientTransformation:
  """Multiplies updates by `state.scale`, which `report_eval_metric` lowers on a plateau.

  Put it last in the chain. The update itself never changes the state (it runs under
  `jit` every step); evals happen on the host, which calls `report_eval_metric`.

  Example:
    >>> tx = optax.chain(optax.sgd(0.1), plateau_scale(factor=0.5, patience=2))
    >>> params = {"w": jnp.ones(3)}
    >>> opt_state = tx.init(params)
    >>> for loss in (1.0, 1.0, 1.0):  # no improvement after the first eval
    ...   opt_state = report_eval_metric(opt_state, loss)
    >>> float(plateau_scales(opt_state)[""])
    0.5
  """
  if mode not in ("min", "max"):
    raise ValueError(f"config.optim.plateau_mode: {mode!r} is not one of: min, max")

  def init(params):
    del params
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return PlateauState(
        scale=f32(1.0), best=f32(-jnp.inf if mode == "max" else jnp.inf),
        bad_evals=jnp.zeros((), jnp.int32), factor=f32(factor), patience=jnp.asarray(patience, jnp.int32),
        min_scale=f32(min_scale), min_delta=f32(min_delta), maximize=jnp.asarray(mode == "max"))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


@jax.jit
def _plateau_rule(state: PlateauState, value: jax.Array) -> PlateauState:
  """One eval: improvement -> new best; `patience` evals without -> scale *= factor (floored)."""
  gain = jnp.where(state.maximize, value - state.best, state.best - value)
  improved = gain > state.min_delta  # False for NaN
  bad = jnp.where(improved, 0, state.bad_evals + 1)
  reduce = bad >= state.patience
  return state._replace(
      best=jnp.where(improved, value, state.best),
      bad_evals=jnp.where(reduce, 0, bad),
      scale=jnp.where(reduce, jnp.maximum(state.scale * state.factor, state.min_scale), state.scale))


def _is_plateau(x) -> bool:
  return isinstance(x, PlateauState)


def report_eval_metric(opt_state: Any, value: float) -> Any:
  """Applies the reduce-on-plateau rule to every `PlateauState` in `opt_state` (host side, after an eval).

  Returns `opt_state` unchanged when it holds no plateau state.
  """
  value = jnp.float32(value)
  return jax.tree.map(lambda s: _plateau_rule(s, value) if _is_plateau(s) else s, opt_state,
                      is_leaf=_is_plateau)


def _stage_of_state_path(path) -> str:
  """The partition label above a state (`...inner_states[<stage>]...`); "" outside a partition."""
  for prev, key in zip(path, path[1:]):
    if getattr(prev, "name", None) == "inner_states":
      return str(getattr(key, "key", key))
  return ""


def plateau_scales(opt_state: Any) -> dict[str, jax.Array]:
  """`{stage: current plateau scale}` for every stage with `reduce_on_plateau` ("" without stages)."""
  found = jax.tree.leaves_with_path(opt_state, is_leaf=_is_plateau)
  return {_stage_of_state_path(path): s.scale for path, s in found if _is_plateau(s)}


def uses_plateau(optim: ml_collections.ConfigDict) -> bool:
  """Whether any stage uses `reduce_on_plateau` (then report `optim.plateau_metric` after each eval)."""
  schedules = [optim.schedule] + [o.get("schedule", INHERIT) for o in (optim.get("per_stage") or {}).values()]
  return "reduce_on_plateau" in schedules


def stage_learning_rates(schedules: dict[str, optax.Schedule], update: int, opt_state: Any = None,
                         prefix: str = "train/lr") -> dict[str, float]:
  """`{f"{prefix}/{stage}": LR of update `update` (0-based)}`, plateau scale included (host side)."""
  scales = jax.device_get(plateau_scales(opt_state)) if opt_state is not None else {}
  return {f"{prefix}/{name}": float(schedule(update)) * float(scales.get(name, 1.0))
          for name, schedule in schedules.items()}


# --------------------------------------------------------------------------------------------
# Per-stage norms (for logging).
# --------------------------------------------------------------------------------------------


def per_stage_norms(tree: Any, prefix: str) -> dict[str, jax.Array]:
  """`{f"{prefix}/{stage}": global L2 norm of the stage's leaves}` of a chain tree (jit-able, f32).

  Example:
    >>> grads = {"stages": {"s0": {"body": {"w": jnp.full(4, 0.5)}}, "s1": {"head": {"b": jnp.ones(1)}}}}
    >>> {k: float(v) for k, v in per_stage_norms(grads, "train/grad_norm").items()}
    {'train/grad_norm/s0': 1.0, 'train/grad_norm/s1': 1.0}
  """
  squares: dict[str, jax.Array] = {}
  for path, leaf in jax.tree.leaves_with_path(tree):
    stage = chain_lib.stage_of_path(path)
    sq = jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32)))
    squares[stage] = squares[stage] + sq if stage in squares else sq
  return {f"{prefix}/{stage}": jnp.sqrt(sq) for stage, sq in squares.items()}


# --------------------------------------------------------------------------------------------
# Validation of config.optim.
# --------------------------------------------------------------------------------------------


def check_names(optim: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` when `optim.optimizer` or `optim.schedule` is not a name of `OPTIMIZERS` /
  `SCHEDULES` (needs nothing but `config.optim`: run it before the task is opened)."""
  for field, allowed in (("optimizer", tuple(OPTIMIZERS)), ("schedule", tuple(SCHEDULES))):
    if optim[field] not in allowed:
      raise ConfigError(f"optim.{field}", f"{optim[field]!r} is not one of: {', '.join(allowed)}")


def validate(config: ml_collections.ConfigDict, num_updates: int, steps_per_epoch_known: bool,
             task_name: str) -> None:
  """Raises `ConfigError` for the first bad `config.optim` field beyond types and simple ranges.

  Checks the optimizer and schedule names first (`check_names`), then the schedule shapes,
  the plateau rule and the per-stage entries, then what each stage ends up with.
  `num_updates` is the run's optimizer updates (`config.num_updates(config, task.train_size)`);
  `steps_per_epoch_known` says whether the data has epochs (a non-zero `train_size`);
  `task_name` names the task in messages.
  """
  optim = config.optim
  check_names(optim)
  stage_names = [s.name for s in config.chain.stages]
  for field in ("b1", "b2", "momentum"):
    if not 0 <= optim[field] < 1:
      raise ConfigError(f"optim.{field}", f"must be in [0, 1), got {optim[field]!r}")
  for field in ("decay_rate", "lr_decay_per_stage", "plateau_factor"):
    if not 0 < optim[field] <= 1:
      raise ConfigError(f"optim.{field}", f"must be in (0, 1], got {optim[field]!r}")
  if optim.end_lr_factor > 1:  # learning_rate is the peak; the decay ends at learning_rate * end_lr_factor
    raise ConfigError("optim.end_lr_factor", f"must be in [0, 1], got {optim.end_lr_factor!r}")
  if optim.plateau_min_scale > 1:
    raise ConfigError("optim.plateau_min_scale", f"must be in [0, 1], got {optim.plateau_min_scale!r}")
  if not optim.plateau_metric.startswith("eval/"):
    raise ConfigError("optim.plateau_metric", f"{optim.plateau_metric!r} must name an eval metric, e.g. 'eval/loss'")
  boundaries, scales = tuple(optim.boundaries), tuple(optim.scales)
  if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in boundaries):
    raise ConfigError("optim.boundaries", f"must be update counts (ints >= 0), got {boundaries}")
  if any(b >= a for b, a in zip(boundaries, boundaries[1:])):
    raise ConfigError("optim.boundaries", f"must be strictly increasing, got {boundaries}")
  if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0 for s in scales):
    raise ConfigError("optim.scales", f"must be finite numbers >= 0, got {scales}")
  if len(boundaries) != len(scales):
    raise ConfigError("optim.scales", f"has {len(scales)} entries for {len(boundaries)} boundaries")

  # Per-stage entries: known stage names, known and typed fields, "" / -1.0 or a valid value.
  entries = {}
  for name in optim.per_stage.keys():
    field = f"optim.per_stage.{name}"
    if name not in stage_names:
      raise ConfigError(field, f"{name!r} is not a stage name; stages: {', '.join(stage_names)}")
    entry = optim.per_stage[name]
    if not isinstance(entry, ml_collections.ConfigDict):
      raise ConfigError(field, f"must be a ConfigDict (config.stage_optim(...)), got {type(entry).__name__}")
    config_lib.check_schema(entry, config_lib.stage_optim(), field + ".")
    if entry.get("optimizer", "") not in ("",) + tuple(OPTIMIZERS):
      raise ConfigError(f"{field}.optimizer", f"{entry.optimizer!r} is not one of: \"\" (inherit), "
                        f"{', '.join(OPTIMIZERS)}")
    if entry.get("schedule", "") not in ("",) + tuple(SCHEDULES):
      raise ConfigError(f"{field}.schedule", f"{entry.schedule!r} is not one of: \"\" (inherit), "
                        f"{', '.join(SCHEDULES)}")
    if entry.get("learning_rate", INHERIT_FLOAT) != INHERIT_FLOAT and not entry.learning_rate > 0:
      raise ConfigError(f"{field}.learning_rate", f"must be > 0, or -1.0 to inherit, got {entry.learning_rate!r}")
    if entry.get("weight_decay", INHERIT_FLOAT) != INHERIT_FLOAT and not entry.weight_decay >= 0:
      raise ConfigError(f"{field}.weight_decay", f"must be >= 0, or -1.0 to inherit, got {entry.weight_decay!r}")
    entries[name] = entry

  # What each stage ends up with.
  for name in stage_names:
    entry = entries.get(name, {})
    if entry and entry.get("frozen", False):
      continue
    where = f"optim.per_stage.{name}" if entry else "optim"
    optimizer = entry.get("optimizer", INHERIT) if entry else INHERIT
    schedule = entry.get("schedule", INHERIT) if entry else INHERIT
    weight_decay = entry.get("weight_decay", INHERIT_FLOAT) if entry else INHERIT_FLOAT
    optimizer, schedule = optimizer or optim.optimizer, schedule or optim.schedule
    weight_decay = optim.weight_decay if weight_decay == INHERIT_FLOAT else weight_decay
    if optimizer == "adam" and weight_decay > 0:
      field = f"{where}.weight_decay" if entry and entry.get("weight_decay", INHERIT_FLOAT) != INHERIT_FLOAT else (
          f"{where}.optimizer" if entry and entry.get("optimizer", INHERIT) else "optim.weight_decay")
      raise ConfigError(field, f"adam has no weight decay (stage {name!r}); use adamw, lamb, lion, sgd or "
                        "adafactor, or weight_decay=0")
    if schedule in ("warmup_cosine", "warmup_linear") and optim.warmup_steps >= num_updates:
      raise ConfigError("optim.warmup_steps", f"must be < the {num_updates} updates of this run for {schedule}")
    if schedule == "exponential_per_epoch" and optim.steps_per_epoch == 0 and not steps_per_epoch_known:
      raise ConfigError("optim.steps_per_epoch", f"exponential_per_epoch needs the epoch length and the "
                        f"{task_name} task has no epochs (an endless stream): set it > 0")
