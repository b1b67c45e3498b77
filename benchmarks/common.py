"""What every benchmark shares: the trainer's step from a config, fed and timed as the trainer runs it.

A benchmark builds no step of its own. `StepBench(config)` builds an `experiment.Experiment`
from the config it benchmarks (validation, task, mesh over all of this process's devices,
precision policy, stage names, optimizer with loss scaling and accumulation, shardings) and
times that experiment's `Phase.train_step`, the very jitted program `train.train_and_evaluate`
calls, through `Experiment.update`, the very update the trainer's loop runs: the process-local
numpy batch goes to the devices on every update (inside the timing), `accum_impl="optax"`
makes one update `accum_steps` calls on micro-batches, and every call goes through the
experiment's `parallel.DispatchWindow` (8 fake CPU devices deadlock without it).

    bench = common.StepBench(config)              # phase 0 of the config's chain mode
    batches = bench.train_batches(8)              # the trainer's first 8 batches (numpy, this process's rows)
    bench.warm_up(batches)                        # compiles + a few updates, not timed
    seconds = bench.run(common.cycle(batches, 100))   # 100 updates, waits for the last one
    times = common.interleave({"a": lambda: ..., "b": lambda: ...}, repeats=3)
    common.median(times["a"])                     # each benchmark reports the median of its repeats

`bench.state` is the train state after the updates run so far (a `TrainState`), so a test can
check that `bench.run(bench.train_batches(3))` ends where three updates of the trainer end.
"""

from __future__ import annotations

import collections
import glob
import itertools
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator


import jax
import ml_collections
import numpy as np

from chainjax import data as data_lib
from chainjax import experiment as experiment_lib

WARM_UP_UPDATES = 5


def build_experiment(config: ml_collections.ConfigDict) -> experiment_lib.Experiment:
  """The experiment of `config` (validated: a bad config raises `ConfigError`, as in training)."""
  return experiment_lib.Experiment(config)


class StepBench:
  """The trainer's train step of one config, with its own train state, ready to be timed.

  `phase`: the index of the chain mode's phase whose step is timed (0: the only one of
  `deep_supervision` and `end_to_end`). Its step keeps being used past the phase's last update
  (the LR schedules hold their final value), so a benchmark may run any number of updates.
  """

  def __init__(self, config: ml_collections.ConfigDict, phase: int = 0,
               exp: experiment_lib.Experiment | None = None):
    self.exp = exp or build_experiment(config)
    self.config = self.exp.config
    self.phase = self.exp.phases[phase]
    self.state = self.exp.init_state()
    if phase > 0:  # as the trainer enters a later phase: a fresh optimizer, the loss scale carried on
      self.state = self.exp.enter_phase(self.state, self.phase)
    self.sums = self.phase.zero_sums()
    self.metrics = None
    self.compiled = False

  def train_iterator(self) -> data_lib.base.InputIterator:
    """A fresh copy of the trainer's input: `task.train_iterator(batch_size, Shard.of_this_process())`."""
    return self.exp.task.train_iterator(self.config.batch_size, data_lib.Shard.of_this_process())

  def train_batches(self, n: int) -> list:
    """The trainer's first `n` batches (this process's rows, numpy), held in host memory."""
    return list(itertools.islice(self.train_iterator(), n))

  def run(self, batches: Iterable) -> float:
    """One update per batch of `batches` (process-local numpy); seconds until the last update is done.

    The wall time covers fetching each batch from `batches` (an iterator: the input pipeline),
    putting it on the devices and the step, and waiting for the last step's state and metrics.
    """
    state, sums, metrics = self.state, self.sums, self.metrics
    start = time.perf_counter()
    with jax.set_mesh(self.exp.mesh):
      for batch in batches:
        state, sums, metrics = self.exp.update(self.phase, state, sums, batch)
      jax.block_until_ready((state, sums, metrics))
      self.exp.window.wait()
    seconds = time.perf_counter() - start
    self.state, self.sums, self.metrics = state, sums, metrics
    return seconds

  def warm_up(self, batches: list, updates: int = WARM_UP_UPDATES) -> None:
    """Compiles the step and runs `updates` updates (going round `batches`), none of it timed."""
    self.run(cycle(batches, updates))
    self.compiled = True

  def compiled_step(self, local_batch):
    """The compiled train step (`jax.stages.Compiled`) for `local_batch`: one call of it, on micro-batch 0
    with `accum_impl="optax"`. Lowered with the current state and sums after `warm_up`, so the program
    is the cached one, not a second compile; nothing is donated or run."""
    exp = self.exp
    with jax.set_mesh(exp.mesh):
      if exp.accum_by_optax:
        a = exp.config.optim.accum_steps
        micro = jax.tree.map(lambda x: x[0::a], local_batch)
        denominator = exp.micro_denominator(exp.put_batch(local_batch["mask"]))
        args = (exp.put_batch(micro, exp.config.batch_size // a), denominator, np.int32(0))
      else:
        args = (exp.put_batch(local_batch),)
      return self.phase.train_step.lower(self.state, self.sums, *args).compile()

  def flops(self, local_batch) -> float:
    """FLOPs of one call of the compiled step, as XLA's cost analysis counts them (NaN where the backend
    does not say)."""
    cost = self.compiled_step(local_batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")

  def hlo_text(self, local_batch) -> str:
    """The compiled step's optimized HLO."""
    return self.compiled_step(local_batch).as_text()

  def temp_bytes(self, local_batch) -> float:
    """The compiled step's temporary buffers (bytes; NaN where the backend does not say)."""
    memory = self.compiled_step(local_batch).memory_analysis()
    return float(memory.temp_size_in_bytes) if memory is not None else float("nan")


def row(name: str, ours: float, baseline: float | None, baseline_name: str, *, unit: str = "examples/s",
        target: float | None = None, better: str = "higher", samples: list[float] | None = None, **extra) -> dict:
  """One row of the benchmark table (`python -m benchmarks.run`), as every benchmark's `--json` writes it.

  `ours` and `baseline` are in `unit`, measured in the same run; `ratio` = ours / baseline; `target` is
  the ratio to reach: at least it where `better` is "higher" (a speed), at most where "lower" (a time, a
  size). `samples`: `ours` over the timed windows (its min and max are reported).
  """
  ratio = ours / baseline if baseline else None
  met = None if target is None or ratio is None else (ratio >= target if better == "higher" else ratio <= target)
  return {"name": name, "ours": ours, "baseline": baseline, "baseline_name": baseline_name, "unit": unit,
          "ratio": ratio, "target": target, "better": better, "met": met,
          "min": min(samples) if samples else None, "max": max(samples) if samples else None, **extra}


def write_json(path: str | None, rows: list[dict]) -> None:
  """The rows as a JSON list (nothing when `path` is None)."""
  if path:
    with open(path, "w") as f:
      json.dump(rows, f, indent=2)


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
  """This machine's float32 matmul speed through XLA, GFLOP/s: an [n, n] @ [n, n] on the default device,
  the best of `repeats` (the reference a model's FLOP rate is read against)."""
  a = jax.random.normal(jax.random.key(0), (n, n), np.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e9


def top_operations(bench: StepBench, batches: list, steps: int = 5, top: int = 10) -> list[dict]:
  """Where `steps` updates of `bench` spend their time: a `jax.profiler` trace of them (the same trace as
  `config.profile_steps` writes for TensorBoard), read back with `jax.profiler.ProfileData`: the events of
  XLA's operations (the compiled program's fusions, convolutions, copies... by their HLO names; not the
  runtime's own events nor Python's) summed by name, the `top` longest first:
  [{"name", "ms_per_update", "share", "what"}], share of all the operations' time ("what": the result shape
  and the JAX operation, from the compiled HLO). A loop (`while`) counts its body's operations too, so shares
  overlap there.
  """
  if not bench.compiled:
    bench.warm_up(batches)
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir)
    try:
      bench.run(cycle(batches, steps))
    finally:
      jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb"))
    profile = jax.profiler.ProfileData.from_file(path)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in profile.planes:
      if not plane.name.startswith("/host:"):
        continue
      for line in plane.lines:
        if line.name.lower() == "python":  # the Python tracer's frames
          continue
        for event in line.events:  # XLA's ops (fusion.12, convolution.3, copy.7, ...), not the runtime's own
          if "::" not in event.name and not event.name.startswith(("$", "PjitFunction")):
            totals[event.name] += event.duration_ns
  total = sum(totals.values()) or 1.0
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  what = _hlo_ops(bench.hlo_text(batches[0]))
  return [{"name": name, "ms_per_update": ns / 1e6 / steps, "share": ns / total, "what": what.get(name, "")}
          for name, ns in ranked]


_HLO_OP = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?metadata=\{op_name="(?:jit\([^)]*\)/)?([^"]+)"', re.M)


def _hlo_ops(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: "<result shape> <the JAX operation it comes from>"} of a compiled program's text,
  e.g. "f32[16,3,3,32] transpose(jvp())/conv_general_dilated" (a convolution's kernel gradient)."""
  return {name: f"{re.sub(r'[{].*[}]', '', shape)} {op}" for name, shape, op in _HLO_OP.findall(hlo_text)}


def print_top_operations(rows: list[dict]) -> None:
  """The "top_operations" of each row that has them, as a short table per row."""
  for r in rows:
    if r.get("top_operations"):
      print(f"\nTop operations of {r['name']} (a profile of 5 updates):")
      for op in r["top_operations"]:
        print(f"  {op['ms_per_update']:9.3f} ms/update {op['share']:6.1%}  {op['name']:32s} {op.get('what', '')}")


def cycle(batches: list, n: int) -> Iterator:
  """`n` batches, going round `batches` (in-memory batches, reused as the old benchmarks did)."""
  return itertools.islice(itertools.cycle(batches), n)


def interleave(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
  """Calls every timer once per repeat, in turn, so that drift in the machine's speed hits all alike."""
  times: dict[str, list[float]] = {name: [] for name in timers}
  for _ in range(repeats):
    for name, timer in timers.items():
      times[name].append(timer())
  return times


def median(values: list[float]) -> float:
  return statistics.median(values)


def seconds_per_update(bench: StepBench, batches: list, steps: int, repeats: int) -> list[float]:
  """Warm-up (compile excluded), then `repeats` runs of `steps` updates over in-memory `batches`:
  seconds per update of each run."""
  if not bench.compiled:
    bench.warm_up(batches)
  return [bench.run(cycle(batches, steps)) / steps for _ in range(repeats)]
