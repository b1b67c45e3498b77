"""When and on what QAT trains: `compress.qat.boundary_bits` (stage outputs on a grid), `compress.qat.start_step`
(float updates first), and `compress.init_from` (the initial state from another run's checkpoint)."""

import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from chainjax import chain as chain_lib
from chainjax import data as data_lib
from chainjax import experiment
from chainjax import train
from chainjax.compress import quant
from chainjax.errors import ConfigError
from helpers import assert_trees_equal, checkpoint_steps, final_state, load_config

RULES = ("stages/level2/.* w=4 a=8",)


def _config(**overrides):
  """The tiny 3-stage MLP chain of the checkpoint fixture (width 16, batch 32, 40 updates), constant LR."""
  return load_config("../tests/fixtures/resume_config", **{"optim.schedule": "constant", **overrides})


def _name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _by_path(tree) -> dict:
  """`{"a/b/c": numpy array}`; a Variable's `value` level dropped (nnx.State and checkpoint trees alike)."""
  out = {}
  for path, leaf in jax.tree.leaves_with_path(tree):
    names = [_name(k) for k in path]
    out["/".join(names[:-1] if names[-1] == "value" else names)] = np.asarray(leaf)
  return out


def _assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _observers(rest, leaf="count") -> dict:
  """`{path: value}` of one observer variable (`count`, `min`, `max`) of every activation quantizer."""
  return {k: v.item() for k, v in _by_path(rest).items() if quant.is_quantizer_path(k.split("/")) and k.endswith(leaf)}


def _updates(config, n: int, snapshot_at: int | None = None):
  """(loss of each update, host copy of (params, rest) after `snapshot_at` updates, final state, experiment)."""
  exp = experiment.Experiment(config)
  state = exp.init_state()
  batches = exp.task.train_iterator(config.batch_size, data_lib.Shard.of_this_process())
  losses, snapshot = [], None
  with jax.set_mesh(exp.mesh):
    sums = exp.phase_at(0).zero_sums()
    for step in range(n):
      if step == snapshot_at:
        snapshot = jax.device_get((state.params, state.rest))
      state, sums, metrics = exp.update(exp.phase_at(step), state, sums, next(batches))
      losses.append(np.asarray(metrics["loss"]))
  return losses, snapshot, state, exp


# --------------------------------------------------------------------------------------------
# compress.qat.boundary_bits
# --------------------------------------------------------------------------------------------


def test_boundary_bits_put_every_stage_output_on_its_grid():
  _, _, state, exp = _updates(_config(**{"compress.qat.boundary_bits": 4}), 3)
  model = nnx.merge(exp.graphdef, jax.device_get(state.params), jax.device_get(state.rest))
  x = next(exp.task.eval_iterator(64, data_lib.Shard()))["inputs"]
  out = model(x)  # eval: the observed ranges
  h = x
  for name, got in zip(exp.stage_names, out.hiddens):
    link = model.stages[name]
    assert isinstance(link.out_quant, quant.BoundaryQuantizer) and int(link.out_quant.count[...]) == 3
    body = np.asarray(link.body(h, train=False))
    assert len(np.unique(body)) > 16  # the float output of the body ...
    scale, zero_point = quant.range_qparams(link.out_quant.min[...], link.out_quant.max[...], 4, symmetric=False)
    grid = np.asarray(got) / float(scale) + float(zero_point)
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)  # ... passes down the chain on the 4-bit grid
    assert np.round(grid).min() >= 0 and np.round(grid).max() <= 15 and len(np.unique(got)) <= 16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(link.out_quant(body, train=False)))
    h = got
  assert set(_observers(state.rest)) == {f"stages/{name}/out_quant/count" for name in exp.stage_names}


def test_zero_boundary_bits_build_the_float_chain_and_disabled_quantizers_are_the_identity():
  config = _config()
  task = experiment.validate(config, num_devices=8)
  float_chain = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  assert all(link.out_quant is None for link in float_chain.stages.values())
  plain = chain_lib.Chain(config.chain.stages, task.input_shape, task.input_dtype, task.label_specs, rngs=nnx.Rngs(0))
  assert_trees_equal(nnx.to_pure_dict(nnx.state(float_chain)), nnx.to_pure_dict(nnx.state(plain)))
  x = next(task.eval_iterator(64, data_lib.Shard()))["inputs"]
  want = plain(x, train=True)
  for a, b in zip(float_chain(x, train=True).hiddens, want.hiddens):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.compress.qat.boundary_bits = 8
  config.compress.qat.rules = RULES
  quantized = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  with quant.enabled(False):
    got = quantized(x, train=True)
  for a, b in zip(got.hiddens + got.predictions, want.hiddens + want.predictions):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert set(_observers(nnx.state(quantized)).values()) == {0}  # nothing observed while disabled
  got = quantized(x, train=True)
  assert not np.array_equal(np.asarray(got.hiddens[0]), np.asarray(want.hiddens[0]))
  assert set(_observers(nnx.state(quantized)).values()) == {1}


@pytest.mark.parametrize("overrides,field,message", [
    ({"compress.qat.boundary_bits": 1}, "compress.qat.boundary_bits", "must be 0 (float) or in 2..8, got 1"),
    ({"compress.qat.boundary_bits": 9}, "compress.qat.boundary_bits", "must be 0 (float) or in 2..8, got 9"),
    ({"compress.qat.start_step": 5}, "compress.qat.start_step", "5 delays quantization-aware training, but there "
     "is none"),
    ({"compress.qat.start_step": 40, "compress.qat.rules": RULES}, "compress.qat.start_step",
     "must be below the run's 40 updates"),
])
def test_bad_qat_schedules_are_one_config_line(overrides, field, message):
  with pytest.raises(ConfigError) as info:
    experiment.validate(_config(**overrides), num_devices=8)
  assert info.value.field == field and str(info.value).startswith(f"config.{field}: {message}")
  assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# compress.qat.start_step
# --------------------------------------------------------------------------------------------


def test_start_step_trains_float_first_then_quantized():
  """Updates 0..5 are the float run's, bit for bit (quantized layers and boundary quantizers off, observers
  untouched); from update 6 on the losses are the quantized model's and every observer counts them."""
  start, n = 6, 12
  float_losses, float_snapshot, _, _ = _updates(_config(), n, snapshot_at=start)
  config = _config(**{"compress.qat.rules": RULES, "compress.qat.boundary_bits": 8, "compress.qat.start_step": start})
  losses, (params, rest), state, exp = _updates(config, n, snapshot_at=start)
  np.testing.assert_array_equal(losses[:start], float_losses[:start])
  assert all(a != b for a, b in zip(losses[start:], float_losses[start:])), (losses, float_losses)
  _assert_same(_by_path(params), _by_path(float_snapshot[0]))  # the float run's parameters at start_step
  assert len(_observers(rest)) == 2 + 3 and set(_observers(rest).values()) == {0}  # level2's layers, every stage
  assert set(_observers(state.rest).values()) == {n - start}
  assert [exp.phase_at(s).quantized for s in (0, start - 1, start, n - 1)] == [False, False, True, True]
  assert exp.phases[-1].quantized and exp.phase_at(0).tx is exp.phases[0].tx  # one optimizer, one schedule


def test_start_step_run_resumes_across_it_exactly(tmp_path, caplog):
  """A run checkpointed at step 10, during its float updates, resumes into QAT (from update 15) and ends
  bit-identical to the uninterrupted run (eval at step 10 is the float model's, at 20 the quantized one's)."""
  config = _config(**{"compress.qat.rules": RULES, "compress.qat.start_step": 15, "total_steps": 20,
                      "eval_every": 10, "checkpoint_every": 10})
  full, cut = tmp_path / "full", tmp_path / "cut"
  with caplog.at_level(logging.INFO):
    final = train.train_and_evaluate(config, str(full))
  assert "Quantization-aware training from update 15 on" in caplog.text
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "20")
  resumed = train.train_and_evaluate(config, str(cut))
  assert_trees_equal(final_state(full)["tree"], final_state(cut)["tree"])
  assert resumed["eval/accuracy"] == final["eval/accuracy"]
  assert set(_observers(final_state(full, 10)["tree"]["rest"]).values()) == {0}
  assert set(_observers(final_state(full)["tree"]["rest"]).values()) == {5}


# --------------------------------------------------------------------------------------------
# compress.init_from
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
  """A finished 20-update float run of `_config()`."""
  workdir = tmp_path_factory.mktemp("float_run")
  train.train_and_evaluate(_config(total_steps=20), str(workdir))
  return workdir


def test_init_from_starts_from_the_source_parameters(float_run, caplog):
  source = final_state(float_run)["tree"]
  config = _config(**{"compress.init_from": str(float_run), "compress.qat.rules": RULES})
  exp = experiment.Experiment(config)
  with caplog.at_level(logging.INFO):
    state = exp.init_state()
  assert f"Initial parameters and non-parameter state from {float_run}, step 20" in caplog.text
  assert "activation quantizers start fresh" in caplog.text
  want = _by_path(source["params"])
  _assert_same(_by_path(state.params), want)
  seeded = _by_path(experiment.Experiment(_config()).init_state().params)
  assert not any(np.array_equal(seeded[name], want[name]) for name in want)  # not the seed's
  assert len(_observers(state.rest)) == 2 and set(_observers(state.rest).values()) == {0}  # fresh observers
  assert int(state.step) == 0 and all(not np.any(m) for m in jax.tree.leaves(state.opt_state) if np.ndim(m))


def test_a_float_checkpoint_fine_tunes_with_qat(float_run, tmp_path):
  """QAT fine-tuning of the float run trains (observers count its updates), resumes its own checkpoint
  without reading init_from again (the source is gone by then), and a run initialized from it takes its
  observers too (the source has them)."""
  source = tmp_path / "source"
  shutil.copytree(float_run, source)
  config = lambda **o: _config(**{"compress.init_from": str(source), "compress.qat.rules": RULES, "eval_every": 10,
                                  "checkpoint_every": 10, **o})
  tuned = tmp_path / "tuned"
  train.train_and_evaluate(config(total_steps=10), str(tuned))
  shutil.rmtree(source)
  final = train.train_and_evaluate(config(total_steps=20), str(tuned))
  assert final["step"] == 20 and np.isfinite(final["eval/loss"]) and checkpoint_steps(tuned) == [10, 20]
  state = final_state(tuned)["tree"]
  assert set(_observers(state["rest"]).values()) == {20}
  start = _by_path(final_state(float_run)["tree"]["params"])
  assert all(not np.array_equal(v, start[k]) for k, v in _by_path(state["params"]).items())  # every weight trained
  again = experiment.Experiment(_config(**{"compress.init_from": str(tuned), "compress.qat.rules": RULES})).init_state()
  for leaf in ("count", "min", "max"):
    assert len(_observers(state["rest"], leaf)) == 2
    _assert_same(_observers(again.rest, leaf), _observers(state["rest"], leaf))
  _assert_same(_by_path(again.params), _by_path(state["params"]))


def test_bad_init_from_is_one_config_line(float_run, tmp_path):
  (tmp_path / "empty").mkdir()
  for path, message in ((tmp_path / "missing", "is not a directory"), (tmp_path / "empty", "has no checkpoint")):
    with pytest.raises(ConfigError) as info:
      experiment.Experiment(_config(**{"compress.init_from": str(path)}))
    assert info.value.field == "compress.init_from" and "\n" not in str(info.value)
    assert str(info.value).startswith(f"config.compress.init_from: {path} {message}")
  wider = _config(**{"compress.init_from": str(float_run)})
  for stage in wider.chain.stages:
    stage.features = 32
  with pytest.raises(ConfigError) as info:  # checked on a fresh start, before the run writes anything else
    train.train_and_evaluate(wider, str(tmp_path / "wider"))
  assert info.value.field == "compress.init_from" and "\n" not in str(info.value)
  assert f"the checkpoint in {float_run} does not fit this config" in str(info.value)
  assert "shape (16, 16) saved vs (16, 32) target" in str(info.value)
  assert not (tmp_path / "wider" / "config.json").exists()


def test_early_stopping_waits_for_qat_and_starts_over_with_it(tmp_path):
  """With a bar no eval can clear (min_delta 10) and patience 1, a float run stops at its second eval; with
  start_step 20 the run trains on to QAT, and early stopping counts from the first quantized eval."""
  stopping = {"early_stopping.metric": "eval/loss", "early_stopping.mode": "min", "early_stopping.patience": 1,
              "early_stopping.min_delta": 10.0, "eval_every": 5, "checkpoint_every": 40, "total_steps": 40}
  float_run = train.train_and_evaluate(_config(**stopping), str(tmp_path / "float"))
  assert float_run["step"] == 10
  qat_run = train.train_and_evaluate(
      _config(**stopping, **{"compress.qat.rules": RULES, "compress.qat.start_step": 20}), str(tmp_path / "qat"))
  assert qat_run["step"] == 30  # eval 25 sets QAT's bar, eval 30 misses it
