"""Data-parallel scaling: train steps/sec on 1, 2, 4, 8 devices at a fixed per-device batch.

  python benchmarks/scaling.py [--steps=100] [--per_device_batch=32] [--width=256] [--counts=1,2,4,8]

Times the trainer's step (`Phase.train_step` of an `experiment.Experiment`, through
`benchmarks/common.py`) for the default config's chain (parity, 3 MLP stages of `--width`) with
`batch_size` = per-device batch x devices: the mesh over all of the process's devices, the state
with its shardings, the batch sharded along `data` and put on the devices with `exp.put_batch`
every step (inside the timing), the config's precision policy, stage names and accumulation.
Perfect scaling keeps steps/sec constant (ratio 1.00x) while examples/sec grows with the device
count. Each count reports the median of `--repeats` runs of `--steps` updates, after 5 warm-up
updates (compiling is not timed).

One process per device count: an `Experiment` uses every device of its process (as training
does), and a process's device count is fixed when JAX starts, so each count runs `--worker=N` in
a fresh process whose only devices are the N to time. That is also what a real N-device host
looks like (a subset mesh of an 8-device process would leave idle devices sharing the thread pool).

Fake CPU devices: `XLA_FLAGS=--xla_force_host_platform_device_count=N`, `JAX_PLATFORMS=cpu`, async
dispatch off as in tests/conftest.py. All fake devices share this machine's cores, so the CPU
figures measure the overhead of partitioning and all-reduce, not a speed-up: on C cores, N devices
each get C/N of them.
Real accelerators (when this process's default backend is not CPU): NVIDIA GPUs are swept the same
way, a process per count with `CUDA_VISIBLE_DEVICES` set to the first 1, 2, 4, ... of the visible
GPUs, then all of them. Other accelerators (TPU) have no per-process device subset that is as
simple to set, so only the all-devices row is measured there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_STEPS = flags.DEFINE_integer("steps", 100, "Timed train steps per repeat (after 5 warm-up steps).")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 32, "Examples per device per step.")
_WIDTH = flags.DEFINE_integer("width", 256, "MLP width of each stage.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timing repeats per device count; the median is reported.")
_COUNTS = flags.DEFINE_list("counts", ["1", "2", "4", "8"], "Fake CPU device counts.")
_WORKER = flags.DEFINE_integer("worker", 0, "Internal: time all N devices of this process, print JSON.")
_SKIP_CPU = flags.DEFINE_bool("skip_cpu", False, "Only the real-accelerator sweep.")
_QUICK = flags.DEFINE_bool("quick", False, "Seconds-long smoke run: 1 and 2 fake devices, 3 steps x 1 repeat.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows (JSON list, as benchmarks/run.py collects them) here.")


def make_config(num_devices: int):
  """The default config with `--width` MLP stages and `--per_device_batch` examples per device."""
  from chainjax import stages
  from configs import default

  config = default.get_config()
  config.batch_size = _PER_DEVICE_BATCH.value * num_devices
  config.chain.stages = [stages.stage_config("mlp", name=f"level{i}", features=_WIDTH.value, depth=1)
                         for i in (1, 2, 3)]
  return config


def measure(num_devices: int) -> dict:
  """Seconds per train step on all devices of this process (median of the repeats)."""
  import jax

  from benchmarks import common

  if jax.device_count() != num_devices:
    raise RuntimeError(f"the worker for {num_devices} device(s) sees {jax.device_count()}")
  bench = common.StepBench(make_config(num_devices))
  times = common.seconds_per_update(bench, bench.train_batches(8), _STEPS.value, _REPEATS.value)
  return {"devices": num_devices, "platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind,
          "seconds_per_step": common.median(times), "global_batch": bench.config.batch_size}


def _worker_run(num_devices: int, env: dict) -> dict:
  """`measure(num_devices)` in a fresh process with environment `env`."""
  steps, repeats = (3, 1) if _QUICK.value else (_STEPS.value, _REPEATS.value)
  args = [f"--worker={num_devices}", f"--steps={steps}", f"--per_device_batch={_PER_DEVICE_BATCH.value}",
          f"--width={_WIDTH.value}", f"--repeats={repeats}"]
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{num_devices}-device worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _fake_cpu_env(num_devices: int) -> dict:
  env = dict(os.environ)
  kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={num_devices}",
                                      "--xla_cpu_collective_call_terminate_timeout_seconds=600",
                                      "--xla_cpu_collective_timeout_seconds=600"])
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_CPU_ENABLE_ASYNC_DISPATCH"] = "false"
  return env


def _default_backend() -> dict:
  """Platform, kind and count of this environment's default devices, from a child process (so that this
  process never takes the accelerators the workers need)."""
  code = ("import jax, json; d = jax.devices(); "
          "print(json.dumps({'platform': d[0].platform, 'kind': d[0].device_kind, 'count': len(d)}))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"listing the devices failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _suite_rows(rows: list[dict], where: str) -> list[dict]:
  """The table's rows for benchmarks/run.py: steps/sec at N devices against 1 device (weak scaling)."""
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  base = rows[0]
  return [common.row(f"scaling, {where}, {r['devices']} devices (global batch {r['global_batch']})",
                     1 / r["seconds_per_step"], 1 / base["seconds_per_step"], f"{base['devices']} device(s)",
                     unit="steps/s") for r in rows[1:]]


def _print_table(rows: list[dict]) -> None:
  base = rows[0]["seconds_per_step"]
  print(f"{'devices':>7s} {'global batch':>12s} {'ms/step':>9s} {'steps/sec':>10s} {'examples/sec':>13s} "
        f"{'ratio to ' + str(rows[0]['devices']):>10s}")
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
              f"{_REPEATS.value} repeats (median)")
  suite: list[dict] = []
  if not _SKIP_CPU.value:
    counts = ["1", "2"] if _QUICK.value else _COUNTS.value
    rows = [_worker_run(int(n), _fake_cpu_env(int(n))) for n in counts]
    suite += _suite_rows(rows, "fake CPU devices")
    print(f"Fake CPU devices on {os.cpu_count()} cores, one process per count; {settings}.\n"
          "Ratio = steps/sec relative to 1 device (1.00x = no overhead; the cores are shared, so no speed-up).")
    _print_table(rows)

  if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU chosen: no accelerator to sweep
    _write_json(suite)
    return
  backend = _default_backend()
  if backend["platform"] == "cpu":
    _write_json(suite)
    return
  total = backend["count"]
  if backend["platform"] == "gpu":
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [d for d in visible.split(",") if d] if visible else [str(i) for i in range(total)]
    counts = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n < total} | {total})
    rows = [_worker_run(n, {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids[:n])}) for n in counts]
    how = "one process per count (CUDA_VISIBLE_DEVICES = the first N)"
  else:
    rows = [_worker_run(total, dict(os.environ))]
    how = "all devices only (no per-process device subset on this platform)"
  print(f"\n{total} {backend['platform']} device(s) ({backend['kind']}), {how}; {settings}.\n"
        "Ratio = steps/sec relative to 1 device (1.00x = perfect weak scaling).")
  _print_table(rows)
  _write_json(suite + _suite_rows(rows, f"{backend['platform']} ({backend['kind']})"))


def _write_json(rows: list[dict]) -> None:
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  common.write_json(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
