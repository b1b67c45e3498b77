"""Hangs end in a documented exit code, not a silent stall: `--step_timeout` (exit 6, with every
thread's stack) when no train step or eval batch completes, `--initialization_timeout` (exit 7,
one line) when the processes of a multi-process run do not all join.

The hung step is made in a wrapper process (`python -c`) that replaces
`chainjax.parallel.put_local_batch` by one that sleeps from the 6th call on, then runs
`chainjax.main.run()`: the product has no test hooks.
"""

import re
import subprocess
import sys
import threading
import time

import pytest

import processes
from chainjax import main as main_lib
from chainjax import watchdog
from helpers import REPO

_HANG_AT_CALL = 6  # the 6th put_local_batch is train step 6 (runlocal: one call per step, evals at 30)

_HANGING_MAIN = f"""
import time
from chainjax import main, parallel

put_local_batch = parallel.put_local_batch
calls = 0

def hang_in_put_local_batch(*args, **kwargs):
  global calls
  calls += 1
  if calls >= {_HANG_AT_CALL}:
    time.sleep(600)
  return put_local_batch(*args, **kwargs)

parallel.put_local_batch = hang_in_put_local_batch
main.run()
"""


def _run(args: list[str], timeout: float) -> tuple[int, str, float]:
  """`(exit code, stderr, seconds)` of `python *args` in the repo; fails if it runs past `timeout`."""
  start = time.monotonic()
  try:
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=processes.env(1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f"still running after {timeout} s; stderr:\n{(e.stderr or b'')[-3000:]}") from None
  return done.returncode, done.stderr, time.monotonic() - start


def _errors(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("chainjax: error:")]


def test_fires_once_when_not_beaten_and_not_while_beaten():
  fired = threading.Event()
  calls = []

  def on_timeout():
    calls.append(time.monotonic())
    fired.set()

  with watchdog.Watchdog(0.3, on_timeout) as dog:
    for _ in range(10):  # 1 s of beats every 0.1 s: never 0.3 s without one
      time.sleep(0.1)
      dog.beat()
    assert not fired.is_set()
    beaten_at = time.monotonic()
    assert fired.wait(timeout=5)
    time.sleep(0.5)
  assert len(calls) == 1 and dog.fired
  assert 0.25 <= calls[0] - beaten_at < 2.0
  assert not dog._thread.is_alive()


def test_stop_ends_the_thread_without_firing_and_zero_is_off():
  calls = []
  with watchdog.Watchdog(0.3, lambda: calls.append(1)) as dog:
    time.sleep(0.1)
  assert not dog._thread.is_alive()
  time.sleep(0.5)  # past the deadline it would have had
  assert calls == [] and not dog.fired

  with pytest.raises(RuntimeError):  # leaving by an exception stops it too
    with watchdog.Watchdog(0.3, lambda: calls.append(1)) as dog:
      raise RuntimeError("training failed")
  time.sleep(0.5)
  assert calls == [] and not dog._thread.is_alive()

  with watchdog.Watchdog(0, lambda: calls.append(1)) as off:
    off.beat()
    time.sleep(0.1)
  assert off._thread is None and calls == []


@pytest.mark.slow
def test_a_hung_step_dumps_every_stack_and_exits_6(tmp_path):
  # The timeout counts from start-up and so covers compiling the first step, which takes over 10 s
  # on a loaded 2-core machine: the session's reference run compiles every program of ARGS into the
  # shared compilation cache first, so that here only the hang can exceed the timeout.
  processes.reference()
  code, stderr, seconds = _run(
      ["-c", _HANGING_MAIN, *processes.ARGS, "--config.log_every=1", f"--workdir={tmp_path / 'run'}",
       "--step_timeout=10"], timeout=90)
  assert code == main_lib.EXIT_STEP_TIMEOUT == 6, stderr[-3000:]
  assert _errors(stderr) == [
      "chainjax: error: no train step or eval batch completed in 10 s (--step_timeout); thread stacks above"]
  assert stderr.rstrip().endswith(_errors(stderr)[0])  # the last line, after the stacks
  assert "Current thread 0x" in stderr  # faulthandler: the watchdog thread, then one "Thread 0x" block per thread
  dump = stderr[stderr.index("Thread 0x"):]
  assert "most recent call first" in dump
  assert re.search(r"line \d+ in hang_in_put_local_batch", dump), dump[-3000:]  # where the main thread hangs
  assert re.search(r"line \d+ in update\n", dump) and "in train_and_evaluate" in dump  # Experiment.update
  steps = re.findall(r"\] (\d+)/\d+ ETA", stderr)
  assert steps and int(steps[-1]) == _HANG_AT_CALL - 1  # steps 1-5 completed: beats kept it quiet
  assert seconds < 60


@pytest.mark.slow
def test_a_process_whose_peers_never_join_exits_7_with_one_line(tmp_path):
  port = processes.free_port()
  code, stderr, seconds = _run(
      ["-m", "chainjax.main", *processes.ARGS, f"--workdir={tmp_path / 'run'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
       "--initialization_timeout=10"], timeout=60)
  assert code == main_lib.EXIT_INIT_TIMEOUT == 7, stderr[-3000:]
  assert _errors(stderr) == [
      f"chainjax: error: process 0 of 2: the other process did not join at 127.0.0.1:{port} within 10 s "
      "(--initialization_timeout); start every process with the same --coordinator_address and "
      "--num_processes (a distinct --process_id each) and relaunch"]
  assert "Traceback" not in stderr and "Check failure" not in stderr  # neither Python's nor JAX's abort
  assert 10 <= seconds < 40
  assert not (tmp_path / "run").exists()
