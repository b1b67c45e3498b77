"""SIGTERM (a preemption notice) stops a run at one step agreed by every process, which is
checkpointed; the relaunched run resumes from it and ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import time

import jax
import pytest

import processes
from chainjax import main as main_lib
from helpers import assert_trees_equal, checkpoint_steps


def _evals(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k == "step" or k.startswith("eval/")} for line in f]


def _preempt_during_start_up(workdir, num_processes: int, devices: int, previous_stop: int) -> None:
  """A notice before the loop of a resumed run (JAX's sync point would be step 1): stop after one step."""
  with processes.Job(workdir, num_processes=num_processes, devices=devices) as job:
    deadline = time.monotonic() + 60
    while "device(s), process 0 of" not in job.stderr(0) and time.monotonic() < deadline:
      time.sleep(0.01)
    job.signal(signal.SIGTERM, process=0)  # before restore and compile, so before the first step
    codes = job.wait(timeout=60)
  assert codes == [main_lib.EXIT_PREEMPTED] * num_processes, job.tails()
  # Whether JAX's handler logs the notice before or after the loop's first line depends on the machine's load;
  # either way every process stops after exactly one step of the resumed run (below).
  assert "SIGTERM caught" in job.stderr(0), job.tails()
  stopped = [processes.preempted_step(job.stderr(i)) for i in range(num_processes)]
  assert stopped == [previous_stop + 1] * num_processes, job.tails()
  assert checkpoint_steps(workdir)[-1] == previous_stop + 1


def _preempt_and_resume(tmp_path, num_processes: int, devices: int, signalled: int,
                        again_at_start_up: bool = False) -> None:
  reference = processes.reference(num_processes=num_processes, devices=devices)

  workdir = tmp_path / "preempted"
  with processes.Job(workdir, num_processes=num_processes, devices=devices) as job:
    seen = job.wait_for_step(5)
    job.signal(signal.SIGTERM, process=signalled)
    codes = job.wait(timeout=60)
  assert codes == [main_lib.EXIT_PREEMPTED] * num_processes, job.tails()
  stopped = [processes.preempted_step(job.stderr(i)) for i in range(num_processes)]
  assert stopped == [stopped[0]] * num_processes, stopped  # one step, agreed by every process
  assert seen <= stopped[0] < processes.TOTAL_STEPS
  assert checkpoint_steps(workdir)[-1] == stopped[0]  # the step is saved: nothing completed is lost
  if again_at_start_up:
    _preempt_during_start_up(workdir, num_processes, devices, stopped[0])
    stopped[0] += 1

  resumed = processes.run(workdir, num_processes=num_processes, devices=devices)
  assert f"Resumed from {workdir}/checkpoints at step {stopped[0]}" in resumed.stderr(0)
  (ref_step, ref_state), (step, state) = processes.read_state(reference.workdir), processes.read_state(workdir)
  assert ref_step == step == processes.TOTAL_STEPS
  assert_trees_equal(ref_state, state)
  assert _evals(reference.workdir) == _evals(workdir)


@pytest.mark.slow
def test_sigterm_single_process_saves_exits_4_and_resumes_bit_identical(tmp_path):
  _preempt_and_resume(tmp_path, num_processes=1, devices=1, signalled=0)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """Also: a SIGTERM while the relaunched job starts up stops it after its first step."""
  _preempt_and_resume(tmp_path, num_processes=2, devices=2, signalled=1, again_at_start_up=True)


def test_should_stop_after_sigterm_and_restores_the_handler():
  from chainjax import preemption

  before = signal.getsignal(signal.SIGTERM)
  with preemption.Preemption(start_step=3) as p:
    assert not p.should_stop(4)
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.should_stop(5) and p.should_stop(6)
    assert p.stopped_at == 5
  assert signal.getsignal(signal.SIGTERM) is before
  assert not jax.distributed.is_initialized()
