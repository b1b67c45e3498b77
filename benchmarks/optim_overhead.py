"""Overhead of the optimizer-side features, as ratios measured in one run on this machine.

  python benchmarks/optim_overhead.py [--steps=100] [--repeats=5] [--batch_size=256] [--width=1024]
                                     [--variants=plain,scan,multisteps,dynamic,bf16]

Times the trainer's step (`Phase.train_step` of an `experiment.Experiment`, through
`benchmarks/common.py`) for the default config's chain (parity, 3 MLP stages of `--width`), one
Experiment per variant (the default config with one field changed), and prints, against the
plain step on the same global batch:
  accum_steps=4 (scan inside the step)      target <= 1.10x step time
  accum_steps=4 (optax.MultiSteps, 4 calls)  reported, with compiled temp memory of both
  dynamic loss scaling vs none               target <= 1.05x
  bf16 compute vs fp32 (CPU; report only)
Each update is what the trainer runs: the host batch put on the devices with `exp.put_batch`
(all of this process's devices) and, with `accum_impl="optax"`, one call per micro-batch. The
8 batches the trainer starts with are held in host memory and reused. Variants are interleaved
`--repeats` times after 5 warm-up updates each (compiling is not timed); the median is reported.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_STEPS = flags.DEFINE_integer("steps", 100, "Timed train steps per variant (after 5 warm-up steps).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_WIDTH = flags.DEFINE_integer("width", 1024, "MLP width of each stage.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing repeats per variant; the median is reported.")
_QUICK = flags.DEFINE_bool("quick", False, "Seconds-long smoke run: width 64, batch 64, 3 steps x 1 repeat.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows (JSON list, as benchmarks/run.py collects them) here.")

# --variants key: (row name, config overrides, target ratio or None). "plain" is the baseline.
VARIANTS = {
    "plain": ("plain fp32 step", {}, None),
    "scan": ("accum_steps=4, scan", {"optim.accum_steps": 4}, 1.10),
    "multisteps": ("accum_steps=4, optax.MultiSteps", {"optim.accum_steps": 4, "optim.accum_impl": "optax"}, None),
    "dynamic": ("dynamic loss scale", {"precision.loss_scale": "dynamic"}, 1.05),
    "bf16": ("bf16 compute", {"precision.policy": "params=float32,compute=bfloat16,output=float32"}, None),
}
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Variants to time, of {', '.join(VARIANTS)}; the "
                              "plain step is always timed (the baseline).")


def make_config(**overrides):
  """The default config at `--batch_size` with `--width` MLP stages and dotted-field `overrides`."""
  from chainjax import stages
  from configs import default

  config = default.get_config()
  config.batch_size = 64 if _QUICK.value else _BATCH.value
  width = 64 if _QUICK.value else _WIDTH.value
  config.chain.stages = [stages.stage_config("mlp", name=f"level{i}", features=width, depth=1)
                         for i in (1, 2, 3)]
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def main(argv):
  del argv
  import jax

  from benchmarks import common

  steps, repeats = (3, 1) if _QUICK.value else (_STEPS.value, _REPEATS.value)
  print(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s); batch "
        f"{make_config().batch_size}, width {make_config().chain.stages[0].features}, {steps} steps x {repeats} "
        "repeats (median)")
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    sys.exit(f"optim_overhead: unknown --variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
  keys = ["plain"] + [k for k in VARIANTS if k in _VARIANTS.value and k != "plain"]
  benches = {key: common.StepBench(make_config(**VARIANTS[key][1])) for key in keys}
  batches = benches["plain"].train_batches(8)  # the trainer's first batches, the same for every variant
  for bench in benches.values():
    bench.warm_up(batches)
  temps = {key: bench.temp_bytes(batches[0]) for key, bench in benches.items()}  # the compiled steps: no recompile
  times = common.interleave(
      {key: (lambda bench=bench: bench.run(common.cycle(batches, steps)) / steps)
       for key, bench in benches.items()}, repeats)
  seconds = {key: common.median(values) for key, values in times.items()}
  base_time = seconds["plain"]
  print(f"{'variant':36s} {'ms/update':>10s} {'ratio':>7s} {'target':>7s} {'temp MiB':>9s}")
  for key in keys:
    name, _, target = VARIANTS[key]
    print(f"{name:36s} {seconds[key] * 1e3:10.3f} {seconds[key] / base_time:6.2f}x "
          f"{(f'<={target:.2f}x' if target else 'report'):>7s} {temps[key] / 2**20:9.2f}")
  common.write_json(_JSON.value, [
      common.row(VARIANTS[key][0], seconds[key] * 1e3, base_time * 1e3, "plain fp32 step", unit="ms/update",
                 target=VARIANTS[key][2], better="lower", samples=[t * 1e3 for t in times[key]])
      for key in keys if key != "plain"])


if __name__ == "__main__":
  app.run(main)
