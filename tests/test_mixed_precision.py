"""Mixed precision and loss scaling inside the train step and the training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chainjax import chain as chain_lib
from chainjax import data as data_lib
from chainjax import precision
from chainjax import experiment
from chainjax import train

from helpers import load_config


def _step_setup(loss_scale: str, policy: str):
  config = load_config("default", "runlocal", **{"data.d": 16, "precision.loss_scale": loss_scale,
                                                 "precision.policy": policy})
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  tx = experiment.build_tx(config, config.total_steps)
  graphdef, state = experiment.init_train_state(model, tx)
  step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, policy=precision.get_policy(policy),
                                       dynamic_loss_scale=loss_scale.startswith("dynamic")))
  batches = [jax.tree.map(jnp.asarray, task.train_batch(i, 64)) for i in range(3)]
  return state, step, batches


def test_fp16_overflow_is_skipped_params_unchanged_scale_halved():
  # A scale of 2**40 overflows float16 activations' gradients in the backward pass.
  state, step, batches = _step_setup("dynamic:initial_scale=2**40,period=1000,min_scale=1", "params=float32,"
                                     "compute=float16,output=float32")
  before = jax.tree.map(np.array, nnx.to_pure_dict(state.params))
  state, metrics = step(state, batches[0])
  assert float(metrics["skipped"]) == 1.0 and float(metrics["skipped_steps"]) == 1.0
  assert float(metrics["loss_scale"]) == 2.0**39
  assert int(state.step) == 1 and int(state.nonfinite_step) == -1  # counted, not a NaN stop
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint32), np.asarray(b).view(np.uint32)),
               before, nnx.to_pure_dict(state.params))  # bit for bit
  assert np.isfinite(float(metrics["loss"]))


def test_period_finite_steps_double_the_scale():
  state, step, batches = _step_setup("dynamic:initial_scale=8,period=2,min_scale=1", "params=float32,"
                                     "compute=float16,output=float32")
  scales = []
  for batch in batches:
    state, metrics = step(state, batch)
    scales.append(float(metrics["loss_scale"]))
    assert float(metrics["skipped"]) == 0.0
  assert scales == [8.0, 16.0, 16.0]
  assert float(precision.current_loss_scale(state.opt_state)) == 16.0


def test_loss_scale_and_its_min_scale_are_checkpointed(tmp_path):
  config = load_config("default", "runlocal", total_steps=20, checkpoint_every=10,
                       **{"precision.loss_scale": "dynamic:initial_scale=64,period=5,min_scale=4"})
  train.train_and_evaluate(config, str(tmp_path))
  from helpers import final_state
  tree = final_state(tmp_path)["tree"]
  leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  (min_scale,) = [v for k, v in leaves.items() if k.endswith("['min_scale']")]
  (scale,) = [v for k, v in leaves.items() if k.endswith("['scale']")]
  assert float(min_scale) == 4.0
  assert float(scale) == 64.0 * 2**4  # doubled every 5 finite updates over 20 updates


@pytest.mark.slow
def test_bf16_matches_fp32_accuracy_on_the_default_task(tmp_path):
  results = {}
  for policy in ("float32", "params=float32,compute=bfloat16,output=float32"):
    config = load_config("default", "", total_steps=800, eval_every=800, checkpoint_every=800,
                         **{"data.d": 32, "data.eval_size": 2048, "precision.policy": policy})
    results[policy] = train.train_and_evaluate(config, str(tmp_path / str(len(results))))["eval/accuracy"]
  fp32, bf16 = results.values()
  assert fp32 >= 0.95 and abs(fp32 - bf16) <= 0.01, results
