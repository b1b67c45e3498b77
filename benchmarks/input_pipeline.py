"""Is the input pipeline ever the bottleneck? Training steps/sec with the real pipeline vs from memory.

  python -m chainjax.data.prepare fashion_mnist     # once
  python benchmarks/input_pipeline.py [--steps=200] [--repeats=3] [--config=configs/fashion_mnist_cnn.py]

Runs the config's jitted train step on one device in one process, and prints:
  pipeline alone        examples/sec of the Grain pipeline (TFDS ArrayRecord read, decode,
                        shuffle, batch) with no training: uncached (every record decoded) and
                        cached (`data.cache=True`, as the Fashion-MNIST config: records decoded
                        in epoch 1 stay in memory; the cache is filled by one pass first)
  train from memory     steps/sec with batches already in host memory (the baseline)
  train, uncached       steps/sec reading each batch from the pipeline as training does,
  train, cached         decoding every record (epoch 1) / from the filled cache (epochs 2+)
                        target: the config's pipeline >= 0.95x the in-memory rate
A synthetic config works too (`--config=configs/line_parity.py`): "uncached" is then its
batches generated on the fly, and "pipeline alone" the generator's rate (measured on 2 cores:
line_parity generates 800 batches of 64 per second, far ahead of training at 9 steps/s).
Variants are interleaved `--repeats` times and the fastest of each is reported, so both
see the same machine load.
"""

from __future__ import annotations

import os
import sys
import time

import ml_collections
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
    uncached_config = ml_collections.ConfigDict(config.to_dict())
    uncached_config.data.cache = False
    uncached = config_lib.validate(uncached_config, 1)
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

  iterators = {"uncached": uncached.train_iterator(batch_size, base.Shard())}
  if config.data.cache:  # one pass over the training split fills the cache, as epoch 1 does
    iterators["cached"] = task.train_iterator(batch_size, base.Shard())
    for _ in range(task.train_size // batch_size):
      next(iterators["cached"])
  iterator = iterators["uncached"]
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

  def pipeline_alone(iterator) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    return steps * batch_size / (time.perf_counter() - start)

  alone = {name: 0.0 for name in iterators}
  trained = {name: 0.0 for name in ["memory", *iterators]}
  for _ in range(_REPEATS.value):
    trained["memory"] = max(trained["memory"], train_from(in_memory))
    for name, iterator in iterators.items():
      alone[name] = max(alone[name], pipeline_alone(iterator))
      trained[name] = max(trained[name], train_from(next(iterator) for _ in range(steps)))

  print(f"{task.name}, batch {batch_size}, {steps} steps x {_REPEATS.value} repeats, "
        f"{config.data.num_threads} read threads, {os.cpu_count()} CPUs, JAX {jax.__version__}")
  for name, rate in alone.items():
    print(f"  pipeline alone, {name:9s} {rate:9.0f} examples/s  ({rate / batch_size:.1f} batches/s)")
  print(f"  train from memory        {trained['memory']:9.2f} steps/s     1.00x")
  for name in iterators:
    ratio = trained[name] / trained["memory"]
    what = "every epoch decodes" if name == "uncached" else "the config (data.cache=True) after epoch 1"
    print(f"  train, {name:9s}         {trained[name]:9.2f} steps/s     {ratio:.2f}x   ({what})")
  final = "cached" if "cached" in iterators else "uncached"
  ratio = trained[final] / trained["memory"]
  print(f"target: the config's pipeline >= 0.95x from memory: {ratio:.2f}x {'met' if ratio >= 0.95 else 'NOT met'}")


if __name__ == "__main__":
  app.run(main)
