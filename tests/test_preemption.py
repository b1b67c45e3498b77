"""SIGTERM (a preemption notice) stops a run at one step agreed by every process, which is
checkpointed; the relaunched run resumes from it and ends bit-identical to an uninterrupted run."""

import json
import os
import signal

import jax
import pytest

import processes
from chainjax import main as main_lib
from helpers import assert_trees_equal, checkpoint_steps

LONGER = "--config.total_steps=60"  # time to send the signal mid-run


def _evals(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k == "step" or k.startswith("eval/")} for line in f]


def _preempt_and_resume(tmp_path, num_processes: int, devices: int, signalled: int) -> None:
  reference = processes.run(tmp_path / "reference", LONGER, num_processes=num_processes, devices=devices)

  workdir = tmp_path / "preempted"
  with processes.Job(workdir, LONGER, num_processes=num_processes, devices=devices) as job:
    seen = job.wait_for_step(5)
    job.signal(signal.SIGTERM, process=signalled)
    codes = job.wait(timeout=60)
  assert codes == [main_lib.EXIT_PREEMPTED] * num_processes, job.tails()
  stopped = [processes.preempted_step(job.stderr(i)) for i in range(num_processes)]
  assert stopped == [stopped[0]] * num_processes, stopped  # one step, agreed by every process
  assert seen <= stopped[0] < 60
  assert checkpoint_steps(workdir)[-1] == stopped[0]  # the step is saved: nothing completed is lost

  resumed = processes.run(workdir, LONGER, num_processes=num_processes, devices=devices)
  assert f"Resumed from {workdir}/checkpoints at step {stopped[0]}" in resumed.stderr(0)
  (ref_step, ref_state), (step, state) = processes.read_state(reference.workdir), processes.read_state(workdir)
  assert ref_step == step == 60
  assert_trees_equal(ref_state, state)
  assert _evals(reference.workdir) == _evals(workdir)


@pytest.mark.slow
def test_sigterm_single_process_saves_exits_4_and_resumes_bit_identical(tmp_path):
  _preempt_and_resume(tmp_path, num_processes=1, devices=1, signalled=0)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  _preempt_and_resume(tmp_path, num_processes=2, devices=2, signalled=1)


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
