"""Overhead of the optimizer-side features, as ratios measured in one run on this machine.

  python benchmarks/optim_overhead.py [--steps=100] [--repeats=5] [--batch_size=256] [--width=1024]

Times the jitted train step of the default config's chain (parity, 3 MLP stages) and prints,
against the plain step on the same global batch:
  accum_steps=4 (scan inside the step)      target <= 1.10x step time
  accum_steps=4 (optax.MultiSteps, 4 calls)  reported, with compiled temp memory of both
  dynamic loss scaling vs none               target <= 1.05x
  bf16 compute vs fp32 (CPU; report only)
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_STEPS = flags.DEFINE_integer("steps", 100, "Timed train steps per variant (after 5 warm-up steps).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_WIDTH = flags.DEFINE_integer("width", 1024, "MLP width of each stage.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing repeats per variant; the fastest is reported.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from chainjax import chain as chain_lib
  from chainjax import data as data_lib
  from chainjax import precision
  from chainjax import stages
  from chainjax import train
  from configs import default

  def setup(**overrides):
    config = default.get_config()
    config.batch_size = _BATCH.value
    config.chain.stages = [stages.stage_config("mlp", name=f"level{i}", features=_WIDTH.value, depth=1)
                           for i in (1, 2, 3)]
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
    task = data_lib.get_task(config)
    model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
    loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
    tx = train.build_tx(config, config.total_steps)
    graphdef, state = train.init_train_state(model, tx)
    step_fn = train.make_train_step(
        graphdef, loss_fn, tx, seed=0, accum_steps=config.optim.accum_steps,
        policy=precision.get_policy(config.precision.policy),
        dynamic_loss_scale=config.precision.loss_scale.startswith("dynamic"))
    batches = [jax.tree.map(jnp.asarray, task.train_batch(i, config.batch_size)) for i in range(8)]
    return config, state, step_fn, batches

  def time_variant(name, **overrides):
    config, state, step_fn, batches = setup(**overrides)
    a = config.optim.accum_steps
    if config.optim.accum_impl == "optax":
      jitted = jax.jit(step_fn, donate_argnums=0)
      micro = [[jax.tree.map(lambda x: x[i::a], b) for i in range(a)] for b in batches]
      den = [jnp.float32(b["mask"].sum() / a) for b in batches]

      def one_update(state, k):
        for i in range(a):
          state, m = jitted(state, micro[k % 8][i], den[k % 8], jnp.int32(i))
        return state, m
      compiled = jax.jit(step_fn).lower(state, micro[0][0], den[0], jnp.int32(0)).compile()
    else:
      jitted = jax.jit(lambda s, b: step_fn(s, b), donate_argnums=0)

      def one_update(state, k):
        return jitted(state, batches[k % 8])
      compiled = jax.jit(lambda s, b: step_fn(s, b)).lower(state, batches[0]).compile()
    memory = compiled.memory_analysis()
    for k in range(5):
      state, m = one_update(state, k)
    jax.block_until_ready(m)
    holder = {"state": state}

    def timed_run() -> float:
      """Seconds per update over `--steps` updates."""
      state = holder["state"]
      t0 = time.perf_counter()
      for k in range(_STEPS.value):
        state, m = one_update(state, k)
      jax.block_until_ready((state, m))
      holder["state"] = state
      return (time.perf_counter() - t0) / _STEPS.value

    temp = memory.temp_size_in_bytes if memory is not None else float("nan")
    return name, timed_run, temp

  print(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s); batch "
        f"{_BATCH.value}, width {_WIDTH.value}, {_STEPS.value} steps x {_REPEATS.value} repeats (fastest)")
  variants = [
      time_variant("plain fp32 step"),
      time_variant("accum_steps=4, scan", **{"optim.accum_steps": 4}),
      time_variant("accum_steps=4, optax.MultiSteps", **{"optim.accum_steps": 4, "optim.accum_impl": "optax"}),
      time_variant("dynamic loss scale", **{"precision.loss_scale": "dynamic"}),
      time_variant("bf16 compute", **{"precision.policy": "params=float32,compute=bfloat16,output=float32"}),
  ]
  # Repeats interleave the variants, so that drift in the machine's speed hits all of them alike.
  best = {name: float("inf") for name, _, _ in variants}
  for _ in range(_REPEATS.value):
    for name, timed_run, _ in variants:
      best[name] = min(best[name], timed_run())
  rows = [(name, best[name], temp) for name, _, temp in variants]
  base_name, base_time, base_temp = rows[0]
  targets = {"accum_steps=4, scan": 1.10, "dynamic loss scale": 1.05}
  print(f"{'variant':36s} {'ms/update':>10s} {'ratio':>7s} {'target':>7s} {'temp MiB':>9s}")
  for name, seconds, temp in rows:
    target = targets.get(name)
    print(f"{name:36s} {seconds * 1e3:10.3f} {seconds / base_time:6.2f}x "
          f"{(f'<={target:.2f}x' if target else 'report'):>7s} {temp / 2**20:9.2f}")


if __name__ == "__main__":
  app.run(main)
