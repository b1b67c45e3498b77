"""Gradient accumulation: `scan` inside the step and `optax.MultiSteps`, against one big batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainjax import chain as chain_lib
from chainjax import data as data_lib
from chainjax import stages
from chainjax import experiment
from chainjax import train

from helpers import load_config

A = 4  # accum_steps
B = 64  # global batch


def _setup(config):
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  return task, model, chain_lib.ChainLoss.from_config(config, task.label_specs)


def _masked_batches(task, n=10):
  """Global batches with ~30% padding, spread unevenly over the micro-batches."""
  rng = np.random.default_rng(0)
  for step in range(n):
    batch = task.train_batch(step, B)
    batch["mask"] = (rng.random(B) > 0.3).astype(np.float32)
    batch["mask"][: 3 * A : A] = 0.0  # micro-batch 0 loses more examples than the others
    yield batch


def _tx(clip: bool):
  schedule = optax.linear_schedule(0.5, 0.05, 10)  # changes every update: pins the step indexing
  # SGD+momentum is linear in the gradient; Adam's g/sqrt(v) would amplify float summation-order
  # noise in near-zero gradients to O(lr) and hide what this test checks.
  tx = optax.sgd(schedule, momentum=0.9)
  return optax.chain(optax.clip_by_global_norm(0.05), tx) if clip else tx


def _run_big_batch(model, loss_fn, tx, batches):
  graphdef, state = experiment.init_train_state(model, tx)
  step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0))
  for batch in batches:
    state, _ = step(state, jax.tree.map(jnp.asarray, batch))
  return state


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("impl", ["scan", "optax"])
def test_accumulation_matches_one_big_batch(impl, clip):
  config = load_config("default", "runlocal", **{"data.d": 16})
  task, model, loss_fn = _setup(config)
  batches = list(_masked_batches(task))
  params0 = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
  big = _run_big_batch(model, loss_fn, _tx(clip), batches)

  if impl == "scan":
    tx = _tx(clip)
    graphdef, state = experiment.init_train_state(model, tx)
    step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, accum_steps=A))
    for batch in batches:
      state, _ = step(state, jax.tree.map(jnp.asarray, batch))
  else:
    tx = optax.MultiSteps(_tx(clip), every_k_schedule=A).gradient_transformation()
    graphdef, state = experiment.init_train_state(model, tx)
    step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, accum_steps=A))
    for batch in batches:
      denominator = jnp.float32(batch["mask"].sum() / A)
      for i in range(A):
        micro = jax.tree.map(lambda x: jnp.asarray(x[i::A]), batch)
        state, _ = step(state, micro, denominator, jnp.int32(i))
  assert int(state.step) == len(batches) == int(big.step)  # counters count optimizer updates
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
               nnx.to_pure_dict(state.params), nnx.to_pure_dict(big.params))
  moved = optax.tree.norm(jax.tree.map(jnp.subtract, nnx.to_pure_dict(state.params), params0))
  assert float(moved) > 1e-3  # training did move the parameters


def _bn_config():
  config = load_config("line_parity", "runlocal")
  config.chain.stages[0] = stages.stage_config("conv", name="image", features=(4,), norm="batch",
                                               pass_to_next="prediction")
  return config


def test_batchnorm_statistics_are_per_micro_batch():
  """Documented behaviour: with accum_steps=A each micro-batch is normalised by its own statistics,
  so the accumulated gradient equals the sum of per-micro-batch gradients (not the big-batch one)."""
  config = _bn_config()
  task, model, loss_fn = _setup(config)
  batch = jax.tree.map(jnp.asarray, task.train_batch(0, 16))
  tx = optax.sgd(1.0)
  graphdef, state = experiment.init_train_state(model, tx)
  params0 = nnx.to_pure_dict(state.params)
  acc_state, _ = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, accum_steps=A))(state, batch)

  graphdef, state = experiment.init_train_state(model, tx)
  grads_sum, rest = None, state.rest
  for i in range(A):
    micro = jax.tree.map(lambda x: x[i::A], batch)

    def objective(params, rest=rest, micro=micro):
      m = nnx.merge(graphdef, params, rest, copy=True)
      out = m(micro["inputs"], mode=loss_fn.mode, train=True)
      return loss_fn(out, micro["labels"], micro["mask"], denominator=jnp.float32(16))[0], nnx.state(m, nnx.Not(nnx.Param))

    grads, rest = jax.grad(objective, has_aux=True)(state.params)
    grads_sum = grads if grads_sum is None else jax.tree.map(jnp.add, grads_sum, grads)
  expected = jax.tree.map(jnp.subtract, params0, nnx.to_pure_dict(grads_sum))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               nnx.to_pure_dict(acc_state.params), expected)
  # Running statistics were updated once per micro-batch, in order.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               nnx.to_pure_dict(acc_state.rest), nnx.to_pure_dict(rest))
  big_state, _ = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0))(
      experiment.init_train_state(model, tx)[1], batch)
  assert not np.allclose(jax.tree.leaves(nnx.to_pure_dict(big_state.params))[0],
                         jax.tree.leaves(nnx.to_pure_dict(acc_state.params))[0])


def test_accumulated_gradient_is_the_only_extra_parameter_sized_buffer():
  """Compiled temp memory of accum_steps=A on the global batch vs. one micro-batch step."""
  config = load_config("default", "", **{"data.d": 64})
  config.chain.stages = [stages.stage_config("mlp", name=f"l{i}", features=1024, depth=1) for i in (1, 2, 3)]
  task, model, loss_fn = _setup(config)
  tx = optax.sgd(1e-3)
  graphdef, state = experiment.init_train_state(model, tx)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
  micro = jax.tree.map(jnp.asarray, task.train_batch(0, 8))
  full = jax.tree.map(jnp.asarray, task.train_batch(0, 8 * A))

  def temp_bytes(accum, batch):
    compiled = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, accum_steps=accum)).lower(
        state, batch).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("memory_analysis() is not available on this backend")
    return analysis.temp_size_in_bytes

  extra = temp_bytes(A, full) - temp_bytes(1, micro)
  assert extra <= 1.25 * param_bytes, (extra, param_bytes)


def test_both_implementations_through_the_training_loop_match_the_big_batch(tmp_path):
  """`train_and_evaluate` with `accum_impl` "scan" and "optax" (4 micro-batches) ends where the
  4x larger batch ends: same global batches, same updates (SGD with momentum, a schedule that
  changes every update), so a micro-batch denominator or step count that is off shows at once."""
  import helpers

  def final_params(name, **overrides):
    config = load_config("default", "runlocal", total_steps=12, eval_every=12, checkpoint_every=12, **{
        "data.d": 16, "optim.optimizer": "sgd", "optim.momentum": 0.9, "optim.learning_rate": 0.2,
        "optim.schedule": "warmup_linear", "optim.warmup_steps": 3, **overrides})
    final = train.train_and_evaluate(config, str(tmp_path / name))
    return final, helpers.final_state(tmp_path / name)["tree"]["params"]

  big_final, big = final_params("big")
  for impl in ("scan", "optax"):
    final, params = final_params(impl, **{"optim.accum_steps": A, "optim.accum_impl": impl})
    assert final["step"] == big_final["step"] == 12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, big)
    assert final["eval/loss"] == pytest.approx(big_final["eval/loss"], rel=1e-5)
  moved = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(big))
  assert moved > 0
