"""The composition layer: one `Experiment` per config, its state, its phases, and restoring a workdir."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from chainjax import experiment
from chainjax.data import base
from helpers import final_state, load_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint_v1")


def _name(key) -> str:
  for attribute in ("key", "name", "idx"):  # dict key, attribute (nnx.State's `.value`), index
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _by_path(tree) -> dict:
  return {"/".join(_name(k) for k in path): np.asarray(v) for path, v in jax.tree.leaves_with_path(tree)}


@pytest.fixture(scope="module")
def exp():
  return experiment.Experiment(load_config("../tests/fixtures/resume_config"))


def test_restore_reads_the_newest_checkpoint_of_a_workdir(exp, tmp_path):
  shutil.copytree(FIXTURE, tmp_path / "run")
  step, state, meta = exp.restore(str(tmp_path / "run"))
  saved = final_state(FIXTURE, 20)["tree"]
  assert step == 20 and int(state.step) == 20 and not meta["finished"]
  assert isinstance(state, experiment.TrainState)
  for part in ("params", "opt_state"):
    got, want = _by_path(getattr(state, part)), _by_path(saved[part])
    assert sorted(got) == sorted(want)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert {leaf.sharding for leaf in jax.tree.leaves(state.params)} == {exp.replicated}


def test_restore_params_only_leaves_the_optimizer_state_on_disk(exp, tmp_path):
  shutil.copytree(FIXTURE, tmp_path / "run")
  step, state, _ = exp.restore(str(tmp_path / "run"), params_only=True)
  assert step == 20 and state.opt_state is None
  want = _by_path(final_state(FIXTURE, 20)["tree"]["params"])
  got = _by_path(state.params)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  model = nnx.merge(exp.graphdef, state.params, state.rest)  # a usable model, e.g. for evaluation or export
  assert model(np.zeros((2, 16), np.float32)).predictions[-1].shape == (2,)
  with jax.set_mesh(exp.mesh):  # and the experiment evaluates it as it is, without an optimizer state
    metrics = exp.evaluate(state, exp.task.eval_iterator(exp.config.eval_batch_size, base.Shard()))
  assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and np.isfinite(metrics["eval/loss"])


def test_restore_from_a_workdir_only_reads_it(exp, tmp_path):
  """An incomplete newer step (a trainer still writing it) is skipped, not moved aside; no folder is created."""
  run = tmp_path / "run"
  shutil.copytree(FIXTURE, run)
  (run / "checkpoints" / "40").mkdir()  # no commit marker: incomplete
  before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
  step, _, _ = exp.restore(str(run))
  assert step == 20
  assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
  assert exp.restore(str(tmp_path / "missing")) is None and not (tmp_path / "missing").exists()


def test_restore_of_a_workdir_without_checkpoints_is_none(exp, tmp_path):
  assert exp.restore(str(tmp_path)) is None


def test_init_state_has_the_abstract_state_shapes_and_shardings(exp):
  state, abstract = exp.init_state(), exp.abstract_state()
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert leaf.shape == spec.shape and leaf.dtype == spec.dtype and leaf.sharding == spec.sharding
  assert int(state.step) == 0 and int(state.nonfinite_step) == -1


def test_phases_follow_the_chain_mode():
  config = load_config("default", "mode=progressive_finetune,runlocal")
  exp = experiment.Experiment(config)
  assert [(p.start, p.end) for p in exp.phases] == [(0, 15), (15, 30), (30, 45), (45, 60)]
  assert [exp.phase_at(s).index for s in (0, 14, 15, 44, 45, 59)] == [0, 0, 1, 2, 3, 3]
  assert experiment.Experiment(load_config("default", "runlocal")).phases[0].end == 60
