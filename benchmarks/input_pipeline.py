"""Is the input pipeline ever the bottleneck? Training steps/sec with the real pipeline vs from memory.

  python -m chainjax.data.prepare fashion_mnist     # once
  python benchmarks/input_pipeline.py [--steps=200] [--repeats=3] [--config=configs/fashion_mnist_cnn.py]

Times the trainer's step (`Phase.train_step` of an `experiment.Experiment` built from the config,
through `benchmarks/common.py`: the config's precision policy, stage names and accumulation, the
mesh over all of this process's devices, `exp.put_batch` every step), and prints:
  pipeline alone        examples/sec of the Grain pipeline (TFDS ArrayRecord read, decode,
                        shuffle, batch) with no training: uncached (every record decoded) and
                        cached (`data.cache=True`, as the Fashion-MNIST config: records decoded
                        in epoch 1 stay in memory; the cache is filled by one pass first)
  train from memory     steps/sec with batches already in host memory (the baseline)
  train, uncached       steps/sec reading each batch from the pipeline as training does,
  train, cached         decoding every record (epoch 1) / from the filled cache (epochs 2+)
                        target: the config's pipeline >= 0.95x the in-memory rate
One Experiment per variant of the config: the config itself (from memory, and cached when it
sets `data.cache`) and the config with `data.cache=False` (uncached); each has its own train
state, and compiling is excluded (5 warm-up updates each).
A synthetic config works too (`--config=configs/line_parity.py`, or `...line_parity.py:runlocal`
for a seconds-long check): "uncached" is then its batches generated on the fly, and "pipeline
alone" the generator's rate (measured on 2 cores: line_parity generates 800 batches of 64 per
second, far ahead of training at 9 steps/s).
Variants are interleaved `--repeats` times and the median of each is reported, so all see the
same machine load.
"""

from __future__ import annotations

import itertools
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
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing repeats; the median is reported.")
_QUICK = flags.DEFINE_bool("quick", False, "Seconds-long smoke run: 5 steps x 1 repeat.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows (JSON list, as benchmarks/run.py collects them) here.")


def main(argv):
  del argv
  import jax

  from benchmarks import common
  from chainjax.errors import ConfigError

  config = _CONFIG.value
  uncached_config = ml_collections.ConfigDict(config.to_dict())
  uncached_config.data.cache = False
  try:
    bench = common.StepBench(config)
    uncached_bench = common.StepBench(uncached_config) if config.data.cache else bench
  except ConfigError as e:
    sys.exit(f"input_pipeline: {e}")
  task, batch_size = bench.exp.task, bench.config.batch_size
  steps, repeats = (5, 1) if _QUICK.value else (_STEPS.value, _REPEATS.value)

  benches = {"uncached": uncached_bench}
  iterators = {"uncached": uncached_bench.train_iterator()}
  if config.data.cache:  # one pass over the training split fills the cache, as epoch 1 does
    benches["cached"] = bench
    iterators["cached"] = bench.train_iterator()
    for _ in range(task.train_size // batch_size):
      next(iterators["cached"])
  for name, b in benches.items():  # compile and warm up
    b.warm_up([next(iterators[name]) for _ in range(common.WARM_UP_UPDATES)])
  in_memory = [next(iterators["uncached"]) for _ in range(steps)]  # `bench` is warm: it is one of `benches`

  def pipeline_alone(iterator) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    return steps * batch_size / (time.perf_counter() - start)

  timers = {"train memory": lambda: steps / bench.run(in_memory)}
  for name, iterator in iterators.items():
    timers[f"alone {name}"] = lambda iterator=iterator: pipeline_alone(iterator)
    timers[f"train {name}"] = (lambda b=benches[name], iterator=iterator:
                               steps / b.run(itertools.islice(iterator, steps)))
  samples = common.interleave(timers, repeats)
  rates = {name: common.median(values) for name, values in samples.items()}
  alone = {name: rates[f"alone {name}"] for name in iterators}
  trained = {"memory": rates["train memory"], **{name: rates[f"train {name}"] for name in iterators}}

  print(f"{task.name}, batch {batch_size}, {steps} steps x {repeats} repeats (median), "
        f"{config.data.num_threads} read threads, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPUs, JAX {jax.__version__}")
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
  common.write_json(_JSON.value, [
      common.row(f"input pipeline, {task.name}, {name}" + (" (every epoch decodes)" if name == "uncached" else ""),
                 trained[name] * batch_size, trained["memory"] * batch_size, "the same steps fed from memory",
                 target=0.95 if name == final else None, samples=[r * batch_size for r in samples[f"train {name}"]])
      for name in iterators])


if __name__ == "__main__":
  app.run(main)
