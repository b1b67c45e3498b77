"""What compression costs and saves: QAT and pruned train steps, PTQ evaluation, and bytes, as ratios.

  python -m chainjax.data.prepare fashion_mnist     # once, for fashion_mnist_cnn (offline)
  python benchmarks/compression_costs.py [--configs=default,fashion_mnist_cnn] [--steps=200] [--repeats=3]
                                         [--eval_passes=5] [--quick]

For each config of `--configs` (configs/<name>.py), one `experiment.Experiment` per variant (the config
with one compress field changed), timed through `benchmarks/common.py` as the trainer runs it
(`Experiment.update`, the host batch put on the devices every update; `Experiment.evaluate`), and
printed against the float model of the same config measured in the same run:
  QAT w8a8 train step vs float     `compress.qat.rules=("stages/.* w=8 a=8",)`; target <= 1.30x
  pruned 0.8 train step vs dense   `compress.prune.sparsity=0.8`, the config's mask frequency (100
                                   updates); `--steps` a multiple of it, so each timed run holds its
                                   mask updates at their real rate; target <= 1.10x
  PTQ int8 eval vs float eval      one evaluation of the whole eval set with params dequantized from
                                   `ptq.quantize_params(params, 8)` (the dequantization, a jitted
                                   program as `--mode=compress` runs once per evaluation, inside the
                                   timing) vs the float params; report only
  int8 / int4 bytes vs float32     `ptq.total_bytes(ptq.stage_bytes(params))`, per-channel scales and
                                   float biases included; targets <= 0.27x and <= 0.15x (exact, not timed)
Train steps: the trainer's first 8 batches held in host memory and reused, 5 warm-up updates per
variant (compiling is not timed), then `--repeats` runs of `--steps` updates, interleaved across
variants so that drift in the machine's speed hits all alike; the median is reported. The eval set's
batches are held in host memory too; each eval repeat is `--eval_passes` evaluations, interleaved with
the train steps. A config whose TFDS data is not prepared is skipped with one line saying so.
`--quick` (the test's setting): each config's `runlocal` variant, 2 steps x 1 repeat, 1 pass over at
most 2 eval batches.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

_CONFIGS = flags.DEFINE_list("configs", ["default", "fashion_mnist_cnn"], "Configs (configs/<name>.py) to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed train updates per run (after 5 warm-up updates); a multiple of "
                              "compress.prune.frequency (100) holds the mask updates at their real rate.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing repeats per variant; the median is reported.")
_EVAL_PASSES = flags.DEFINE_integer("eval_passes", 5, "Evaluations of the eval set per eval repeat.")
_QUICK = flags.DEFINE_bool("quick", False, "Seconds-long smoke run: runlocal configs, 2 steps x 1 repeat.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows (JSON list, as benchmarks/run.py collects them) here.")

QAT_RULES = ("stages/.* w=8 a=8",)
SPARSITY = 0.8
# Row: (label, target ratio or None for report only).
ROWS = {
    "qat": ("QAT w8a8 train step vs float", 1.30),
    "pruned": (f"pruned {SPARSITY} train step vs dense", 1.10),
    "ptq": ("PTQ int8 eval vs float eval", None),
    "int8": ("int8 bytes vs float32", 0.27),
    "int4": ("int4 bytes vs float32", 0.15),
}


def load_config(name: str, **overrides):
  """configs/<name>.py's config (`runlocal` with `--quick`) with dotted-field `overrides`."""
  config = importlib.import_module(f"configs.{name}").get_config("runlocal" if _QUICK.value else "")
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def bench_config(name: str, steps: int, repeats: int, eval_passes: int) -> list[dict]:
  """Measures one config's variants, prints its table and returns its rows; one line and no rows when its
  data is not prepared."""
  import jax

  from benchmarks import common
  from chainjax import data as data_lib
  from chainjax.compress import ptq
  from chainjax.errors import DataError

  try:
    benches = {"float": common.StepBench(load_config(name)),
               "qat": common.StepBench(load_config(name, **{"compress.qat.rules": QAT_RULES})),
               "pruned": common.StepBench(load_config(name, **{"compress.prune.sparsity": SPARSITY}))}
  except DataError as e:
    print(f"\n{name}: skipped, its data is not prepared: {e}")
    return []
    return
  exp = benches["float"].exp
  batches = benches["float"].train_batches(8)  # the trainer's first batches, the same for every variant
  for bench in benches.values():
    bench.warm_up(batches)

  state = exp.init_state()  # evaluated, never trained (the benches donate theirs)
  eval_batches = list(itertools.islice(exp.task.eval_iterator(exp.config.eval_batch_size,
                                                               data_lib.Shard.of_this_process()),
                                       2 if _QUICK.value else None))
  qparams = ptq.quantize_params(state.params, 8)
  dequantize = jax.jit(lambda q: ptq.dequantize_params(q, exp.abstract_state().params, 8),
                       out_shardings=exp.state_shardings.params)

  def evaluate(ptq_params: bool) -> float:
    start = time.perf_counter()
    with jax.set_mesh(exp.mesh):
      for _ in range(eval_passes):
        params = dequantize(qparams) if ptq_params else state.params
        exp.evaluate(state._replace(params=params), eval_batches)
    return (time.perf_counter() - start) / eval_passes

  for ptq_params in (False, True):  # compiles the eval step and the dequantization: not timed
    evaluate(ptq_params)
  timers = {key: (lambda bench=bench: bench.run(common.cycle(batches, steps)) / steps)
            for key, bench in benches.items()}
  timers |= {"float eval": lambda: evaluate(False), "ptq eval": lambda: evaluate(True)}
  seconds = {key: common.median(values) for key, values in common.interleave(timers, repeats).items()}
  total = ptq.total_bytes(ptq.stage_bytes(jax.device_get(state.params)))

  # key: (measured, baseline, unit)
  measured = {"qat": (seconds["qat"] * 1e3, seconds["float"] * 1e3, "ms"),
              "pruned": (seconds["pruned"] * 1e3, seconds["float"] * 1e3, "ms"),
              "ptq": (seconds["ptq eval"] * 1e3, seconds["float eval"] * 1e3, "ms"),
              "int8": (total["int8"], total["float32"], "B"),
              "int4": (total["int4"], total["float32"], "B")}
  frequency = exp.config.compress.prune.frequency
  print(f"\n{name}: {exp.task.name}, stages {', '.join(exp.stage_names)}, batch {exp.config.batch_size}; "
        f"pruning masks recomputed every {frequency} updates ({steps / frequency:g} per timed run); eval set "
        f"{len(eval_batches)} batches of {exp.config.eval_batch_size}")
  print(f"  {'row':32s} {'measured':>12s} {'baseline':>12s} {'ratio':>7s} {'target':>7s}")
  rows = []
  for key, (label, target) in ROWS.items():
    value, base, unit = measured[key]
    ratio = value / base
    number = (lambda v: f"{v:9.3f} ms") if unit == "ms" else (lambda v: f"{v:10,.0f} B")
    verdict = ("PASS" if ratio <= target else "MISS") if target else ""
    print(f"  {label:32s} {number(value):>12s} {number(base):>12s} {ratio:6.3f}x "
          f"{(f'<={target:.2f}x' if target else 'report'):>7s} {verdict}".rstrip())
    rows.append(common.row(f"{name}: {label}", value, base, "float" if unit == "ms" else "float32 bytes",
                           unit="ms" if unit == "ms" else "bytes", target=target, better="lower"))
  return rows


def main(argv):
  del argv
  import jax

  from benchmarks import common

  unknown = [n for n in _CONFIGS.value if not os.path.exists(os.path.join(os.path.dirname(HERE), "configs", f"{n}.py"))]
  if unknown:
    sys.exit(f"compression_costs: no configs/<name>.py for --configs {', '.join(unknown)}")
  steps, repeats, passes = (2, 1, 1) if _QUICK.value else (_STEPS.value, _REPEATS.value, _EVAL_PASSES.value)
  print(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs; "
        f"{steps} train updates x {repeats} repeats, {passes} eval pass(es) per repeat (median)"
        f"{'; --quick: runlocal configs' if _QUICK.value else ''}")
  rows = []
  for name in _CONFIGS.value:
    rows += bench_config(name, steps, repeats, passes)
  common.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
