"""Tests for chainjax.checkpoint: round trip, retention, verification, resharding."""

import errno
import gc
import os
import pathlib
import resource
import shutil
import signal
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from chainjax import checkpoint as ckpt_lib
from chainjax.checkpoint import Checkpointer


def _train_state():
  """Params plus an adam state after one update (non-trivial mu, nu, count)."""
  params = {
      "w": jax.random.normal(jax.random.key(0), (8, 4)),
      "b": jnp.arange(4, dtype=jnp.float32),
  }
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}


def _abstract(state, sharding_fn=None):
  """ShapeDtypeStructs of `state`, with `sharding_fn(path, x)` or x's sharding."""
  return jax.tree.map_with_path(
      lambda path, x: jax.ShapeDtypeStruct(
          x.shape, x.dtype,
          sharding=sharding_fn(path, x) if sharding_fn else x.sharding),
      state)


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _step_dirs(directory):
  return sorted(int(p.name) for p in pathlib.Path(directory).iterdir()
                if p.name.isdigit())


def _files(folder):
  """{relative path: size} of every file under `folder`."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): p.stat().st_size
          for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def warnings(monkeypatch):
  """Every absl warning, formatted, while the test runs."""
  messages = []
  original = logging.warning

  def record(msg, *args, **kwargs):
    messages.append(msg % args if args else msg)
    original(msg, *args, **kwargs)

  monkeypatch.setattr(logging, "warning", record)
  return messages


def test_save_restore_is_bit_identical(tmp_path):
  state = _train_state()
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(7, state, {"best_loss": 0.25, "patience_left": 3})
  ckpt.wait_until_finished()

  step, restored, metadata = ckpt.restore_latest(_abstract(state))
  ckpt.close()

  assert step == 7
  assert metadata == {"best_loss": 0.25, "patience_left": 3}
  _assert_bit_identical(restored, state)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert int(restored["opt_state"][0].count) == 1


def test_restore_from_empty_directory_is_none(tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt")
  assert ckpt.latest_step() is None
  assert ckpt.restore_latest(_abstract(_train_state())) is None
  ckpt.close()


def test_max_to_keep(tmp_path, warnings):
  state = _train_state()
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  for step in range(1, 6):
    ckpt.save(step, state, {"step": step})
  ckpt.wait_until_finished()
  assert _step_dirs(tmp_path / "ckpt") == [4, 5]
  assert ckpt.latest_step() == 5

  ckpt.save(3, state)  # not newer than 5: Orbax skips it, we say so
  ckpt.wait_until_finished()
  assert _step_dirs(tmp_path / "ckpt") == [4, 5]
  assert any("step 3 not saved" in w for w in warnings)
  ckpt.close()


# When a read of a truncated file fails, Orbax's asyncio.gather leaves sibling
# tensorstore reads whose callbacks later hit its closed event loop: noise only.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_half_written_steps_are_set_aside(tmp_path, warnings):
  directory = tmp_path / "ckpt"
  state = _train_state()
  ckpt = Checkpointer(directory)
  ckpt.save(100, state, {"epoch": 1})
  ckpt.close()

  good = directory / "100"
  # 300: every file present, data files truncated: only a restore can tell.
  shutil.copytree(good, directory / "300")
  for data_file in (directory / "300" / "state" / "d").iterdir():
    os.truncate(data_file, 10)
  # 400: commit-time step metadata missing (Orbax itself restores this one).
  shutil.copytree(good, directory / "400")
  (directory / "400" / "_CHECKPOINT_METADATA").unlink()
  # 450: an item file missing.
  shutil.copytree(good, directory / "450")
  (directory / "450" / "metadata" / "metadata").unlink()
  # 500: an empty numbered folder.
  (directory / "500").mkdir()
  # 600: Orbax's own unfinished tmp folder: not a checkpoint, not corrupt.
  tmp_folder = directory / "600.orbax-checkpoint-tmp"
  tmp_folder.mkdir()
  (tmp_folder / "partial").write_text("x")
  bad_steps = (300, 400, 450, 500)
  files_before = {s: _files(directory / str(s)) for s in bad_steps}

  # Pin Orbax's behaviour: it counts every numbered folder, none of the tmp.
  orbax_manager = ocp.CheckpointManager(directory)
  assert orbax_manager.all_steps() == [100, 300, 400, 450, 500]
  assert orbax_manager.latest_step() == 500
  orbax_manager.close()

  ckpt = Checkpointer(directory)
  step, restored, metadata = ckpt.restore_latest(_abstract(state))
  assert step == 100
  assert metadata == {"epoch": 1}
  _assert_bit_identical(restored, state)
  assert ckpt.latest_step() == 100
  ckpt.close()

  corrupt = tmp_path / "corrupt_checkpoints"
  moved = {int(p.name.split("-")[0]): p for p in corrupt.iterdir()}
  assert sorted(moved) == list(bad_steps)
  for s in bad_steps:
    assert any(str(directory / str(s)) in w and str(moved[s]) in w
               for w in warnings), s
    assert _files(moved[s]) == files_before[s]  # moved whole, nothing deleted
  assert _step_dirs(directory) == [100]
  assert _files(tmp_folder) == {"partial": 1}  # left where it was
  orbax_manager = ocp.CheckpointManager(directory)
  assert orbax_manager.all_steps() == [100]
  orbax_manager.close()


def test_save_after_corrupt_step_was_set_aside(tmp_path):
  directory = tmp_path / "ckpt"
  state = _train_state()
  ckpt = Checkpointer(directory)
  ckpt.save(100, state)
  ckpt.close()
  (directory / "300").mkdir()  # half-written, newer than the good step

  # Pin Orbax: while the bad folder is there, it silently skips older steps.
  orbax_manager = ocp.CheckpointManager(directory)
  assert not orbax_manager.save(
      200, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  orbax_manager.close()

  stale_tmp = directory / "300.orbax-checkpoint-tmp"
  stale_tmp.mkdir()
  ckpt = Checkpointer(directory)  # sets 300 aside
  assert ckpt.latest_step() == 100
  new_state = jax.tree.map(lambda x: x + 1, state)
  ckpt.save(200, state, {"n": 200})
  ckpt.save(300, new_state, {"n": 300})
  ckpt.wait_until_finished()
  assert _step_dirs(directory) == [100, 200, 300]
  assert not stale_tmp.exists()  # Orbax replaces its own stale tmp folder
  step, restored, metadata = ckpt.restore_latest(_abstract(state))
  ckpt.close()

  assert (step, metadata) == (300, {"n": 300})
  _assert_bit_identical(restored, new_state)
  assert [p.name.split("-")[0] for p in
          (tmp_path / "corrupt_checkpoints").iterdir()] == ["300"]


def test_restore_onto_other_sharding(tmp_path):
  device = jax.devices()[0]
  state = jax.device_put(_train_state(), device)  # saved on one device
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, state)
  ckpt.wait_until_finished()

  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  split = jax.sharding.NamedSharding(mesh, jax.P("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  def sharding_fn(path, x):
    return split if x.ndim == 2 else replicated
  step, restored, _ = ckpt.restore_latest(_abstract(state, sharding_fn))
  ckpt.close()

  assert step == 1
  _assert_bit_identical(restored, state)
  w = restored["params"]["w"]
  assert w.sharding == split
  assert len(w.addressable_shards) == 4
  assert {s.data.shape for s in w.addressable_shards} == {(2, 4)}
  assert restored["params"]["b"].sharding == replicated


def test_mismatched_target_raises_and_moves_nothing(tmp_path):
  state = _train_state()
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, state)
  ckpt.wait_until_finished()
  other = dict(state, params={"w": jnp.zeros((8, 5)), "b": jnp.zeros(4)})
  with pytest.raises(ValueError, match="params/w shape"):
    ckpt.restore_latest(_abstract(other))
  assert ckpt.latest_step() == 1
  ckpt.close()
  assert not (tmp_path / "corrupt_checkpoints").exists()


def _fail_writes_under(monkeypatch, folder_name):
  """Makes epath item writes under a folder named `folder_name` fail with ENOSPC.

  The write that fails is Orbax's own (JsonCheckpointHandler writes the
  metadata item with `write_text` in its background commit), so the error
  takes the path a full disk takes. Orbax's step metadata file is spared so
  that one write fails, at a fixed point (a failure there too would race with
  the item writes and, when it comes first, is only reported later).
  """
  path_type = type(epath.Path("/x"))
  original = path_type.write_text

  def write_text(self, *args, **kwargs):
    if folder_name in str(self) and self.name != "_CHECKPOINT_METADATA":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(path_type, "write_text", write_text)


def _poll_for_save_error(ckpt, timeout=30.0):
  """The CheckpointSaveError `raise_if_save_failed` raises within `timeout` s."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      ckpt.raise_if_save_failed()
    except ckpt_lib.CheckpointSaveError as e:
      return e
    time.sleep(0.01)
  raise AssertionError(f"no CheckpointSaveError within {timeout} s")


def test_failed_background_save_is_raised_and_last_good_step_restores(
    tmp_path, monkeypatch, caplog):
  directory = tmp_path / "ckpt"
  state = _train_state()
  ckpt = Checkpointer(directory)
  ckpt.save(100, state, {"n": 100})
  ckpt.wait_until_finished()
  ckpt.raise_if_save_failed()  # a good save raises nothing

  _fail_writes_under(monkeypatch, "200.orbax-checkpoint-tmp")
  ckpt.save(200, jax.tree.map(lambda x: x + 1, state), {"n": 200})
  error = _poll_for_save_error(ckpt)
  monkeypatch.undo()

  assert error.step == 200
  assert str(error) == "checkpoint save failed at step 200: No space left on device"
  assert isinstance(error.__cause__, OSError)
  ckpt.raise_if_save_failed()  # reported once
  assert "Traceback" not in caplog.text  # Orbax's error lines, not its tracebacks
  assert not any(r.exc_info for r in caplog.records)

  # Depending on which write failed first, 200 is left as Orbax's tmp folder
  # or renamed without its commit metadata: either way it is not restored.
  step, restored, metadata = ckpt.restore_latest(_abstract(state))
  assert (step, metadata) == (100, {"n": 100})
  _assert_bit_identical(restored, state)

  ckpt.save(300, state, {"n": 300})  # space is back: saving works again
  ckpt.wait_until_finished()
  ckpt.close()
  assert _step_dirs(directory) == [100, 300]


@pytest.mark.parametrize("call", ["save", "wait_until_finished", "close"])
def test_failed_background_save_is_raised_by_next_call(tmp_path, monkeypatch, call):
  directory = tmp_path / "ckpt"
  state = _train_state()
  ckpt = Checkpointer(directory)
  ckpt.save(100, state)
  ckpt.wait_until_finished()
  _fail_writes_under(monkeypatch, "200.orbax-checkpoint-tmp")
  ckpt.save(200, state)

  with pytest.raises(ckpt_lib.CheckpointSaveError,
                     match=r"^checkpoint save failed at step 200: No space left on device$"):
    if call == "save":
      ckpt.save(300, state)
    else:
      getattr(ckpt, call)()
  monkeypatch.undo()
  if call != "close":
    ckpt.close()  # the failure was reported: closing raises nothing
  # 300 was not started after the failure; whatever 200 left is not a step.
  ckpt = Checkpointer(directory)
  assert ckpt.latest_step() == 100
  ckpt.close()
  assert _step_dirs(directory) == [100]


def test_real_write_error_from_tensorstore_is_one_line(tmp_path):
  """A real OS write failure inside TensorStore: the file-size limit (EFBIG)."""
  state = {"w": jax.random.normal(jax.random.key(1), (100_000,))}  # 400 kB, incompressible
  ckpt = Checkpointer(tmp_path / "ckpt")
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
  try:
    ckpt.save(5, state)
    error = _poll_for_save_error(ckpt)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, previous_handler)
  assert str(error) == "checkpoint save failed at step 5: File too large"
  assert "os_error_code='27'" in str(error.__cause__)  # TensorStore's ValueError
  assert ckpt.latest_step() is None
  ckpt.close()


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.95])
def test_corrupt_checkpoint_warning_is_short(tmp_path, warnings, capfd, fraction):
  directory = tmp_path / "ckpt"
  state = _train_state()
  ckpt = Checkpointer(directory)
  ckpt.save(100, state)
  ckpt.close()
  shutil.copytree(directory / "100", directory / "200")
  for data_file in (directory / "200" / "state" / "d").iterdir():
    os.truncate(data_file, int(data_file.stat().st_size * fraction))
  capfd.readouterr()

  ckpt = Checkpointer(directory)
  assert ckpt.restore_latest(_abstract(state))[0] == 100
  ckpt.close()
  gc.collect()  # leftover reads of the failed restore report now, if at all

  (warning,) = [w for w in warnings if str(directory / "200") in w]
  assert len(warning.splitlines()) <= 5 and len(warning) < 800, warning
  assert "tensorstore_spec" not in warning and "{" not in warning
  stderr = capfd.readouterr().err
  assert "Exception ignored" not in stderr
  assert "Traceback" not in stderr
