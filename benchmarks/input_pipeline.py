"""Is the input pipeline ever the bottleneck? Training steps/sec with the real pipeline vs from memory.

  python -m chainjax.data.prepare fashion_mnist     # once
  python benchmarks/input_pipeline.py [--steps=200] [--repeats=3] [--config=configs/fashion_mnist_cnn.py]

Runs the config's jitted train step on one device in one process, and prints:
  pipeline alone        examples/sec of the Grain pipeline (TFDS ArrayRecord read, decode,
                        shuffle, batch) with no training
  from memory           steps/sec with the same batches already in host memory (the baseline)
  real pipeline         steps/sec reading each batch from the pipeline as training does
                        target: >= 0.95x the in-memory rate
Variants are interleaved `--repeats` times and the fastest of each is reported, so both
see the same machine load.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "fashion_mnist_cnn.py"), "A config whose data is a TFDS dataset.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed train steps per variant (after 5 warm-up steps).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved timing repeats; the fastest is reported.")


def main(argv):
  del argv
  import jax
  from flax import nnx

  from chainjax import chain as chain_lib
  from chainjax import config as config_lib
  from chainjax import parallel
  from chainjax import precision
  from chainjax import train
  from chainjax.data import base

  config = _CONFIG.value
  try:
    task = config_lib.validate(config, 1)
  except config_lib.ConfigError as e:
    sys.exit(f"input_pipeline: {e}")
  batch_size, steps = config.batch_size, _STEPS.value
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  tx = train.build_tx(config, 10_000, task.train_size // batch_size)
  graphdef, state = train.init_train_state(model, tx)
  step_fn = jax.jit(train.make_train_step(graphdef, loss_fn, tx, seed=0,
                                          policy=precision.get_policy(config.precision.policy)),
                    donate_argnums=0)

  def put(batch):
    return parallel.put_local_batch(batch, mesh, batch_size)

  iterator = task.train_iterator(batch_size, base.Shard())
  for _ in range(5):  # compile and warm up
    state, metrics = step_fn(state, put(next(iterator)))
  jax.block_until_ready(metrics)
  in_memory = [next(iterator) for _ in range(steps)]

  def train_from(batches) -> float:
    nonlocal state
    start = time.perf_counter()
    for batch in batches:
      state, metrics = step_fn(state, put(batch))
    jax.block_until_ready(metrics)
    return steps / (time.perf_counter() - start)

  def pipeline_alone() -> float:
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    return steps * batch_size / (time.perf_counter() - start)

  best = {"pipeline": 0.0, "memory": 0.0, "real": 0.0}
  for _ in range(_REPEATS.value):
    best["pipeline"] = max(best["pipeline"], pipeline_alone())
    best["memory"] = max(best["memory"], train_from(in_memory))
    best["real"] = max(best["real"], train_from(next(iterator) for _ in range(steps)))

  print(f"{task.name}, batch {batch_size}, {steps} steps x {_REPEATS.value} repeats, "
        f"{config.data.num_threads} read threads, {os.cpu_count()} CPUs, JAX {jax.__version__}")
  print(f"  pipeline alone     {best['pipeline']:10.0f} examples/s  ({best['pipeline'] / batch_size:.1f} batches/s)")
  print(f"  from memory        {best['memory']:10.2f} steps/s   1.00x")
  ratio = best["real"] / best["memory"]
  print(f"  real pipeline      {best['real']:10.2f} steps/s   {ratio:.2f}x   target >= 0.95x "
        f"{'(met)' if ratio >= 0.95 else '(NOT met)'}")


if __name__ == "__main__":
  app.run(main)
