"""The optimizer: per-stage chains, schedules (update n uses schedule(n)), plateau, clipping, decay."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from chainjax import chain as chain_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import optim
from chainjax import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import default  # noqa: E402


def optim_config(**overrides):
  """`base_config().optim` with overrides; per_stage entries given as dicts of stage_optim kwargs."""
  o = config_lib.base_config().optim
  for key, value in overrides.items():
    if key == "per_stage":
      for stage, kwargs in value.items():
        o.per_stage[stage] = config_lib.stage_optim(**kwargs)
    else:
      o[key] = value
  return o


def stage_tree(names=("a", "b"), kernel=1.0, bias=0.5):
  """A chain-shaped parameter tree: `stages/<name>/body/{kernel [3, 4], bias [4]}`."""
  return {"stages": {n: {"body": {"kernel": jnp.full((3, 4), kernel, jnp.float32),
                                  "bias": jnp.full((4,), bias, jnp.float32)}} for n in names}}


def run_updates(tx, params, grads, steps):
  """`steps` jitted updates with fixed `grads`; returns (per-update updates, final params, opt state)."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  history = []
  for _ in range(steps):
    updates, state = update(grads, state, params)
    history.append(updates)
    params = optax.apply_updates(params, updates)
  return history, params, state


def leaf(tree, stage, name="kernel"):
  return np.asarray(tree["stages"][stage]["body"][name])


# --------------------------------------------------------------------------------------------
# Per-stage chains.
# --------------------------------------------------------------------------------------------


def test_per_stage_learning_rate_differs():
  o = optim_config(optimizer="sgd", momentum=0.0, learning_rate=0.1, per_stage={"a": {"learning_rate": 0.01}})
  params = stage_tree()
  grads = jax.tree.map(jnp.ones_like, params)
  (updates,), _, _ = run_updates(optim.build_optimizer(o, 10, ("a", "b")), params, grads, 1)
  np.testing.assert_allclose(leaf(updates, "a"), -0.01, rtol=1e-6)
  np.testing.assert_allclose(leaf(updates, "b"), -0.1, rtol=1e-6)
  np.testing.assert_allclose(leaf(updates, "a") / leaf(updates, "b"), 0.1, rtol=1e-6)


def test_lr_decay_per_stage():
  names = ("s0", "s1", "s2")
  o = optim_config(optimizer="sgd", momentum=0.0, learning_rate=0.8, lr_decay_per_stage=0.5)
  lrs = optim.stage_learning_rates(optim.stage_schedules(o, 10, names), 0)
  assert lrs == pytest.approx({"train/lr/s0": 0.2, "train/lr/s1": 0.4, "train/lr/s2": 0.8})
  params = stage_tree(names)
  (updates,), _, _ = run_updates(optim.build_optimizer(o, 10, names), params,
                                 jax.tree.map(jnp.ones_like, params), 1)
  np.testing.assert_allclose([leaf(updates, n)[0, 0] for n in names], [-0.2, -0.4, -0.8], rtol=1e-6)
  # An explicit per-stage learning rate is used as given, without the decay.
  o.per_stage.s0 = config_lib.stage_optim(learning_rate=0.05)
  assert optim.stage_learning_rates(optim.stage_schedules(o, 10, names), 0)["train/lr/s0"] == pytest.approx(0.05)


def _small_chain():
  config = config_lib.base_config()
  config.data.d, config.data.levels, config.data.eval_size = 8, 2, 16
  config.chain.stages = [stages.stage_config("mlp", name=f"s{i}", features=8, depth=1) for i in range(2)]
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  batch = jax.tree.map(jnp.asarray, task.train_batch(0, 16))
  return config, model, loss_fn, batch


def _bits(x):
  return np.asarray(x).view(np.uint32)


def test_frozen_stage_is_bit_identical_after_jitted_updates():
  config, model, loss_fn, batch = _small_chain()
  config.optim.optimizer, config.optim.weight_decay, config.optim.learning_rate = "adamw", 0.1, 0.05
  config.optim.grad_clip_norm = 1.0
  config.optim.per_stage.s0 = config_lib.stage_optim(frozen=True)
  config_lib.validate(config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # A -0.0 in the frozen stage: `+ 0.0` would turn it into +0.0; freeze() adds -0.0.
  layer = params["stages"]["s0"]["body"]["layers"][0]
  layer["kernel"][0, 0] = -0.0
  layer["bias"][...] = jnp.full_like(layer["bias"][...], -0.0)
  before = jax.tree.map(np.asarray, params)
  tx = optim.build_optimizer(config.optim, 5, chain_lib.stage_names(config))

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      return loss_fn(nnx.merge(graphdef, p, rest, copy=True)(batch["inputs"]), batch["labels"], batch["mask"])[0]
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(5):
    params, opt_state = step(params, opt_state)
  after = jax.tree.map(np.asarray, params)
  for (path, old), new in zip(jax.tree.leaves_with_path(before), jax.tree.leaves(after)):
    if chain_lib.stage_of_path(path) == "s0":
      np.testing.assert_array_equal(_bits(new), _bits(old))
    else:
      assert not np.array_equal(new, old), jax.tree_util.keystr(path)
  assert np.signbit(after["stages"]["s0"]["body"]["layers"][0]["kernel"][0, 0])
  assert np.all(np.signbit(after["stages"]["s0"]["body"]["layers"][0]["bias"][...]))
  # Eagerly too (no XLA folding of `x + 0`): -0.0 is the exact additive identity, +0.0 is not.
  frozen = optim.freeze()
  x = {"stages": {"s0": {"w": jnp.array([-0.0, 0.0, 1.5, -2.0])}}}
  u, _ = frozen.update(jax.tree.map(jnp.ones_like, x), frozen.init(x), x)
  np.testing.assert_array_equal(_bits(optax.apply_updates(x, u)["stages"]["s0"]["w"]), _bits(x["stages"]["s0"]["w"]))
  zero, _ = optax.set_to_zero().update(x, None)
  assert not np.signbit(optax.apply_updates(x, zero)["stages"]["s0"]["w"][0])


@pytest.mark.parametrize("name,lr", [("adam", 0.05), ("adamw", 0.05), ("sgd", 0.05), ("lamb", 0.05),
                                     ("adafactor", 0.05), ("lion", 0.03)])
def test_each_optimizer_reduces_a_quadratic(name, lr):
  o = optim_config(optimizer=name, learning_rate=lr, weight_decay=0.0 if name == "adam" else 1e-4)
  tx = optim.build_optimizer(o, 100, ("a", "b"))
  params = stage_tree(kernel=1.0, bias=1.0)
  target = jax.tree.map(lambda p: jnp.linspace(-1.0, 0.5, p.size).reshape(p.shape), params)
  loss = lambda p: sum(jnp.sum((x - t) ** 2) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  @jax.jit
  def train(params):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, tx.init(params)), None, length=60)[0][0]

  start, end = float(loss(params)), float(loss(train(params)))
  assert end < 0.25 * start, (name, start, end)


def test_old_call_without_stage_names_still_builds():
  o = optim_config(optimizer="sgd", momentum=0.0, learning_rate=0.1)
  params = {"w": jnp.ones(3)}
  (updates,), _, _ = run_updates(optim.build_optimizer(o, 10), params, params, 1)
  np.testing.assert_allclose(updates["w"], -0.1, rtol=1e-6)
  with pytest.raises(ValueError, match="stage_names"):
    optim.build_optimizer(optim_config(lr_decay_per_stage=0.5), 10)


# --------------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------------

SCHEDULE_FIELDS = dict(learning_rate=0.1, warmup_steps=3, end_lr_factor=0.1, decay_rate=0.5, steps_per_epoch=4,
                       boundaries=(2, 5), scales=(0.5, 0.1), optimizer="sgd", momentum=0.0)


@pytest.mark.parametrize("schedule", config_lib.SCHEDULES)
def test_update_n_uses_schedule_of_n(schedule):
  """Linear loss, sgd without momentum: update n = -lr_n * grad, so lr_n is read off the update."""
  total = 12
  o = optim_config(schedule=schedule, per_stage={"b": {"learning_rate": 0.3}}, **SCHEDULE_FIELDS)
  schedules = optim.stage_schedules(o, total, ("a", "b"))
  params = stage_tree()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)  # d/dp of 2 * sum(p)
  history, _, _ = run_updates(optim.build_optimizer(o, total, ("a", "b")), params, grads, total)
  for stage, peak in (("a", 0.1), ("b", 0.3)):
    measured = np.array([leaf(u, stage)[0, 0] / -2.0 for u in history])
    expected = np.array([float(schedules[stage](n)) for n in range(total)])
    np.testing.assert_allclose(measured, expected, rtol=1e-5, atol=1e-9, err_msg=f"{schedule} {stage}")
    assert np.max(expected) == pytest.approx(peak, rel=1e-5)
  default_schedule = optim.build_schedule(o, total)
  np.testing.assert_allclose(expected / 3.0, [float(default_schedule(n)) for n in range(total)], rtol=1e-5)
  if schedule.startswith("warmup"):
    assert expected[0] == 0.0 and expected[3] == pytest.approx(0.3)


def test_exponential_per_epoch_is_a_staircase():
  o = optim_config(schedule="exponential_per_epoch", learning_rate=1.0, decay_rate=0.1)
  sched = optim.build_schedule(o, 100, steps_per_epoch=3)  # epoch length from the data
  np.testing.assert_allclose([float(sched(n)) for n in range(9)], [1, 1, 1, .1, .1, .1, .01, .01, .01], rtol=1e-5)
  o.steps_per_epoch = 2  # the config overrides the data
  sched = optim.build_schedule(o, 100, steps_per_epoch=3)
  np.testing.assert_allclose([float(sched(n)) for n in range(5)], [1, 1, .1, .1, .01], rtol=1e-5)
  o.steps_per_epoch = 0
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.build_optimizer(o, 100, ("a",))


def test_piecewise_constant_values():
  o = optim_config(schedule="piecewise_constant", learning_rate=1.0, boundaries=(2, 5), scales=(0.5, 0.1))
  sched = optim.build_schedule(o, 100)
  np.testing.assert_allclose([float(sched(n)) for n in range(7)], [1, 1, .5, .5, .5, .05, .05], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Reduce on plateau.
# --------------------------------------------------------------------------------------------


def _scales_after(values, **kwargs):
  tx = optim.plateau_scale(**kwargs)
  state, out = tx.init({"w": jnp.ones(2)}), []
  for v in values:
    state = optim.report_eval_metric(state, v)
    out.append(float(state.scale))
  return out


def test_plateau_halves_after_patience_and_never_drops_below_min():
  losses = [1.0, 1.0, 1.0, 0.9, 0.95, 0.95, 2.0, 2.0, 2.0, 2.0, float("nan"), 3.0]
  assert _scales_after(losses, factor=0.5, patience=2, min_scale=0.2) == pytest.approx(
      [1, 1, .5, .5, .5, .25, .25, .2, .2, .2, .2, .2])
  accuracies = [0.5, 0.6, 0.6, 0.59, 0.7, 0.7]  # mode=max: higher is better
  assert _scales_after(accuracies, factor=0.5, patience=2, mode="max") == pytest.approx([1, 1, 1, .5, .5, .5])
  assert _scales_after([1.0, 0.99, 0.98], factor=0.5, patience=2, min_delta=0.05) == pytest.approx([1, 1, .5])


def test_plateau_state_survives_jitted_updates_and_scales_them():
  o = optim_config(optimizer="sgd", momentum=0.0, learning_rate=0.1, schedule="reduce_on_plateau",
                   plateau_factor=0.5, plateau_patience=1, per_stage={"b": {"schedule": "constant"}})
  names = ("a", "b")
  tx = optim.build_optimizer(o, 10, names)
  schedules = optim.stage_schedules(o, 10, names)
  params = stage_tree()
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  updates, state = update(grads, tx.init(params), params)
  updates, state = update(grads, state, params)  # the jitted update keeps the plateau state
  assert {k: float(v) for k, v in optim.plateau_scales(state).items()} == {"a": 1.0}
  state = optim.report_eval_metric(state, 1.0)  # first eval: the best so far
  state = optim.report_eval_metric(state, 1.5)  # worse: patience 1 -> scale 0.5
  assert isinstance(jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optim.PlateauState))[1],
                    optim.PlateauState)
  updates, state = update(grads, state, params)
  np.testing.assert_allclose(leaf(updates, "a"), -0.05, rtol=1e-6)  # 0.1 * 0.5
  np.testing.assert_allclose(leaf(updates, "b"), -0.1, rtol=1e-6)  # no plateau on stage b
  assert optim.stage_learning_rates(schedules, 2, state) == pytest.approx({"train/lr/a": 0.05, "train/lr/b": 0.1})
  assert float(optim.plateau_scales(state)["a"]) == 0.5  # unchanged by the update
  assert optim.uses_plateau(o) and not optim.uses_plateau(optim_config())
  plain = optim.build_optimizer(optim_config(), 10, names).init(params)
  assert jax.tree.structure(optim.report_eval_metric(plain, 1.0)) == jax.tree.structure(plain)


# --------------------------------------------------------------------------------------------
# Clipping, weight decay, norms.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb", "lion", "adafactor"])
def test_weight_decay_skips_biases(name):
  o = optim_config(optimizer=name, learning_rate=0.1, weight_decay=0.5, momentum=0.0)
  params = stage_tree(kernel=1.0, bias=1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, after, _ = run_updates(optim.build_optimizer(o, 10, ("a", "b")), params, zeros, 3)
  for stage in ("a", "b"):
    np.testing.assert_array_equal(leaf(after, stage, "bias"), leaf(params, stage, "bias"))
    assert np.all(np.abs(leaf(after, stage)) < 1.0), (name, leaf(after, stage))
  if name == "sgd":  # decoupled and LR-scaled: kernel *= (1 - lr * wd) per update
    np.testing.assert_allclose(leaf(after, "a"), 0.95 ** 3, rtol=1e-6)


def test_decay_mask_on_chain_params():
  _, model, _, _ = _small_chain()
  _, params, _ = nnx.split(model, nnx.Param, ...)
  mask = {jax.tree_util.keystr(p): m for p, m in jax.tree.leaves_with_path(optim.decay_mask(params))}
  assert mask and all(m == ("kernel" in k) for k, m in mask.items()), mask
  assert jax.tree.leaves(optim.decay_mask({"norm": {"scale": jnp.ones(4)}, "embed": jnp.ones((5, 4))})) == [
      True, False]


def test_clipping_bounds_the_global_norm():
  o = optim_config(optimizer="sgd", momentum=0.0, learning_rate=1.0, grad_clip_norm=1.0)
  tx = optim.build_optimizer(o, 10, ("a", "b"))
  params = stage_tree()
  big = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  (updates,), _, _ = run_updates(tx, params, big, 1)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
  assert float(optax.tree.norm(updates)) <= 1.0 + 1e-6
  small = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  (updates,), _, _ = run_updates(tx, params, small, 1)
  np.testing.assert_allclose(leaf(updates, "a"), -0.01, rtol=1e-6)  # below the threshold: untouched


def test_per_stage_norms():
  tree = stage_tree(kernel=2.0, bias=1.0)
  tree["stages"]["b"]["head"] = {"kernel": jnp.full((2, 2), 3.0, jnp.bfloat16)}
  norms = jax.jit(lambda t: optim.per_stage_norms(t, "train/grad_norm"))(tree)
  assert set(norms) == {"train/grad_norm/a", "train/grad_norm/b"}
  assert float(norms["train/grad_norm/a"]) == pytest.approx(np.sqrt(12 * 4 + 4), rel=1e-6)
  assert float(norms["train/grad_norm/b"]) == pytest.approx(np.sqrt(12 * 4 + 4 + 4 * 9), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Validation of config.optim.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,expected", [
    ({"optimizer": "rmsprop"}, "config.optim.optimizer: 'rmsprop' is not one of: adam, adamw, sgd, lamb, adafactor, lion"),
    ({"schedule": "step"}, "config.optim.schedule: 'step' is not one of: constant, warmup_cosine"),
    ({"learning_rate": -1.0}, "config.optim.learning_rate: must be > 0"),
    ({"decay_rate": 0.0}, "config.optim.decay_rate: must be in (0, 1]"),
    ({"lr_decay_per_stage": 1.5}, "config.optim.lr_decay_per_stage: must be in (0, 1]"),
    ({"plateau_mode": "lower"}, "config.optim.plateau_mode: 'lower' is not one of: min, max"),
    ({"plateau_metric": "loss"}, "config.optim.plateau_metric: 'loss' must name an eval metric"),
    ({"boundaries": (10, 20), "scales": (0.1,)}, "config.optim.scales: has 1 entries for 2 boundaries"),
    ({"boundaries": (20, 10), "scales": (0.1, 0.1)}, "config.optim.boundaries: must be strictly increasing"),
    ({"weight_decay": 0.1}, "config.optim.weight_decay: adam has no weight decay"),
    ({"schedule": "exponential_per_epoch"}, "config.optim.steps_per_epoch: exponential_per_epoch needs"),
    ({"schedule": "warmup_linear", "warmup_steps": 5000}, "config.optim.warmup_steps: must be < the 3000 updates of this run"),
    ({"per_stage": {"level9": {}}}, "config.optim.per_stage.level9: 'level9' is not a stage name; stages: level1"),
    ({"per_stage": {"level1": {"optimizer": "rmsprop"}}}, "config.optim.per_stage.level1.optimizer: 'rmsprop' is"),
    ({"per_stage": {"level1": {"schedule": "cyclic"}}}, "config.optim.per_stage.level1.schedule: 'cyclic' is"),
    ({"per_stage": {"level2": {"learning_rate": -0.5}}}, "config.optim.per_stage.level2.learning_rate: must be > 0"),
    ({"per_stage": {"level2": {"weight_decay": -0.5}}}, "config.optim.per_stage.level2.weight_decay: must be >= 0"),
    ({"per_stage": {"level2": {"weight_decay": 0.1}}}, "config.optim.per_stage.level2.weight_decay: adam has no"),
])
def test_bad_optim_values_name_the_field(overrides, expected):
  config = default.get_config()
  config.optim.schedule = "constant"
  for key, value in overrides.items():
    if key == "per_stage":
      for stage, kwargs in value.items():
        config.optim.per_stage[stage] = config_lib.stage_optim(**kwargs)
    else:
      config.optim[key] = value
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  assert str(info.value).startswith(expected), str(info.value)


def test_per_stage_entry_with_unknown_field_or_wrong_type():
  config = default.get_config()
  config.optim.per_stage.level1 = config_lib.stage_optim()
  config.optim.per_stage.level1.freeze = True
  with pytest.raises(config_lib.ConfigError, match=r"^config.optim.per_stage.level1.freeze: unknown field"):
    config_lib.validate(config)
  config.optim.per_stage.level1 = ml_collections.ConfigDict({**config_lib.stage_optim().to_dict(), "frozen": "yes"})
  with pytest.raises(config_lib.ConfigError, match=r"^config.optim.per_stage.level1.frozen: must be of type bool"):
    config_lib.validate(config)


def test_valid_per_stage_config_passes_and_builds():
  config = default.get_config("runlocal")
  config.optim.per_stage = config_lib.per_stage_optim(chain_lib.stage_names(config))
  config.optim.per_stage.level1.frozen = True
  config.optim.per_stage.level2.optimizer = "sgd"
  config.optim.per_stage.level2.weight_decay = 1e-4
  config.optim.per_stage.level3.schedule = "reduce_on_plateau"
  config.optim.lr_decay_per_stage = 0.5
  config_lib.validate(config, num_devices=8)
  lrs = optim.stage_learning_rates(optim.stage_schedules(config.optim, config.total_steps,
                                                         chain_lib.stage_names(config)), 20)
  assert lrs["train/lr/level1"] == 0.0 and lrs["train/lr/level3"] == pytest.approx(1e-3)


@pytest.mark.parametrize("name", ["adam", "adamw", "lion", "sgd"])
def test_mu_dtype_sets_the_first_moment_dtype(name):
  optim_config = config_lib.base_config().optim
  optim_config.optimizer, optim_config.mu_dtype = name, "bfloat16"
  params = {"stages": {"s0": {"body": {"w": jnp.ones((4, 4))}}}}
  tx = optim.build_optimizer(optim_config, 10, ("s0",))
  state = tx.init(params)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(state) if getattr(leaf, "shape", ()) == (4, 4)}
  assert jnp.dtype(jnp.bfloat16) in dtypes  # mu (or momentum) in bf16
  updates, _ = tx.update(params, state, params)
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
