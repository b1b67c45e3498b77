"""`--mode=diagnose`: the signal-to-noise ratio of every stage's gradient under each chain mode.

Shalev-Shwartz, Shamir & Shammah (2017, "Failures of gradient-based deep learning", sec. 3, fig. 5)
explain why end-to-end training fails on the parity of k line images (`configs/line_parity.py`): the
signal in its gradient sinks below the noise (below float32 resolution for k >= 3), while the gradient of
the decomposition (here `deep_supervision`) keeps a roughly constant SNR. This module measures that SNR
for every stage of any chain under every chain mode, on the same parameters and the same batches, so the
modes differ only in what they are: which loss terms count and where the gradient stops (`chain.MODES`).

Definition. For the parameters theta_s of stage s (its body and head), chain mode m and one of its phases,
let g_b = d L_m(theta; batch b) / d theta_s be the gradient of the mode's objective (the loss `ChainLoss`
computes for the phase: the mean over the batch's examples, stop_gradients where the mode cuts) on the
training batch b, for b = 1..N. Then

    mean      g_bar = (1/N) sum_b g_b
    signal    S = ||g_bar||^2
    noise     V = 1/(N-1) sum_b ||g_b - g_bar||^2   (the unbiased estimate of E||g - E g||^2, the trace of
                                                     the covariance of one batch's gradient)
    snr       S / V;   snr_db = 10 log10(snr);   log10_snr = log10(snr)

Since E[S] = ||E g||^2 + E||g - E g||^2 / N, the plain `snr` is about 1/N (the `noise_floor`) even where
the gradient has no signal at all; `snr_unbiased` = S / V - 1/N = (S - V/N) / V removes that bias (its
numerator is an unbiased estimate of ||E g||^2, the U-statistic of the pairs of different batches). It
scatters around 0 (and may be negative: dB and log10 are then null) where the signal is below what N
batches resolve; more batches (`diagnostics.num_batches`) lower that limit.

Rows: one per (mode, phase, stage that the phase trains). The one-phase modes (end_to_end,
deep_supervision, decoupled) have a row for every stage; progressive has one for stage j from its phase j
(the only phase that trains it); progressive_finetune has those and a row per stage from its fine-tuning
phase. Objectives that are the same (progressive's phase j and progressive_finetune's) are computed once.

Parameters (`diagnostics.step`): -1 = the workdir's newest good checkpoint, or the initial parameters
(`config.seed`, or `compress.init_from`) when it has none; 0 = the initial parameters; k = the checkpoint
of step k. Batches: the N training batches of the run's own pipeline from the parameters' step on (the
ones the run trains on next when `diagnostics.batch_size` is 0, i.e. the run's), with the dropout keys of
those steps, so the estimate is a function of the config and the parameters. Each gradient is one
float32 forward and backward pass on the whole batch (BatchNorm on the batch's statistics, as in training;
whatever `precision.policy` and `optim.accum_steps` say); the statistics accumulate on the host in
float64 (Welford's update, no cancellation where the signal dominates).

Written to `W/diagnostics/snr.json` (atomically) and printed as a table, one line per row. The
workdir's checkpoints are only read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from chainjax import chain as chain_lib
from chainjax import checkpoint as checkpoint_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import experiment as experiment_lib
from chainjax import metrics as metrics_lib
from chainjax import precision
from chainjax import predict
from chainjax.compress import quant
from chainjax.errors import ConfigError

REPORT_DIR = "diagnostics"
REPORT = "snr.json"
FLOAT32_EPS = float(np.finfo(np.float32).eps)
DEFINITION = ("g_b: the gradient of the mode's objective w.r.t. the stage's parameters on training batch b "
              "(b = 1..N); signal = ||mean_b g_b||^2; noise = sum_b ||g_b - mean||^2 / (N - 1); snr = signal / "
              "noise; snr_db = 10 log10(snr); log10_snr = log10(snr); snr_unbiased = snr - 1/N (its numerator "
              "signal - noise/N is unbiased for ||E g||^2); noise_floor = 1/N (the expected snr of a gradient "
              "without signal)")


# --------------------------------------------------------------------------------------------
# The estimator.
# --------------------------------------------------------------------------------------------


class GradientStats:
  """The running mean and spread of one stage's per-batch gradients (flattened), in float64.

  Welford's update: `mean` and `sq_dev` (the sum of squared deviations from the running mean) stay
  exact to float64 rounding whatever the ratio of signal to noise, where sum-of-squares formulas cancel.
  """

  def __init__(self, size: int):
    self.count = 0
    self.mean = np.zeros(size, np.float64)
    self.sq_dev = 0.0

  def add(self, gradient: np.ndarray) -> None:
    g = np.asarray(gradient, np.float64).reshape(-1)
    self.count += 1
    delta = g - self.mean
    self.mean += delta / self.count
    self.sq_dev += float(np.dot(delta, g - self.mean))

  @property
  def signal(self) -> float:
    """||mean gradient||^2."""
    return float(np.dot(self.mean, self.mean))

  @property
  def noise(self) -> float:
    """The mean squared deviation of a batch's gradient from the mean, with N - 1 (unbiased)."""
    if self.count < 2:
      raise ValueError(f"the spread of gradients needs at least 2 batches, got {self.count}")
    return self.sq_dev / (self.count - 1)

  def summary(self) -> dict[str, Any]:
    """`signal`, `noise` and the SNR fields of the module docstring (None where undefined or not finite)."""
    return snr_fields(self.signal, self.noise, self.count)


def snr_fields(signal: float, noise: float, num_batches: int) -> dict[str, Any]:
  """The SNR of `signal` and `noise` (see the module docstring) from `num_batches` batches, as JSON numbers.

  A quantity that is undefined (no noise, a non-positive ratio in dB) or not finite is None.
  """
  def number(x):
    return float(x) if x is not None and math.isfinite(x) else None

  def log10(x):
    return math.log10(x) if x is not None and math.isfinite(x) and x > 0 else None

  snr = signal / noise if noise > 0 else None
  unbiased = snr - 1.0 / num_batches if snr is not None else None
  db = lambda x: None if log10(x) is None else 10.0 * log10(x)
  return {"signal": number(signal), "noise": number(noise), "snr": number(snr), "snr_db": number(db(snr)),
          "log10_snr": number(log10(snr)), "snr_unbiased": number(unbiased), "snr_unbiased_db": number(db(unbiased)),
          "log10_snr_unbiased": number(log10(unbiased))}


# --------------------------------------------------------------------------------------------
# Modes, their phases, and one batch's gradient.
# --------------------------------------------------------------------------------------------


def resolve_modes(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], dict[str, str]]:
  """(the modes to measure, {mode left out: why}) from `config.diagnostics.modes`.

  Entries may be comma-separated (`--config.diagnostics.modes=end_to_end,decoupled` arrives as one string).
  Empty: every mode of `chain.MODES`, less those that need a head on a stage that has none (listed with the
  reason). A named mode that is unknown, or that needs a head the chain lacks, is a `ConfigError`.
  """
  named = [name.strip() for entry in config.diagnostics.modes for name in str(entry).split(",") if name.strip()]
  if len(set(named)) != len(named):
    raise ConfigError("diagnostics.modes", f"names a mode twice: {tuple(named)}")
  for name in named:
    if name not in chain_lib.MODES:
      raise ConfigError("diagnostics.modes", f"{name!r} is not one of: {', '.join(chain_lib.MODES)}")
  headless = [i for i, stage in enumerate(config.chain.stages) if not stage.head.enabled]
  modes, skipped = [], {}
  for name in named or chain_lib.MODES:
    mode = chain_lib.MODES[name]
    if mode.every_head and headless:
      why = f"{name} mode {mode.every_head} (chain.stages[{headless[0]}] has no head)"
      if named:
        raise ConfigError("diagnostics.modes", why)
      skipped[name] = why
    else:
      modes.append(name)
  return tuple(modes), skipped


@dataclasses.dataclass(frozen=True)
class Objective:
  """One phase of a chain mode, as its gradient sees it: `key` is equal for phases with the same gradient."""

  mode: str
  phase: int
  mode_phase: chain_lib.ModePhase
  key: tuple

  def trained(self, num_stages: int) -> tuple[int, ...]:
    return tuple(i for i in range(num_stages) if self.mode_phase.trains(i))


def objectives(modes: Sequence[str], num_stages: int, consistency_weight: float = 0.0) -> tuple[Objective, ...]:
  """Every phase of every mode in `modes`, in order. Two phases share a `key` when their gradients are the
  same function (the same rule and stage, and the same consistency term where there is one)."""
  out = []
  for name in modes:
    mode = chain_lib.get_mode(name)
    consistency = mode.consistency if consistency_weight and mode.consistency != "off" else "off"
    for index, phase in enumerate(mode.phases(num_stages)):
      out.append(Objective(name, index, phase, (phase.rule, phase.stage, consistency)))
  return tuple(out)


def gradient_fn(exp: experiment_lib.Experiment, objective: Objective, quantized: bool = True) -> Callable:
  """Jitted `(params, rest, batch, key) -> gradients` (a tree like `params`) of one phase of a mode.

  The objective of `experiment.make_train_step` for that mode and phase (the chain's forward pass with the
  mode's cuts and `train=True`, the mode's `ChainLoss`), in float32, without loss scaling; the updated
  BatchNorm statistics are dropped.
  """
  policy = precision.get_policy("float32")
  loss_fn = dataclasses.replace(exp.loss_fn, mode=chain_lib.get_mode(objective.mode))
  mode, phase, graphdef = loss_fn.mode, objective.phase, exp.graphdef

  def gradients(params, rest, batch, key):
    def loss(params):
      model = nnx.merge(graphdef, policy.cast_to_compute(params), rest, copy=True)
      with quant.enabled(quantized):
        output = model(policy.cast_to_compute(batch["inputs"]), mode=mode, train=True, key=key, phase=phase)
      value, _ = loss_fn(experiment_lib._cast_predictions(output, policy),  # pylint: disable=protected-access
                         batch["labels"], batch["mask"], phase=phase)
      return value

    return jax.grad(loss)(params)

  return jax.jit(gradients, out_shardings=exp.state_shardings.params)


def stage_vectors(grads: Any, stage_names: Sequence[str]) -> dict[str, np.ndarray]:
  """A gradient tree (host arrays) -> {stage name: its leaves flattened and joined, in tree order}."""
  parts: dict[str, list[np.ndarray]] = {name: [] for name in stage_names}
  for path, leaf in jax.tree.leaves_with_path(grads):
    parts[chain_lib.stage_of_path(path)].append(np.asarray(leaf).reshape(-1))
  return {name: np.concatenate(p) if p else np.zeros(0, np.float32) for name, p in parts.items()}


# --------------------------------------------------------------------------------------------
# The estimate over N batches.
# --------------------------------------------------------------------------------------------


def estimate(exp: experiment_lib.Experiment, params, rest, batches, modes: Sequence[str], *, first_step: int = 0,
             quantized: bool = True, heartbeat: Callable[[], None] = lambda: None) -> list[dict]:
  """The rows of the report (module docstring) for `modes` at (`params`, `rest`) over `batches`.

  `batches`: N >= 2 process-local training batches (numpy, as the task's iterator gives them), all of
  one global size; batch b gets the dropout key of update `first_step + b` of the run. Every objective
  sees the same batches.
  """
  objs = objectives(modes, exp.num_stages, exp.loss_fn.consistency_weight)
  programs = {}
  for obj in objs:
    if obj.key not in programs:
      programs[obj.key] = gradient_fn(exp, obj, quantized)
  names = exp.stage_names
  stats: dict[tuple, dict[str, GradientStats]] = {}
  base_key = jax.random.fold_in(jax.random.key(exp.config.seed), 1)  # as `experiment.make_train_step`
  count = 0
  with jax.set_mesh(exp.mesh):
    for b, local_batch in enumerate(batches):
      size = len(local_batch["mask"]) * jax.process_count()
      batch = exp.put_batch(local_batch, size)
      key = jax.random.fold_in(base_key, first_step + b)
      for program_key, program in programs.items():
        vectors = stage_vectors(experiment_lib.host_arrays(program(params, rest, batch, key)), names)
        per_stage = stats.setdefault(program_key, {name: GradientStats(len(v)) for name, v in vectors.items()})
        for name, vector in vectors.items():
          per_stage[name].add(vector)
        heartbeat()
      count += 1
  if count < 2:
    raise ValueError(f"the gradient SNR needs at least 2 batches, got {count}")
  rows = []
  for obj in objs:
    weights = dataclasses.replace(exp.loss_fn, mode=chain_lib.get_mode(obj.mode)).active_weights(obj.phase)
    terms = [names[i] for i, w in enumerate(weights) if w]
    cuts = [names[i] for i in range(exp.num_stages) if obj.mode_phase.cuts_before(i)]
    for i in obj.trained(exp.num_stages):
      s = stats[obj.key][names[i]]
      rows.append({"mode": obj.mode, "phase": obj.phase, "stage": names[i], "stage_index": i + 1,
                   "num_params": int(s.mean.size), "loss_terms": terms, "gradient_stops_before": cuts,
                   **s.summary()})
  return rows


def training_batches(exp: experiment_lib.Experiment, step: int, num_batches: int, batch_size: int) -> list:
  """This process's rows of `num_batches` global training batches of `batch_size` from the run's pipeline,
  from batch `step` on (where a run at `step` continues, when `batch_size` is the run's)."""
  train_iter = exp.task.train_iterator(batch_size, data_lib.Shard.of_this_process())
  train_iter.set_state(data_lib.base.iterator_state_at(train_iter, step))
  return [next(train_iter) for _ in range(num_batches)]


# --------------------------------------------------------------------------------------------
# The parameters, the report.
# --------------------------------------------------------------------------------------------


def checkpoint_steps(workdir: str) -> list[int]:
  """The step folders of `W/checkpoints`, sorted (none when it does not exist)."""
  directory = epath.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def check_step(workdir: str, step: int) -> list[int]:
  """The workdir's checkpoint steps; a `ConfigError` for `diagnostics.step` when it names a step not among them."""
  steps = checkpoint_steps(workdir)
  if step > 0 and step not in steps:
    raise ConfigError("diagnostics.step", f"{workdir} has no checkpoint at step {step}; its checkpoints: "
                      f"{', '.join(map(str, steps)) or 'none'} (-1 = the newest, 0 = the initial parameters)")
  return steps


def parameters(exp: experiment_lib.Experiment, workdir: str, step: int) -> tuple[int, str, Any, Any]:
  """(step, "initialization" | "checkpoint", params, rest) as `diagnostics.step` chooses (module docstring)."""
  steps = check_step(workdir, step)
  if step == 0 or not steps:
    state = exp.init_state()
    return 0, "initialization", state.params, state.rest
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    if step > 0:  # `Experiment.restore` of that step alone, with every check of a restore
      checkpointer._manager = predict._OneStep(checkpointer._manager, step)  # pylint: disable=protected-access
    restored = exp.restore(checkpointer, params_only=True)
  finally:
    checkpointer.close()
  if restored is None:
    which = f"the checkpoint at step {step} does not" if step > 0 else "no checkpoint"
    raise ValueError(f"{which} of {workdir} restores (incomplete or unreadable)")
  return restored[0], "checkpoint", restored[1].params, restored[1].rest


def diagnose(config: ml_collections.ConfigDict, workdir: str, heartbeat: Callable[[], None] = lambda: None) -> dict:
  """Runs `--mode=diagnose` on `workdir` (see the module docstring); returns the report.

  Raises `ConfigError` naming the `diagnostics` field for a bad mode name, `num_batches` < 2 or a step
  without a checkpoint (before anything is computed).
  """
  start = time.perf_counter()
  config_lib.validate(config, jax.device_count())
  modes, skipped = resolve_modes(config)
  settings = config.diagnostics
  check_step(workdir, settings.step)  # before the experiment is built: a wrong step costs nothing
  exp = experiment_lib.Experiment(config, workdir=workdir)
  batch_size = settings.batch_size or exp.config.batch_size
  train_size = getattr(exp.task, "train_size", 0)
  if train_size and batch_size > train_size:
    raise ConfigError("diagnostics.batch_size" if settings.batch_size else "batch_size",
                      f"{batch_size} is larger than the {train_size} training examples of {exp.task.name}")
  step, source, params, rest = parameters(exp, workdir, settings.step)
  batches = training_batches(exp, step, settings.num_batches, batch_size)
  rows = estimate(exp, params, rest, batches, modes, first_step=step, quantized=step >= exp.qat_start,
                  heartbeat=heartbeat)
  result = {
      "workdir": workdir if "://" in workdir else os.path.abspath(workdir), "step": step, "source": source,
      "task": exp.task.name, "stages": list(exp.stage_names), "modes": list(modes), "skipped_modes": skipped,
      "num_batches": settings.num_batches, "batch_size": batch_size, "first_batch": step,
      "noise_floor": 1.0 / settings.num_batches, "float32_eps": FLOAT32_EPS, "definition": DEFINITION,
      "rows": rows, "seconds": round(time.perf_counter() - start, 1),
  }
  if jax.process_index() == 0:
    out = epath.Path(workdir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    metrics_lib.write_atomically(out / REPORT, json.dumps(result, indent=2))
    print(summary(result), flush=True)
  return result


def summary(result: dict) -> str:
  """The table printed at the end: one line per (mode, phase, stage)."""
  lines = [f"Gradient SNR at step {result['step']} ({result['source']}) of {result['workdir']}: "
           f"{result['num_batches']} training batches of {result['batch_size']} from batch {result['first_batch']}; "
           f"noise floor 1/N = {result['noise_floor']:.3g}",
           f"  {'mode':<21} {'phase':>5} {'stage':<12} {'params':>9} {'signal':>10} {'noise':>10} {'snr':>10} "
           f"{'snr dB':>8} {'unbiased dB':>11}"]
  for row in result["rows"]:
    lines.append(f"  {row['mode']:<21} {row['phase']:>5} {row['stage']:<12} {row['num_params']:>9} "
                 f"{_cell(row['signal'], 10, '.3e')} {_cell(row['noise'], 10, '.3e')} {_cell(row['snr'], 10, '.3e')} "
                 f"{_cell(row['snr_db'], 8, '.2f')} {_cell(row['snr_unbiased_db'], 11, '.2f')}")
  for name, why in result["skipped_modes"].items():
    lines.append(f"  (left out: {why})")
  return "\n".join(lines)


def _cell(value: float | None, width: int, spec: str) -> str:
  """A right-aligned number of the table, "-" where it is undefined."""
  return f"{'-' if value is None else format(value, spec):>{width}}"


__all__ = ["DEFINITION", "REPORT", "REPORT_DIR", "GradientStats", "Objective", "check_step", "checkpoint_steps",
           "diagnose", "estimate", "gradient_fn", "objectives", "parameters", "resolve_modes", "snr_fields",
           "stage_vectors", "summary", "training_batches"]
