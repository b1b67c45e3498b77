"""Multi-host training on one machine: 2 processes on 127.0.0.1 (gloo collectives), 2 fake devices each.

The same engine as a multi-host TPU/GPU job (jax.distributed, global arrays assembled from each
process's rows), so the tests check numbers, not a simulation.
"""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

import processes
from chainjax import main as main_lib


def _eval_records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k == "step" or k.startswith("eval/")} for line in f]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path):
  one = processes.run(tmp_path / "one", devices=4)
  two = processes.reference(num_processes=2, devices=2)
  assert "4 cpu device(s), process 0 of 2" in two.stderr(0)

  (step_one, state_one), (step_two, state_two) = processes.read_state(one.workdir), processes.read_state(two.workdir)
  assert step_one == step_two == processes.TOTAL_STEPS
  for a, b in zip(jax.tree.leaves(state_one["params"]), jax.tree.leaves(state_two["params"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

  evals_one, evals_two = _eval_records(one.workdir), _eval_records(two.workdir)
  assert [r["step"] for r in evals_two] == [20, 40]
  for a, b in zip(evals_one, evals_two, strict=True):
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5, atol=1e-6)
  # Only process 0 writes logs: process 1 logs warnings and errors only.
  assert "train.py" not in two.stderr(1) and "step 20 - loss" in two.stderr(0)
  assert sorted(os.listdir(two.workdir)) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]


@pytest.mark.slow
def test_a_dead_peer_stops_the_other_process_within_a_minute(tmp_path):
  with processes.Job(tmp_path / "job", "--config.total_steps=100000", "--heartbeat_timeout=5",
                     num_processes=2, devices=2) as job:
    job.wait_for_step(5)
    job.signal(signal.SIGKILL, process=1)
    killed_at = time.monotonic()
    code = job.procs[0].wait(timeout=60)  # raises (and the job is killed) if process 0 hangs
    elapsed = time.monotonic() - killed_at
  assert code != 0
  assert elapsed < 60
  assert "another task died" in job.stderr(0)


def test_no_distributed_runtime_without_flags_or_a_cluster(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert main_lib._cluster_environment() is None
  assert not main_lib.initialize_distributed("auto")
  assert not main_lib.initialize_distributed("off", "127.0.0.1:1234", 2, 0)
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is a laptop too
  assert main_lib._cluster_environment() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert main_lib._cluster_environment() == "SLURM_NTASKS"
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-0,t1k-1")
  assert main_lib._cluster_environment() in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")
