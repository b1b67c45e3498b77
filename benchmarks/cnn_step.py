"""The Fashion-MNIST CNN's train step against the plain Flax formulation, in examples/s.

  python benchmarks/cnn_step.py [--quick] [--json=FILE] [--steps=20] [--repeats=5]

Times the trainer's step (`Phase.train_step` through `benchmarks/common.py`) of
configs/fashion_mnist_cnn.py at batch 128: 3 conv stages (3x3 conv, BatchNorm, relu, 2x2 max pool;
16/32/64 channels), a 10-class head on each, deep supervision, Adam. Two Experiments from the same
config, fed the same 8 training batches held in host memory (the first epoch's decoding is
`benchmarks/input_pipeline.py`'s row): chainjax's step, and the baseline, the same model compiled with
`nnx.max_pool` in training (the plain Flax formulation, whose gradient is XLA's select-and-scatter) in
place of `conv.max_pool_2x2`. Interleaved `--repeats` times after 5 warm-up updates; median and min-max
examples/s; the ratio is ours / baseline. The row also gives the step's FLOP rate (XLA's cost analysis
of the compiled step) as a fraction of this machine's float32 matmul speed. Needs the prepared
Fashion-MNIST (`python -m chainjax.data.prepare fashion_mnist`); `--quick` uses the runlocal config's
random images instead (a smoke run).
"""

from __future__ import annotations

import os
import sys
from unittest import mock

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_QUICK = flags.DEFINE_bool("quick", False, "Seconds-long smoke run: the runlocal config (batch 8), 3 steps x 2 "
                            "repeats.")
_JSON = flags.DEFINE_string("json", None, "Write the rows (a JSON list of dicts) to this file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed updates per repeat (after 5 warm-up updates).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing repeats; the median is reported.")
_EXPLAIN = flags.DEFINE_bool("explain", False, "Also profile 5 updates of our step and list its top operations.")
_DATA_NAME = flags.DEFINE_string("data_name", None, "Another TFDS image dataset of 28x28x1 images, 10 classes "
                                 "(config.data.name), e.g. the tests' tiny one.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Its TFDS data_dir (config.data.data_dir).")

BATCH_SIZE = 128
TARGET = 1.0  # at least as fast as the plain formulation; the PyTorch target lives in benchmarks/run.py


def make_config(quick: bool):
  from chainjax import config as config_lib

  config = config_lib.load_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             "configs", "fashion_mnist_cnn.py")).get_config("runlocal" if quick else "")
  if not quick:  # the runlocal config keeps its batch of 8 (the tests' tiny set has 50 images)
    config.batch_size = BATCH_SIZE
  if _DATA_NAME.value:
    config.data.name = _DATA_NAME.value
  if _DATA_DIR.value:
    config.data.data_dir = _DATA_DIR.value
  return config


def rows(quick: bool, steps: int | None = None, repeats: int | None = None, explain: bool = False) -> list[dict]:
  """One row: the fashion_mnist_cnn step, ours against the plain Flax formulation (see the module docstring);
  with `explain`, its "top_operations" (`common.top_operations`)."""
  from flax import nnx

  from benchmarks import common
  from chainjax.stages import conv

  steps = steps or (3 if quick else 20)
  repeats = repeats or (2 if quick else 5)
  ours, plain = common.StepBench(make_config(quick)), common.StepBench(make_config(quick))
  batches = ours.train_batches(8)
  flax_pool = lambda x: nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
  with mock.patch.object(conv, "max_pool_2x2", flax_pool):  # traced (and compiled) here, with Flax's pool
    plain.warm_up(batches)
  ours.warm_up(batches)
  times = common.interleave({name: (lambda b=b: b.run(common.cycle(batches, steps)) / steps)
                             for name, b in (("ours", ours), ("plain", plain))}, repeats)
  batch_size = ours.config.batch_size
  speed = {name: [batch_size / t for t in ts] for name, ts in times.items()}
  rate = common.median(speed["ours"])
  flops = ours.flops(batches[0]) / batch_size * rate / 1e9  # GFLOP/s of the step
  return [common.row(f"fashion_mnist_cnn step, batch {batch_size}", rate, common.median(speed["plain"]),
                     "the same model with nnx.max_pool (Flax)", target=TARGET, samples=speed["ours"],
                     model="fashion_mnist_cnn b128", gflops=flops,
                     **({"top_operations": common.top_operations(ours, batches)} if explain else {}))]


def main(argv):
  del argv
  import jax

  from benchmarks import common

  quick = _QUICK.value
  print(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs; "
        f"fashion_mnist_cnn, batch {BATCH_SIZE}{', --quick' if quick else ''}")
  result = rows(quick, None if quick else _STEPS.value, None if quick else _REPEATS.value, _EXPLAIN.value)
  peak = common.matmul_gflops()
  for r in result:
    print(f"{r['name']}: {r['ours']:.0f} examples/s ({r['min']:.0f}-{r['max']:.0f}), plain Flax {r['baseline']:.0f}, "
          f"{r['ratio']:.2f}x (target >= {r['target']:.2f}x); {r['gflops']:.1f} GFLOP/s = "
          f"{r['gflops'] / peak:.0%} of the float32 matmul's {peak:.0f}")
  common.print_top_operations(result)
  common.write_json(_JSON.value, result)


if __name__ == "__main__":
  app.run(main)
