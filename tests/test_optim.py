"""The optimizer: per-stage chains, schedules (update n uses schedule(n)), plateau, clipping, decay."""

import math
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
from chainjax import experiment
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
  experiment.validate(config, num_devices=1)
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


def _reference_params(name, lr, weight_decay, steps, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9):
  """`steps` updates of `name` on sum((x - t)**2) for one stage of `stage_tree(1.0, 1.0)`, in float64 numpy.

  Written out from each optimizer's published update rule (not from optax), with the
  defaults of `base_config().optim` (b1, b2, eps, momentum) and the decay mask of
  `optim.decay_mask` (kernel decayed, bias not). Returns {"kernel": [3, 4], "bias": [4]}.
  """
  out = {}
  for leaf_name, shape in (("kernel", (3, 4)), ("bias", (4,))):
    x = np.ones(shape)
    t = np.linspace(-1.0, 0.5, x.size).reshape(shape)
    wd = weight_decay if leaf_name == "kernel" else 0.0
    m, v = np.zeros(shape), np.zeros(shape)
    for k in range(1, steps + 1):
      g = 2.0 * (x - t)
      if name in ("adam", "adamw", "lamb"):  # Adam with bias correction; decoupled decay; LAMB's trust ratio
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = m / (1 - b1 ** k) / (np.sqrt(v / (1 - b2 ** k)) + eps) + wd * x
        if name == "lamb":
          u = u * np.linalg.norm(x) / np.linalg.norm(u)
        x = x - lr * u
      elif name == "sgd":  # heavy ball (trace = g + momentum * trace), then SGDW's LR-scaled decay
        m = g + momentum * m
        x = x - lr * (m + wd * x)
      elif name == "lion":  # sign of the interpolation (b1), the momentum then tracks g with b2
        u = np.sign((1 - b1) * g + b1 * m) + wd * x
        m = b2 * m + (1 - b2) * g
        x = x - lr * u
      elif name == "adafactor":
        # Unfactored (every dim < 128): v decays by 1 - k**-0.8; the update's block RMS is clipped
        # at 1; the LR is scaled by the parameters' RMS (>= 1e-3); the decay is added after the LR.
        beta = 1.0 - k ** -0.8
        v = beta * v + (1 - beta) * (g * g + 1e-30)
        u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u * u)))
        x = x - (lr * u * max(np.sqrt(np.mean(x * x)), 1e-3) + wd * x)
      else:
        raise ValueError(name)
    out[leaf_name] = x
  return out


@pytest.mark.parametrize("name,lr", [("adam", 0.05), ("adamw", 0.05), ("sgd", 0.05), ("lamb", 0.05),
                                     ("adafactor", 0.05), ("lion", 0.03)])
def test_each_optimizer_follows_its_update_rule_on_a_quadratic(name, lr):
  """60 jitted updates land where the optimizer's own update rule, written out in numpy, lands.

  The quadratic's minimum is known, so "the loss went down" would pass for any wrong
  hyperparameter (b1/b2 swapped, decay on biases, a missing bias correction or trust
  ratio): every parameter and the final loss must match `_reference_params` instead.
  """
  wd = 0.0 if name == "adam" else 1e-4
  o = optim_config(optimizer=name, learning_rate=lr, weight_decay=wd)
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

  end = train(params)
  ref = _reference_params(name, lr, wd, 60)
  for stage in ("a", "b"):
    for leaf_name in ("kernel", "bias"):
      np.testing.assert_allclose(leaf(end, stage, leaf_name), ref[leaf_name], rtol=0, atol=2e-5,
                                 err_msg=f"{name} {stage} {leaf_name}")
  ref_loss = 2 * sum(np.sum((ref[k] - np.linspace(-1.0, 0.5, ref[k].size).reshape(ref[k].shape)) ** 2)
                     for k in ref)  # two stages with the same leaves
  assert float(loss(end)) == pytest.approx(ref_loss, rel=1e-4, abs=1e-6), name


# --------------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------------

def closed_form_lr(o, n, total, steps_per_epoch=0):
  """The LR of update n (0-based), written out from the schedule's definition (not from optax).

  lr = o.learning_rate (the peak), W = o.warmup_steps, T = total, end = lr * o.end_lr_factor:
    constant, reduce_on_plateau  lr (the plateau scale lives in the optimizer state)
    warmup_cosine                n < W: lr * n / W;  else end + (lr - end) * (1 + cos(pi * p)) / 2
    warmup_linear                n < W: lr * n / W;  else lr + (end - lr) * p
                                 with p = min(n - W, T - W) / (T - W): 0 at the peak, 1 from n = T on
    exponential_per_epoch        lr * decay_rate ** floor(n / steps_per_epoch)  (config's, else the data's)
    piecewise_constant           lr * prod(scale_i for every boundary_i <= n)
  """
  lr, warmup, name = o.learning_rate, o.warmup_steps, o.schedule
  if name in ("constant", "reduce_on_plateau"):
    return lr
  if name in ("warmup_cosine", "warmup_linear"):
    if n < warmup:
      return lr * n / warmup
    end = lr * o.end_lr_factor
    p = min(n - warmup, total - warmup) / (total - warmup)
    if name == "warmup_cosine":
      return end + (lr - end) * (1 + math.cos(math.pi * p)) / 2
    return lr + (end - lr) * p
  if name == "exponential_per_epoch":
    return lr * o.decay_rate ** (n // (o.steps_per_epoch or steps_per_epoch))
  if name == "piecewise_constant":
    return lr * math.prod(s for b, s in zip(o.boundaries, o.scales) if n >= b)
  raise AssertionError(f"no closed form for schedule {name!r}: add it here")


def _values(schedule, steps):
  return np.array([float(schedule(n)) for n in steps])


# Chosen so that every shape has a middle and an end inside 12 updates: the warmup ends at
# update 4, the decay's midpoint is update 8 = 4 + (12 - 4) / 2, epochs are 4 updates long,
# and the piecewise boundaries fall inside the run.
SCHEDULE_FIELDS = dict(learning_rate=0.1, warmup_steps=4, end_lr_factor=0.1, decay_rate=0.5, steps_per_epoch=4,
                       boundaries=(2, 5), scales=(0.5, 0.1), optimizer="sgd", momentum=0.0)


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_update_n_uses_schedule_of_n(schedule):
  """Linear loss, sgd without momentum: update n = -lr_n * grad, so lr_n is read off the update.

  Every update of both stages (stage b with its own peak 0.3, its end LR 0.3 *
  end_lr_factor) and the logged `train/lr/<stage>` must equal the closed form. Runs for
  every name in `optim.SCHEDULES`: a new schedule without a closed form fails here.
  """
  total = 12
  o = optim_config(schedule=schedule, per_stage={"b": {"learning_rate": 0.3}}, **SCHEDULE_FIELDS)
  schedules = optim.stage_schedules(o, total, ("a", "b"))
  params = stage_tree()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)  # d/dp of 2 * sum(p)
  history, _, _ = run_updates(optim.build_optimizer(o, total, ("a", "b")), params, grads, total)
  for stage, peak in (("a", 0.1), ("b", 0.3)):
    stage_o = optim_config(schedule=schedule, **{**SCHEDULE_FIELDS, "learning_rate": peak})
    expected = np.array([closed_form_lr(stage_o, n, total) for n in range(total)])
    measured = np.array([leaf(u, stage)[0, 0] / -2.0 for u in history])
    np.testing.assert_allclose(measured, expected, rtol=1e-5, atol=1e-9, err_msg=f"{schedule} {stage}")
    logged = [optim.stage_learning_rates(schedules, n)[f"train/lr/{stage}"] for n in range(total)]
    np.testing.assert_allclose(logged, expected, rtol=1e-5, atol=1e-9, err_msg=f"{schedule} {stage} logged")
  np.testing.assert_allclose(_values(optim.build_schedule(o, total), range(total)),
                             [closed_form_lr(o, n, total) for n in range(total)], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("schedule", ["constant", "reduce_on_plateau"])
def test_constant_schedules_closed_form(schedule):
  """lr at every update, also past total_steps (reduce_on_plateau's scale is in the opt state)."""
  sched = optim.build_schedule(optim_config(schedule=schedule, learning_rate=0.2, warmup_steps=5,
                                            end_lr_factor=0.1), 20)
  np.testing.assert_allclose(_values(sched, [0, 1, 5, 10, 19, 20, 1000]), 0.2, rtol=1e-6)


@pytest.mark.parametrize("end_lr_factor", [0.0, 0.1, 0.25])
def test_warmup_cosine_closed_form(end_lr_factor):
  """Linear warmup from 0 over W updates to the peak lr, then half a cosine down to lr * end_lr_factor.

  lr = 0.2, W = 4, T = 20: the decay spans updates 4..20, its middle is update 12, and
  update T = 20 (the count after the run's last update, 19) is where the end value is reached.
  """
  lr, warmup, total = 0.2, 4, 20
  end = lr * end_lr_factor
  o = optim_config(schedule="warmup_cosine", learning_rate=lr, warmup_steps=warmup, end_lr_factor=end_lr_factor)
  sched = optim.build_schedule(o, total)
  points = {
      0: 0.0,  # warmup starts at 0
      1: lr * 1 / 4,
      3: lr * 3 / 4,  # last warmup update
      4: lr,  # end of warmup: the peak
      8: end + (lr - end) * (1 + math.cos(math.pi * 4 / 16)) / 2,
      12: end + (lr - end) / 2,  # middle of the decay: cos(pi / 2) = 0
      19: end + (lr - end) * (1 + math.cos(math.pi * 15 / 16)) / 2,  # the run's last update
      20: end,  # final: lr * end_lr_factor
      30: end,  # held after the end
  }
  np.testing.assert_allclose(_values(sched, points), list(points.values()), rtol=1e-5, atol=1e-8)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(_values(sched, range(31)), [closed_form_lr(o, n, total) for n in range(31)],
                             rtol=1e-5, atol=1e-8)
  assert int(np.argmax(_values(sched, range(31)))) == warmup  # the peak is update W, and only W
  if end_lr_factor == 0.1:  # the same points as literals: 0.02 + 0.18 * (1 + cos) / 2
    np.testing.assert_allclose(_values(sched, [2, 12, 20]), [0.1, 0.11, 0.02], rtol=1e-5)


@pytest.mark.parametrize("end_lr_factor", [0.0, 0.1, 0.25])
def test_warmup_linear_closed_form(end_lr_factor):
  """Linear warmup from 0 over W updates to the peak lr, then a straight line to lr * end_lr_factor at T."""
  lr, warmup, total = 0.2, 4, 20
  end = lr * end_lr_factor
  o = optim_config(schedule="warmup_linear", learning_rate=lr, warmup_steps=warmup, end_lr_factor=end_lr_factor)
  sched = optim.build_schedule(o, total)
  points = {
      0: 0.0,
      1: lr * 1 / 4,
      3: lr * 3 / 4,
      4: lr,  # the peak
      8: lr + (end - lr) * 4 / 16,
      12: lr + (end - lr) * 8 / 16,  # middle of the decay
      19: lr + (end - lr) * 15 / 16,  # the run's last update
      20: end,  # final: lr * end_lr_factor
      30: end,
  }
  np.testing.assert_allclose(_values(sched, points), list(points.values()), rtol=1e-5, atol=1e-8)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(_values(sched, range(31)), [closed_form_lr(o, n, total) for n in range(31)],
                             rtol=1e-5, atol=1e-8)
  steps = np.diff(_values(sched, range(4, 21)))
  np.testing.assert_allclose(steps, (end - lr) / 16, rtol=1e-4, atol=1e-9)  # constant slope: a straight line
  if end_lr_factor == 0.1:
    np.testing.assert_allclose(_values(sched, [2, 12, 20]), [0.1, 0.11, 0.02], rtol=1e-5)


@pytest.mark.parametrize("schedule", ["warmup_cosine", "warmup_linear"])
def test_warmup_schedules_without_warmup_start_at_the_peak(schedule):
  """warmup_steps = 0: update 0 already uses lr, the decay spans all T updates."""
  lr, total = 0.2, 10
  o = optim_config(schedule=schedule, learning_rate=lr, warmup_steps=0, end_lr_factor=0.5)
  sched = optim.build_schedule(o, total)
  np.testing.assert_allclose(_values(sched, [0, 5, 10, 11]), [0.2, 0.15, 0.1, 0.1], rtol=1e-5)  # (0.2 + 0.1) / 2
  np.testing.assert_allclose(_values(sched, range(12)), [closed_form_lr(o, n, total) for n in range(12)],
                             rtol=1e-5, atol=1e-8)


def test_exponential_per_epoch_closed_form():
  """lr * decay_rate ** floor(n / steps_per_epoch): a staircase that drops at the first update of each epoch."""
  lr, rate = 0.2, 0.5
  o = optim_config(schedule="exponential_per_epoch", learning_rate=lr, decay_rate=rate)
  sched = optim.build_schedule(o, 100, steps_per_epoch=3)  # epoch length from the data
  points = {0: lr, 2: lr,  # epoch 0: updates 0..2
            3: lr * rate, 4: lr * rate, 5: lr * rate,  # epoch 1 starts at update 3
            6: lr * rate ** 2, 8: lr * rate ** 2, 9: lr * rate ** 3, 30: lr * rate ** 10}
  np.testing.assert_allclose(_values(sched, points), list(points.values()), rtol=1e-5)
  np.testing.assert_allclose(_values(sched, range(31)), [closed_form_lr(o, n, 100, 3) for n in range(31)],
                             rtol=1e-5)
  np.testing.assert_allclose(_values(sched, [2, 3, 5, 6]), [0.2, 0.1, 0.1, 0.05], rtol=1e-5)  # as literals
  o.steps_per_epoch = 5  # the config overrides the data
  sched = optim.build_schedule(o, 100, steps_per_epoch=3)
  np.testing.assert_allclose(_values(sched, [0, 4, 5, 9, 10, 11]),
                             [lr, lr, lr * rate, lr * rate, lr * rate ** 2, lr * rate ** 2], rtol=1e-5)
  np.testing.assert_allclose(_values(sched, range(31)), [closed_form_lr(o, n, 100) for n in range(31)], rtol=1e-5)
  o.steps_per_epoch = 0
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.build_optimizer(o, 100, ("a",))


@pytest.mark.parametrize("boundaries,scales", [((3, 7), (0.5, 0.1)), ((0, 4, 6), (0.5, 2.0, 0.25))])
def test_piecewise_constant_closed_form(boundaries, scales):
  """lr * prod(scales[i] for boundaries[i] <= n): a boundary is the first update at the new LR; the
  scales multiply (cumulative, as `optax.piecewise_constant_schedule`)."""
  lr = 0.2
  o = optim_config(schedule="piecewise_constant", learning_rate=lr, boundaries=boundaries, scales=scales)
  sched = optim.build_schedule(o, 100)
  for i, b in enumerate(boundaries):
    before, after = lr * math.prod(scales[:i]), lr * math.prod(scales[:i + 1])
    if b > 0:
      assert float(sched(b - 1)) == pytest.approx(before, rel=1e-6), (b, "just before")
    assert float(sched(b)) == pytest.approx(after, rel=1e-6), (b, "at")
    assert float(sched(b + 1)) == pytest.approx(after, rel=1e-6), (b, "just after")
  assert float(sched(1000)) == pytest.approx(lr * math.prod(scales), rel=1e-6)
  np.testing.assert_allclose(_values(sched, range(12)), [closed_form_lr(o, n, 100) for n in range(12)], rtol=1e-6)
  if boundaries == (3, 7):  # as literals
    np.testing.assert_allclose(_values(sched, [2, 3, 4, 6, 7, 8]), [0.2, 0.1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
  with pytest.raises(ValueError, match="boundaries"):
    optim.build_schedule(optim_config(schedule="piecewise_constant", boundaries=boundaries, scales=scales[:1]), 100)


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


def _default_with_optim(**overrides):
  """The default config, constant schedule, with `config.optim` overrides (`per_stage`: {stage: stage_optim kwargs})."""
  config = default.get_config()
  config.optim.schedule = "constant"
  for key, value in overrides.items():
    if key == "per_stage":
      for stage, kwargs in value.items():
        config.optim.per_stage[stage] = config_lib.stage_optim(**kwargs)
    else:
      config.optim[key] = value
  return config


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
  config = _default_with_optim(**overrides)
  with pytest.raises(config_lib.ConfigError) as info:
    experiment.validate(config, num_devices=1)
  assert str(info.value).startswith(expected), str(info.value)


def _validate_optim(updates=3000, epochs=True, **overrides):
  """`optim.validate` on the default config with `config.optim` overrides (per_stage as in `optim_config`)."""
  config = _default_with_optim(**overrides)
  optim.validate(config, num_updates=updates, steps_per_epoch_known=epochs, task_name="toy")


def test_validate_accepts_the_default_optim():
  _validate_optim()
  _validate_optim(schedule="warmup_cosine", warmup_steps=10, updates=11)
  _validate_optim(schedule="exponential_per_epoch", epochs=True)
  _validate_optim(schedule="exponential_per_epoch", epochs=False, steps_per_epoch=5)


@pytest.mark.parametrize("kwargs,field,message", [
    ({"optimizer": "rmsprop"}, "optim.optimizer",
     "'rmsprop' is not one of: adam, adamw, sgd, lamb, adafactor, lion"),
    ({"schedule": "step"}, "optim.schedule", "'step' is not one of: constant, warmup_cosine, warmup_linear, "
     "exponential_per_epoch, piecewise_constant, reduce_on_plateau"),
    ({"optimizer": "adam", "weight_decay": 0.1}, "optim.weight_decay", "adam has no weight decay (stage 'level1')"),
    ({"schedule": "warmup_linear", "warmup_steps": 100, "updates": 100}, "optim.warmup_steps",
     "must be < the 100 updates of this run for warmup_linear"),
    ({"schedule": "exponential_per_epoch", "epochs": False}, "optim.steps_per_epoch",
     "exponential_per_epoch needs the epoch length and the toy task has no epochs"),
    ({"per_stage": {"level9": {}}}, "optim.per_stage.level9", "'level9' is not a stage name; stages: level1"),
    # The names come first: an unknown optimizer is reported before a bad range elsewhere.
    ({"optimizer": "rmsprop", "b1": 2.0}, "optim.optimizer", "'rmsprop' is not one of"),
])
def test_validate_names_the_field(kwargs, field, message):
  with pytest.raises(config_lib.ConfigError) as info:
    _validate_optim(**kwargs)
  assert info.value.field == field
  assert str(info.value).startswith(f"config.{field}: {message}"), str(info.value)


def test_registries_name_every_choice():
  assert tuple(optim.OPTIMIZERS) == ("adam", "adamw", "sgd", "lamb", "adafactor", "lion")
  assert tuple(optim.SCHEDULES) == ("constant", "warmup_cosine", "warmup_linear", "exponential_per_epoch",
                                    "piecewise_constant", "reduce_on_plateau")
  with pytest.raises(ValueError, match=r"^config.optim.optimizer: unknown 'rmsprop'; allowed: adam, adamw"):
    optim.build_optimizer(optim_config(optimizer="rmsprop"), 10, ("a",))
  with pytest.raises(ValueError, match=r"^config.optim.schedule: unknown 'step'; allowed: constant, "):
    optim.build_optimizer(optim_config(schedule="step"), 10, ("a",))


def test_per_stage_entry_with_unknown_field_or_wrong_type():
  config = default.get_config()
  config.optim.per_stage.level1 = config_lib.stage_optim()
  config.optim.per_stage.level1.freeze = True
  with pytest.raises(config_lib.ConfigError, match=r"^config.optim.per_stage.level1.freeze: unknown field"):
    experiment.validate(config, num_devices=1)
  config.optim.per_stage.level1 = ml_collections.ConfigDict({**config_lib.stage_optim().to_dict(), "frozen": "yes"})
  with pytest.raises(config_lib.ConfigError, match=r"^config.optim.per_stage.level1.frozen: must be of type bool"):
    experiment.validate(config, num_devices=1)


def test_valid_per_stage_config_passes_and_builds():
  config = default.get_config("runlocal")
  config.optim.per_stage = config_lib.per_stage_optim(chain_lib.stage_names(config))
  config.optim.per_stage.level1.frozen = True
  config.optim.per_stage.level2.optimizer = "sgd"
  config.optim.per_stage.level2.weight_decay = 1e-4
  config.optim.per_stage.level3.schedule = "reduce_on_plateau"
  config.optim.lr_decay_per_stage = 0.5
  experiment.validate(config, num_devices=8)
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
