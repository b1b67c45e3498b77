"""Dtype policy and loss scaling: parsing, skipped overflow steps, scale growth and floor, and
a custom min_scale that survives jit and an Orbax round trip (what jmp loses)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from chainjax import precision


def _bits(tree):
  """Every leaf's raw bytes, so -0.0 != 0.0 and NaN payloads count."""
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _params():
  return {"w": jnp.array([[1.0, -0.0], [0.5, -2.0]], jnp.float32), "b": jnp.array([0.0, -0.0], jnp.float32)}


def _grads(value=1.0):
  return jax.tree.map(lambda p: jnp.full_like(p, value), _params())


# --------------------------------------------------------------------------------------------
# Policy.
# --------------------------------------------------------------------------------------------


def test_policy_parses_long_short_and_single_forms():
  p = precision.get_policy("params=float32,compute=bfloat16,output=float32")
  assert (p.param_dtype, p.compute_dtype, p.output_dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
  p = precision.get_policy(" params = f32 , compute = f16 , output = bf16 ")
  assert (p.param_dtype, p.compute_dtype, p.output_dtype) == (jnp.float32, jnp.float16, jnp.bfloat16)
  p = precision.get_policy("bf16")
  assert p.param_dtype == p.compute_dtype == p.output_dtype == jnp.bfloat16
  p = precision.get_policy("compute=bf16")  # missing keys are float32
  assert (p.param_dtype, p.compute_dtype, p.output_dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
  assert precision.get_policy(p) is p


@pytest.mark.parametrize("spec, words", [
    ("params=float32,compute=float8", ["float8", "bfloat16", "f16"]),
    ("param=f32", ["params", "compute", "output"]),
    ("compute=bf16,compute=f16", ["twice"]),
    ("float64", ["float64", "float32"]),
    ("", ["empty", "params="]),
    ("params", ["params", "float32"]),
])
def test_policy_rejects_bad_strings_naming_what_is_allowed(spec, words):
  with pytest.raises(ValueError) as info:
    precision.get_policy(spec)
  for word in words:
    assert word in str(info.value)


def test_policy_casts_only_floating_leaves():
  policy = precision.get_policy("params=f32,compute=bf16,output=f32")
  tree = {"w": jnp.ones((2, 3), jnp.float32), "ids": jnp.arange(3, dtype=jnp.int32),
          "mask": jnp.array([True, False]), "x": np.ones(2, np.float16), "n": 3}
  compute = policy.cast_to_compute(tree)
  assert compute["w"].dtype == jnp.bfloat16 and compute["x"].dtype == jnp.bfloat16
  assert compute["ids"].dtype == jnp.int32 and compute["mask"].dtype == jnp.bool_ and compute["n"] == 3
  np.testing.assert_array_equal(compute["ids"], tree["ids"])
  output = policy.cast_to_output(compute)  # predictions back to the output dtype before the loss
  assert output["w"].dtype == jnp.float32 and output["ids"].dtype == jnp.int32 and output["n"] == 3
  assert policy.cast_to_output(jnp.ones(2, jnp.float16)).dtype == jnp.float32
  # An NNX parameter state (what the train step casts) keeps its structure.
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  cast = policy.cast_to_compute(params)
  assert {x.dtype for x in jax.tree.leaves(cast)} == {np.dtype(jnp.bfloat16)}
  assert jax.tree.structure(cast) == jax.tree.structure(params)


# --------------------------------------------------------------------------------------------
# Dynamic loss scale.
# --------------------------------------------------------------------------------------------


def test_overflow_step_is_skipped_params_and_inner_state_unchanged():
  tx = precision.dynamic_loss_scale(optax.adam(0.1), initial_scale=2.0**10, period=3)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  # One finite step first, so the inner (adam) state is not trivially zero.
  # (Its updates are not applied, so that params keep their -0.0 entries for the bit check.)
  _, state = update(_grads(2.0**10), state, params)
  assert np.signbit(params["b"][1]) and params["b"][1] == 0.0
  assert int(state.good_steps) == 1 and int(state.inner_state[0].count) == 1
  train_step, before = 1, state

  grads = _grads(2.0**10)
  grads["w"] = grads["w"].at[0, 1].set(jnp.inf)  # an fp16 overflow in the backward pass
  grads["b"] = grads["b"].at[0].set(jnp.nan)
  updates, state = update(grads, state, params)
  new_params = optax.apply_updates(params, updates)
  train_step += 1  # the outer loop still counts the step

  assert not bool(precision.is_finite_step(before, state))
  assert _bits(new_params) == _bits(params)  # bit-identical, -0.0 entries included
  assert _bits(jax.jit(optax.apply_updates)(params, updates)) == _bits(params)
  assert _bits(state.inner_state) == _bits(before.inner_state)
  assert float(state.scale) == 2.0**9
  assert int(state.skipped_steps) == 1 and int(precision.skipped_steps(state)) == 1
  assert int(state.good_steps) == 0
  assert train_step == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((updates, state)))

  # The next finite step goes through as usual.
  after_skip = state
  updates, state = update(_grads(2.0**9), state, new_params)
  assert bool(precision.is_finite_step(after_skip, state))
  assert int(state.inner_state[0].count) == 2 and int(state.good_steps) == 1


def test_period_finite_steps_double_the_scale():
  tx = precision.dynamic_loss_scale(optax.sgd(0.1), initial_scale=8.0, period=4, factor=2.0)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  scales = []
  for _ in range(12):
    _, state = update(_grads(), state, params)
    scales.append(float(state.scale))
  assert scales == [8.0] * 3 + [16.0] * 4 + [32.0] * 4 + [64.0]
  assert int(state.skipped_steps) == 0 and int(state.good_steps) == 0


def test_overflow_resets_the_growth_counter():
  tx = precision.dynamic_loss_scale(optax.sgd(0.1), initial_scale=8.0, period=3)
  params = _params()
  state = tx.init(params)
  for g in (1.0, 1.0, np.inf, 1.0, 1.0):
    _, state = tx.update(_grads(g), state, params)
  assert float(state.scale) == 4.0 and int(state.good_steps) == 2  # no growth: the overflow broke the run
  _, state = tx.update(_grads(), state, params)
  assert float(state.scale) == 8.0 and int(state.good_steps) == 0


def test_scale_never_drops_below_min_scale():
  tx = precision.dynamic_loss_scale(optax.sgd(0.1), initial_scale=2.0**15, min_scale=1.0)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(40):
    _, state = update(_grads(np.inf), state, params)
  assert float(state.scale) == 1.0 and int(state.skipped_steps) == 40


def test_scale_growth_stops_before_float32_overflow():
  tx = precision.dynamic_loss_scale(optax.sgd(0.1), initial_scale=2.0**127, period=1)
  state = tx.init(_params())
  for _ in range(3):
    _, state = tx.update(_grads(), state, _params())
  assert float(state.scale) == 2.0**127


def _overflow_floor(update, state, params, steps=20):
  for _ in range(steps):
    _, state = update(_grads(np.inf), state, params)
  return state


def test_custom_min_scale_survives_jit_and_orbax_round_trip(tmp_path):
  params = _params()
  tx = precision.dynamic_loss_scale(optax.adam(1e-3), initial_scale=2.0**12, min_scale=4.0)
  state = jax.jit(tx.init)(params)
  assert float(state.min_scale) == 4.0
  # Through jit: a state passed in and out of a jitted update many times keeps its floor.
  state = _overflow_floor(jax.jit(tx.update), state, params)
  assert float(state.scale) == 4.0 and float(state.min_scale) == 4.0

  # Through Orbax: save, restore onto an abstract target (as train.py resumes).
  fresh = jax.jit(tx.init)(params)
  path = tmp_path / "state"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, fresh)
    ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, abstract)
  assert isinstance(restored, precision.LossScaleState)
  assert float(restored.min_scale) == 4.0 and float(restored.scale) == 2.0**12
  assert jax.tree.structure(restored) == jax.tree.structure(fresh)

  # The restored state governs: even a transformation rebuilt with the default floor (1.0)
  # stops at the checkpoint's 4.0 -- the value jmp would have lost.
  rebuilt = precision.build_loss_scale("dynamic:initial_scale=2**12", optax.adam(1e-3))
  state = _overflow_floor(jax.jit(rebuilt.update), restored, params)
  assert float(state.scale) == 4.0 and int(state.skipped_steps) == 20


# --------------------------------------------------------------------------------------------
# Static loss scale, config strings, finding the state.
# --------------------------------------------------------------------------------------------


def test_static_scale_unscales_exactly():
  scale = 2.0**12
  tx = precision.static_loss_scale(optax.sgd(1.0), scale)
  grads = {"w": jax.random.normal(jax.random.key(0), (5, 3)), "b": jnp.linspace(-3.0, 3.0, 3)}
  scaled = jax.tree.map(lambda g: g * scale, grads)
  state = tx.init(grads)
  updates, new_state = jax.jit(tx.update)(scaled, state, grads)
  assert _bits(updates) == _bits(jax.tree.map(jnp.negative, grads))
  assert float(precision.current_loss_scale(new_state)) == scale
  assert int(precision.skipped_steps(new_state)) == 0
  # No skipping with a static scale: a non-finite gradient reaches the optimizer (fail fast).
  updates, _ = tx.update({"w": jnp.full((5, 3), jnp.inf), "b": jnp.zeros(3)}, state, grads)
  assert not np.isfinite(np.asarray(updates["w"])).any()


def test_build_loss_scale_from_config_strings():
  inner = optax.sgd(0.1)
  params = _params()
  assert precision.build_loss_scale("none", inner) is inner
  state = precision.build_loss_scale("static:1024", inner).init(params)
  assert float(precision.current_loss_scale(state)) == 1024.0
  state = precision.build_loss_scale("dynamic", inner).init(params)
  assert float(state.scale) == 2.0**15 and float(state.min_scale) == 1.0
  tx = precision.build_loss_scale("dynamic:initial_scale=1024,period=2,factor=4,min_scale=16", inner)
  state = tx.init(params)
  assert float(state.scale) == 1024.0 and float(state.min_scale) == 16.0
  for _ in range(2):
    _, state = tx.update(_grads(), state, params)
  assert float(state.scale) == 4096.0  # factor 4 after period 2
  assert precision.parse_loss_scale("dynamic:initial_scale=2**15") == ("dynamic", {"initial_scale": 32768.0})


@pytest.mark.parametrize("spec", ["", "dynamic:period=1.5", "dynamic:gamma=2", "static:", "static:abc",
                                  "none:1", "bf16", "dynamic:min_scale=8,min_scale=4"])
def test_build_loss_scale_rejects_bad_strings_naming_the_forms(spec):
  with pytest.raises(ValueError) as info:
    precision.build_loss_scale(spec, optax.sgd(0.1))
  if spec not in ("static:abc",):
    assert "none, static:<value>, dynamic" in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(factor=1.0), dict(period=0), dict(min_scale=0.0),
                                    dict(initial_scale=2.0, min_scale=4.0), dict(initial_scale=np.inf)])
def test_dynamic_loss_scale_rejects_bad_options(kwargs):
  with pytest.raises(ValueError):
    precision.dynamic_loss_scale(optax.sgd(0.1), **kwargs)


def test_current_loss_scale_finds_the_state_inside_chains_and_partitions():
  params = _params()
  assert float(precision.current_loss_scale(optax.sgd(0.1).init(params))) == 1.0
  assert int(precision.skipped_steps(optax.sgd(0.1).init(params))) == 0
  scaled = precision.dynamic_loss_scale(optax.adam(1e-3), initial_scale=512.0)
  chained = optax.chain(optax.clip_by_global_norm(1.0), scaled)
  assert float(precision.current_loss_scale(chained.init(params))) == 512.0
  partitioned = optax.partition({"a": scaled, "b": optax.sgd(0.1)}, {"w": "a", "b": "b"})
  assert float(precision.current_loss_scale(partitioned.init(params))) == 512.0
  twice = optax.chain(scaled, precision.static_loss_scale(optax.sgd(0.1), 8.0))
  with pytest.raises(ValueError, match="wrap the whole optimizer"):
    precision.current_loss_scale(twice.init(params))


def test_extra_args_reach_the_inner_optimizer():
  inner = optax.chain(optax.sgd(1.0), optax.contrib.reduce_on_plateau(patience=0, factor=0.5, cooldown=0))
  tx = precision.dynamic_loss_scale(inner, initial_scale=4.0)
  params = _params()
  state = tx.init(params)
  for value in (1.0, 2.0, 3.0):
    updates, state = tx.update(_grads(4.0), state, params, value=jnp.asarray(value))
  assert float(updates["b"][0]) < -0.0 and float(updates["b"][0]) > -1.0  # plateau halved the step


# --------------------------------------------------------------------------------------------
# End to end on a toy linear model.
# --------------------------------------------------------------------------------------------


def test_fp16_compute_with_scaled_loss_matches_fp32_gradients():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (64, 16))  # [B, D]
  targets = jax.random.normal(k3, (64, 4))
  params = {"w": 0.3 * jax.random.normal(k2, (16, 4)), "b": jnp.zeros(4)}

  def loss_of(policy, opt_state):
    def loss_fn(params):
      p, inputs = policy.cast_to_compute(params), policy.cast_to_compute(x)
      prediction = policy.cast_to_output(inputs @ p["w"] + p["b"])
      loss = 1e-6 * jnp.mean((prediction - targets) ** 2)  # small, so fp16 cotangents underflow
      return loss.astype(jnp.float32) * precision.current_loss_scale(opt_state)  # as the train step does
    return loss_fn

  fp32, fp16 = precision.get_policy("f32"), precision.get_policy("params=f32,compute=f16,output=f32")
  tx = precision.dynamic_loss_scale(optax.sgd(1.0), initial_scale=2.0**15)
  opt_state = tx.init(params)
  reference = jax.grad(loss_of(fp32, optax.sgd(1.0).init(params)))(params)
  unscaled16 = jax.grad(loss_of(fp16, optax.sgd(1.0).init(params)))(params)
  scaled16 = jax.jit(jax.grad(loss_of(fp16, opt_state)))(params)
  assert {g.dtype for g in jax.tree.leaves(scaled16)} == {np.dtype(jnp.float32)}  # grads in param dtype
  updates, opt_state = jax.jit(tx.update)(scaled16, opt_state, params)
  assert bool(precision.is_finite_step(tx.init(params), opt_state))

  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  for name in params:
    assert rel(-updates[name], reference[name]) < 5e-3  # scaled fp16 ~ fp32
    assert rel(unscaled16[name], reference[name]) > 0.5  # without scaling, fp16 loses the gradient


def test_train_step_keeps_params_bit_identical_on_a_skipped_step_for_any_wrapping_order():
  """`make_train_step` on a batch whose loss is NaN, with the loss scale inside a chain that negates
  afterwards: -0.0 updates become +0.0, so a plain `apply_updates` would flip the -0.0 parameters;
  the step's select on `is_finite_step` keeps every parameter's bits."""
  from chainjax import chain as chain_lib
  from chainjax import data as data_lib
  from chainjax import experiment
  from helpers import load_config

  config = load_config("default", "runlocal", **{"data.d": 16})
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  tx = optax.chain(precision.dynamic_loss_scale(optax.identity()), optax.scale(-1.0))
  graphdef, state = experiment.init_train_state(model, tx)
  state = state._replace(params=jax.tree.map(lambda p: p.at[..., 0].set(-0.0), state.params))  # signed zeros
  before = _bits(state.params)
  batch = jax.tree.map(jnp.asarray, task.train_batch(0, 32))
  batch["inputs"] = batch["inputs"].at[0].set(jnp.nan)  # one poisoned example: NaN loss and gradient
  step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, dynamic_loss_scale=True))
  new_state, metrics = step(state, batch)
  assert float(metrics["skipped"]) == 1.0 and float(metrics["skipped_steps"]) == 1.0
  assert _bits(new_state.params) == before
  assert int(new_state.step) == 1


def test_docstring_examples_run():
  import doctest
  result = doctest.testmod(precision, extraglobs={"jnp": jnp, "optax": optax}, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize("spec, why", [
    ("dynamic:period=-1", "period must be an integer >= 1, got -1"),
    ("dynamic:period=0", "period must be an integer >= 1, got 0"),
    ("dynamic:factor=1", "factor must be a finite number > 1, got 1.0"),
    ("dynamic:min_scale=0", "min_scale must be a finite number > 0, got 0.0"),
    ("dynamic:initial_scale=1,min_scale=2", "initial_scale (1.0) is below min_scale (2.0)"),
    ("dynamic:initial_scale=2**2000", "'2**2000'"),  # float overflow: not a number
    ("static:0", "scale must be a finite number > 0, got 0.0"),
    ("static:-4", "scale must be a finite number > 0, got -4.0"),
    ("static:inf", "scale must be a finite number > 0, got inf"),
])
def test_parse_loss_scale_refuses_what_the_builder_refuses(spec, why):
  """One check for both: a string parse_loss_scale accepts (what validate() runs) always builds."""
  with pytest.raises(ValueError) as parsed:
    precision.parse_loss_scale(spec)
  with pytest.raises(ValueError) as built:
    precision.build_loss_scale(spec, optax.sgd(0.1))
  assert str(parsed.value) == str(built.value)
  assert why in str(parsed.value) and str(parsed.value).startswith(f"loss scale {spec!r}: ")
  assert "\n" not in str(parsed.value)


@pytest.mark.parametrize("spec", ["none", "static:1024", "static:2**15", "dynamic", "dynamic:period=1",
                                  "dynamic:initial_scale=4,min_scale=4,factor=1.5,period=10"])
def test_every_parsed_loss_scale_builds(spec):
  kind, options = precision.parse_loss_scale(spec)
  tx = precision.build_loss_scale(spec, optax.sgd(0.1))
  state = tx.init(_params())
  expected = {"none": 1.0, "static": options.get("scale"), "dynamic": options.get("initial_scale", 2.0**15)}[kind]
  assert float(precision.current_loss_scale(state)) == expected


def test_a_skipped_step_leaves_batchnorm_statistics_and_optimizer_state_bit_identical():
  """Only the loss-scale counters move on a skipped (non-finite) step: parameters, BatchNorm running
  statistics and the optimizer's moments stay as they were, bit for bit."""
  from chainjax import chain as chain_lib
  from chainjax import config as config_lib
  from chainjax import data as data_lib
  from chainjax import stages
  from chainjax import experiment

  config = config_lib.base_config()
  config.data.name, config.data.num_images, config.data.eval_size = "line_parity", 2, 16
  config.chain.stages = [stages.stage_config("conv", name="s0", features=(4,), norm="batch"),
                         stages.stage_config("mlp", name="s1", features=8, depth=1)]
  config.chain.loss_weights = ()
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  tx = precision.dynamic_loss_scale(optax.adam(1e-3))
  graphdef, state = experiment.init_train_state(model, tx)
  assert jax.tree.leaves(state.rest)  # BatchNorm mean and var
  step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, dynamic_loss_scale=True))
  batch = jax.tree.map(jnp.asarray, task.train_batch(0, 8))
  state, _ = step(state, batch)  # one applied step: statistics and moments are no longer at their init
  before = jax.device_get(state)
  poisoned = dict(batch, inputs=batch["inputs"].at[0].set(jnp.nan))
  after, metrics = step(state, poisoned)
  assert float(metrics["skipped"]) == 1.0
  after = jax.device_get(after)
  for part in ("params", "rest"):
    assert _bits(getattr(after, part)) == _bits(getattr(before, part)), part
  inner_before = [x for x in jax.tree.leaves(before.opt_state.inner_state)]
  inner_after = [x for x in jax.tree.leaves(after.opt_state.inner_state)]
  assert _bits(inner_after) == _bits(inner_before)
  assert int(after.opt_state.skipped_steps) == int(before.opt_state.skipped_steps) + 1


def test_a_new_optimizer_state_takes_the_loss_scale_of_the_old_one():
  tx = precision.dynamic_loss_scale(optax.sgd(0.1), initial_scale=2.0**15)
  params = _params()
  old = tx.init(params)
  _, old = tx.update(_grads(np.inf), old, params)  # halves the scale, counts a skip
  carried = precision.with_loss_scale_of(tx.init(params), old)
  assert float(carried.scale) == 2.0**14 and int(carried.skipped_steps) == 1
  assert carried.inner_state == tx.init(params).inner_state  # the new optimizer's own state
  assert precision.with_loss_scale_of(optax.sgd(0.1).init(params), old) == optax.sgd(0.1).init(params)


def test_output_dtype_is_what_the_losses_read():
  """`output=bfloat16`: the heads' predictions are rounded to bfloat16 before the losses and metrics."""
  from chainjax import experiment
  from helpers import load_config

  base = load_config("default", "runlocal")
  batch = jax.tree.map(jnp.asarray, experiment.Experiment(base).task.train_batch(0, 64))
  losses = {}
  for output in ("float32", "bfloat16"):
    config = load_config("default", "runlocal", **{"precision.policy": f"params=float32,compute=float32,output={output}"})
    exp = experiment.Experiment(config)
    state = jax.device_get(exp.init_state())
    sums, _ = jax.jit(exp.phases[0].eval_fn)(state.params, state.rest, batch)
    losses[output] = float(sums["loss"])
  model = nnx.merge(exp.graphdef, state.params, state.rest)
  out = model(batch["inputs"])
  rounded = out.__class__(out.hiddens, tuple(y.astype(jnp.bfloat16).astype(jnp.float32) for y in out.predictions))
  expected, _ = exp.loss_fn(rounded, batch["labels"], batch["mask"], denominator=jnp.ones(()))
  assert losses["bfloat16"] == pytest.approx(float(expected), rel=1e-6)
  assert losses["bfloat16"] != losses["float32"]  # the rounding is visible in the loss
