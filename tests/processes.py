"""Launching `chainjax.main` as 1 or N processes on this machine, bounded in time, for end-to-end tests.

Every process gets the environment `tests/conftest.py` gives the test process (CPU, long collective
timeouts, synchronous CPU dispatch, the session's compilation cache) with its own fake device count.
"""

import atexit
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from helpers import REPO, checkpoint_steps

# A short default run: 2 evals and checkpoints, a progress line every 5 steps.
TOTAL_STEPS = 40
ARGS = ("--config=configs/default.py:runlocal", f"--config.total_steps={TOTAL_STEPS}", "--config.eval_every=20",
        "--config.checkpoint_every=20", "--config.log_every=5")

_SESSION_DIR = tempfile.mkdtemp(prefix="chainjax-test-processes-")
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)


def env(devices: int) -> dict:
  """The environment of one process with `devices` fake CPU devices."""
  out = dict(os.environ)
  out["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}",
                               "--xla_cpu_collective_call_terminate_timeout_seconds=600",
                               "--xla_cpu_collective_timeout_seconds=600"])
  out.update(JAX_PLATFORMS="cpu", JAX_CPU_ENABLE_ASYNC_DISPATCH="false")
  return out


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """`num_processes` processes of one run (stderr of process i in `<workdir>.p<i>.log`)."""

  def __init__(self, workdir, *extra_args, num_processes: int = 1, devices: int = 1):
    self.workdir = str(workdir)
    self.logs = [f"{self.workdir}.p{i}.log" for i in range(num_processes)]
    cluster = []
    if num_processes > 1:
      port = free_port()
      cluster = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}"]
    self.procs = []
    for i, log in enumerate(self.logs):
      flags = cluster + [f"--process_id={i}"] if cluster else []
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "chainjax.main", *ARGS, *extra_args, f"--workdir={self.workdir}", *flags],
            cwd=REPO, env=env(devices), stdout=subprocess.DEVNULL, stderr=f))

  def wait(self, timeout: float) -> list[int]:
    """Exit codes of all processes; kills them all and fails if any runs past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"processes still running after {timeout} s; logs:\n{self.tails()}") from None

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def stderr(self, i: int = 0) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def tails(self, chars: int = 3000) -> str:
    return "\n".join(f"--- process {i}:\n{self.stderr(i)[-chars:]}" for i in range(len(self.procs)))

  def progress_step(self) -> int:
    """The last step process 0 reported on its progress line (0 before the first one)."""
    steps = re.findall(r"\] (\d+)/\d+ ETA", self.stderr(0))
    return int(steps[-1]) if steps else 0

  def wait_for_step(self, step: int, timeout: float = 120.0) -> int:
    """Blocks until process 0 reports `step` or later; returns the step reported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.progress_step() >= step:
        return self.progress_step()
      if any(p.poll() is not None for p in self.procs):
        break
      time.sleep(0.02)
    self.kill()
    raise AssertionError(f"no progress to step {step}; logs:\n{self.tails()}")

  def signal(self, sig: int, process: int = 0) -> None:
    self.procs[process].send_signal(sig)

  def __enter__(self) -> "Job":
    return self

  def __exit__(self, *exc) -> None:
    self.kill()


def run(workdir, *extra_args, num_processes: int = 1, devices: int = 1, timeout: float = 150.0) -> Job:
  """Runs a job to its end and asserts that every process exited with 0."""
  with Job(workdir, *extra_args, num_processes=num_processes, devices=devices) as job:
    codes = job.wait(timeout)
    assert codes == [0] * num_processes, f"exit codes {codes}; logs:\n{job.tails()}"
  return job


@functools.cache
def reference(num_processes: int = 1, devices: int = 1) -> Job:
  """An uninterrupted run of `ARGS`, done once per test session and shared by the tests that compare with it."""
  return run(os.path.join(_SESSION_DIR, f"reference-{num_processes}x{devices}"), num_processes=num_processes,
             devices=devices)


def read_state(workdir, step: int | None = None) -> tuple[int, dict]:
  """`(step, train state as numpy)` of the newest (or given) checkpoint, whatever mesh wrote it."""
  step = checkpoint_steps(workdir)[-1] if step is None else step
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    saved = ckpt.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), saved)
    return step, jax.tree.map(np.asarray, ckpt.restore(path, target))


def preempted_step(stderr: str) -> int | None:
  """The step named by main's preemption message, or None."""
  found = re.search(r"chainjax: preempted \(SIGTERM\) at step (\d+)", stderr)
  return int(found.group(1)) if found else None

