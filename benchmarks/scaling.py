"""Data-parallel scaling: train steps/sec on 1, 2, 4, 8 devices at a fixed per-device batch.

  python benchmarks/scaling.py [--steps=100] [--per_device_batch=32] [--width=256] [--counts=1,2,4,8]

Times the jitted train step of the default config's chain (parity, 3 MLP stages) exactly as
`train.train_and_evaluate` runs it: mesh over the devices, replicated state, batch sharded along
`data` (host -> devices with `parallel.put_batch` every step, inside the timing), `jax.jit` with
in/out shardings and donation. Global batch = per-device batch x devices, so perfect scaling
keeps steps/sec constant (ratio 1.00x) while examples/sec grows with the device count.

Fake CPU devices: each count runs in its own process with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, since the device count is fixed per process
and a real N-device host has exactly N devices (a subset of an 8-device process would leave idle
devices sharing the thread pool). All fake devices share this machine's cores, so the CPU
figures measure the overhead of partitioning and all-reduce, not a speed-up: on C cores, N
devices each get C/N of them. Async dispatch is off, as in tests/conftest.py.
Real accelerators (when `jax.devices()` is not CPU): the same sweep in this process over the
first 1, 2, 4, ... of all devices (a subset mesh via `parallel.make_mesh(devices)`), then all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_STEPS = flags.DEFINE_integer("steps", 100, "Timed train steps per device count (after 5 warm-up steps).")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 32, "Examples per device per step.")
_WIDTH = flags.DEFINE_integer("width", 256, "MLP width of each stage.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timing repeats per device count; the fastest is reported.")
_COUNTS = flags.DEFINE_list("counts", ["1", "2", "4", "8"], "Fake CPU device counts.")
_WORKER = flags.DEFINE_integer("worker", 0, "Internal: time this many devices in this process, print JSON.")
_SKIP_CPU = flags.DEFINE_bool("skip_cpu", False, "Only the real-accelerator sweep.")


def measure(num_devices: int) -> dict:
  """Seconds per train step on the first `num_devices` devices of this process (fastest repeat)."""
  import jax
  from flax import nnx

  from chainjax import chain as chain_lib
  from chainjax import data as data_lib
  from chainjax import parallel
  from chainjax import stages
  from chainjax import train
  from configs import default

  config = default.get_config()
  config.batch_size = _PER_DEVICE_BATCH.value * num_devices
  config.chain.stages = [stages.stage_config("mlp", name=f"level{i}", features=_WIDTH.value, depth=1)
                         for i in (1, 2, 3)]
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  tx = train.build_tx(config, config.total_steps)
  graphdef, state = train.init_train_state(model, tx)
  step_fn = train.make_train_step(graphdef, loss_fn, tx, seed=0)

  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  train_step = jax.jit(lambda state, batch: step_fn(state, batch), in_shardings=(replicated, batch_sharding),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  host_batches = [task.train_batch(i, config.batch_size) for i in range(8)]
  state = jax.device_put(state, replicated)
  with jax.set_mesh(mesh):
    for k in range(5):
      state, metrics = train_step(state, parallel.put_batch(host_batches[k % 8], mesh))
    jax.block_until_ready((state, metrics))
    best = float("inf")
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      for k in range(_STEPS.value):
        state, metrics = train_step(state, parallel.put_batch(host_batches[k % 8], mesh))
      jax.block_until_ready((state, metrics))
      best = min(best, (time.perf_counter() - start) / _STEPS.value)
  return {"devices": num_devices, "platform": jax.devices()[0].platform, "seconds_per_step": best,
          "global_batch": config.batch_size}


def _fake_cpu_run(num_devices: int) -> dict:
  """`measure(num_devices)` in a fresh process with `num_devices` fake CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={num_devices}",
                               "--xla_cpu_collective_call_terminate_timeout_seconds=600",
                               "--xla_cpu_collective_timeout_seconds=600"])
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_CPU_ENABLE_ASYNC_DISPATCH"] = "false"
  args = [f"--worker={num_devices}", f"--steps={_STEPS.value}", f"--per_device_batch={_PER_DEVICE_BATCH.value}",
          f"--width={_WIDTH.value}", f"--repeats={_REPEATS.value}"]
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{num_devices}-device worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_table(rows: list[dict]) -> None:
  base = rows[0]["seconds_per_step"]
  print(f"{'devices':>7s} {'global batch':>12s} {'ms/step':>9s} {'steps/sec':>10s} {'examples/sec':>13s} "
        f"{'ratio to 1':>10s}")
  for row in rows:
    seconds = row["seconds_per_step"]
    print(f"{row['devices']:7d} {row['global_batch']:12d} {seconds * 1e3:9.3f} {1 / seconds:10.1f} "
          f"{row['global_batch'] / seconds:13.0f} {base / seconds:9.2f}x")


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(measure(_WORKER.value)))
    return
  settings = (f"per-device batch {_PER_DEVICE_BATCH.value}, width {_WIDTH.value}, {_STEPS.value} steps x "
              f"{_REPEATS.value} repeats (fastest)")
  if not _SKIP_CPU.value:
    rows = [_fake_cpu_run(int(n)) for n in _COUNTS.value]
    print(f"Fake CPU devices on {os.cpu_count()} cores, one process per count; {settings}.\n"
          "Ratio = steps/sec relative to 1 device (1.00x = no overhead; the cores are shared, so no speed-up).")
    _print_table(rows)

  import jax

  if jax.devices()[0].platform != "cpu":
    total = jax.device_count()
    counts = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n < total} | {total})
    rows = [measure(n) for n in counts]
    print(f"\n{total} {jax.devices()[0].platform} device(s) ({jax.devices()[0].device_kind}), subset meshes in "
          f"one process; {settings}.\nRatio = steps/sec relative to 1 device (1.00x = perfect weak scaling).")
    _print_table(rows)


if __name__ == "__main__":
  app.run(main)
