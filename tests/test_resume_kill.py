"""SIGKILL a training process (once during an async checkpoint save, once mid-run), resume it,
and compare its final parameters with an uninterrupted run: they must be bit-identical."""

import os
import signal
import subprocess
import sys
import time

import pytest

from chainjax.data import prepare

from helpers import REPO, assert_trees_equal, checkpoint_steps, final_state

ARGS = ["--config=configs/default.py:runlocal", "--config.total_steps=400", "--config.checkpoint_every=10",
        "--config.eval_every=100", "--config.log_every=50"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device: the realistic laptop run, and faster
  return env


def _launch(workdir):
  return subprocess.Popen([sys.executable, "-m", "chainjax.main", *ARGS, f"--workdir={workdir}"], cwd=REPO,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, condition, timeout=180.0) -> bool:
  """SIGKILLs `proc` as soon as `condition()` holds; False if the process ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if condition():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.001)
  return False


def _saving(ckpt_dir):
  return lambda: os.path.isdir(ckpt_dir) and any(".orbax-checkpoint-tmp" in d for d in os.listdir(ckpt_dir))


@pytest.mark.slow
def test_sigkill_during_save_and_mid_run_then_resume_is_bit_identical(tmp_path):
  reference = tmp_path / "reference"
  proc = subprocess.run([sys.executable, "-m", "chainjax.main", *ARGS, f"--workdir={reference}"], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  workdir = tmp_path / "killed"
  ckpt_dir = workdir / "checkpoints"
  # 1. Killed while Orbax is writing a checkpoint (its tmp folder exists), after the first good one.
  proc = _launch(workdir)
  killed_in_save = _kill_when(proc, lambda: os.path.isdir(ckpt_dir) and checkpoint_steps(workdir)
                              and _saving(ckpt_dir)())
  assert killed_in_save and proc.returncode == -signal.SIGKILL
  first_kill_steps = checkpoint_steps(workdir)
  assert first_kill_steps and first_kill_steps[-1] < 400
  # 2. Resumed, then killed again mid-run, a few checkpoints later.
  proc = _launch(workdir)
  killed_mid_run = _kill_when(proc, lambda: checkpoint_steps(workdir)[-1] >= first_kill_steps[-1] + 50)
  assert killed_mid_run and proc.returncode == -signal.SIGKILL
  # 3. Resumed to the end.
  proc = _launch(workdir)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert "Resumed from" in stderr

  ref, got = final_state(reference), final_state(workdir)
  assert ref["step"] == got["step"] == 400
  assert_trees_equal(ref["tree"], got["tree"])


QAT_ARGS = ["--config=configs/default.py:runlocal", "--config.total_steps=200", "--config.checkpoint_every=10",
            "--config.eval_every=100", "--config.log_every=50", "--config.compress.qat.rules=('stages/level2/.* w=4 a=8',)",
            "--config.compress.qat.boundary_bits=8", "--config.compress.qat.start_step=50"]


@pytest.mark.slow
def test_qat_run_sigkilled_after_qat_started_resumes_bit_identical(tmp_path):
  """QAT with float updates first, int4 weights in one stage and 8-bit stage outputs: killed after QAT has
  run for a while, resumed, it ends with the parameters AND the observers of an uninterrupted run."""
  run = lambda workdir: [sys.executable, "-m", "chainjax.main", *QAT_ARGS, f"--workdir={workdir}"]
  reference = tmp_path / "reference"
  proc = subprocess.run(run(reference), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(run(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  assert _kill_when(proc, lambda: os.path.isdir(workdir / "checkpoints") and (checkpoint_steps(workdir) or [0])[-1]
                    >= 100)
  assert checkpoint_steps(workdir)[-1] < 200
  proc = subprocess.run(run(workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "Resumed from" in proc.stderr, proc.stderr[-3000:]
  ref, got = final_state(reference), final_state(workdir)
  assert ref["step"] == got["step"] == 200
  assert_trees_equal(ref["tree"], got["tree"])
  counts = [v for path, v in _leaves(got["tree"]["rest"]) if "count" in path]
  assert len(counts) == 2 + 3 and all(int(c) == 150 for c in counts)  # level2's 2 layers, 3 stage outputs


def _leaves(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, prefix + (str(k),))
  else:
    yield prefix, tree


def _fashion_mnist_data_dir(tmp_path) -> str:
  """Where Fashion-MNIST is prepared: the TFDS default if it is there, else prepared here from
  Debian's files (about 20 s)."""
  if prepare.fashion_mnist_available():
    return prepare.default_data_dir()
  return prepare.prepare_fashion_mnist(str(tmp_path / "tfds"))


# The real Fashion-MNIST files where Debian's package is installed, else a tiny TFDS set that the test
# builds: one case either way, so neither machine reports a skip. (Resuming across epoch boundaries is
# `test_pipeline`'s; this test kills the real process.)
DATASET = "fashion_mnist" if os.path.isdir(prepare.DEBIAN_DIR) else "tiny"


@pytest.mark.slow
def test_sigkill_mid_epoch_on_a_tfds_dataset_resumes_the_input_exactly(tmp_path, dataset=DATASET):
  """Grain's iterator state goes into each checkpoint; the resumed run reads the very next batch."""
  import json

  import tiny_tfds

  if dataset == "tiny":  # 6 updates per epoch
    args = [f"--config.data.name={tiny_tfds.NAME}", f"--config.data.data_dir={tiny_tfds.build(tmp_path / 'tfds')}"]
  else:  # 7500 updates per epoch at batch 8: the run stays inside epoch 1
    args = ["--config.eval_batch_size=2000", "--config.data.split_eval=test[:2000]",
            f"--config.data.data_dir={_fashion_mnist_data_dir(tmp_path)}"]
  args = ["--config=configs/fashion_mnist_cnn.py:runlocal,epochs=30", *args, "--config.total_steps=180",
          "--config.checkpoint_every=4", "--config.max_to_keep=50"]
  run = lambda workdir: subprocess.Popen([sys.executable, "-m", "chainjax.main", *args, f"--workdir={workdir}"],
                                         cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
  reference = run(tmp_path / "reference")
  _, stderr = reference.communicate(timeout=300)
  assert reference.returncode == 0, stderr[-3000:]

  workdir = tmp_path / "killed"
  proc = run(workdir)  # 6 updates per epoch: killed in the middle of an epoch, a few checkpoints in
  assert _kill_when(proc, lambda: os.path.isdir(workdir / "checkpoints") and checkpoint_steps(workdir)
                    and checkpoint_steps(workdir)[-1] >= 40)
  killed_at = checkpoint_steps(workdir)[-1]
  assert killed_at < 180
  proc = run(workdir)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert f"at step {killed_at}" in stderr

  for step in checkpoint_steps(workdir):  # the saved input position is the step, in Grain's own format
    saved = json.loads((workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").read_text())
    assert saved == {"next_index": step}
  ref, got = final_state(tmp_path / "reference"), final_state(workdir)
  assert ref["step"] == got["step"] == 180
  assert_trees_equal(ref["tree"], got["tree"])
