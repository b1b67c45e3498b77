"""Tests for chainjax.checkpoint: round trip, retention, verification, resharding."""

import os
import pathlib
import shutil

from absl import logging
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
