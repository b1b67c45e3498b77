"""Magnitude pruning (`compress.prune`): pruned weights stay exactly zero under adam/sgd-momentum/adamw,
the achieved sparsity follows the Zhu & Gupta schedule (layerwise and global), biases are never
pruned, N:M 2:4 keeps the 2 largest of every 4 inputs, and the wrapper composes with
`optax.partition`, `optax.MultiSteps`, the loss-scale wrapper, `jit` and an Orbax round trip."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from chainjax import optim, precision
from chainjax.compress import prune


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
          "w2": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}


def _grads(params, rng):
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _zeros(x) -> int:
  return int(np.sum(np.asarray(x) == 0))


def _step(tx):
  """One jitted update + apply."""

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------------------------
# 7. The schedule.
# --------------------------------------------------------------------------------------------


def test_polynomial_schedule_closed_form():
  sched = prune.polynomial_sparsity(0.0, 0.8, begin=10, end=20, power=3)
  # before begin: initial; middle: 0.8 - 0.8 * 0.5**3 = 0.7; end and after: final.
  for t, want in ((0, 0.0), (9, 0.0), (10, 0.0), (15, 0.7), (20, 0.8), (21, 0.8), (1000, 0.8)):
    assert float(sched(t)) == pytest.approx(want, abs=1e-7), t
  sched = prune.polynomial_sparsity(0.2, 0.8, begin=10, end=20, power=3)
  # t=12: 0.8 + (0.2 - 0.8) * (1 - 0.2)**3 = 0.8 - 0.6 * 0.512 = 0.4928
  for t, want in ((5, 0.2), (10, 0.2), (12, 0.4928), (15, 0.725), (20, 0.8), (25, 0.8)):
    assert float(sched(t)) == pytest.approx(want, abs=1e-6), t
  linear = prune.polynomial_sparsity(0.2, 0.8, begin=0, end=4, power=1)
  assert [round(float(linear(t)), 6) for t in range(6)] == [0.2, 0.35, 0.5, 0.65, 0.8, 0.8]
  assert float(jax.jit(sched)(jnp.int32(15))) == pytest.approx(0.725, abs=1e-6)  # traceable
  step = prune.polynomial_sparsity(0.0, 0.5, begin=3, end=3)  # one-shot: a step at begin
  assert [float(step(t)) for t in (2, 3, 4)] == [0.0, 0.5, 0.5]


@pytest.mark.parametrize("kwargs, why", [
    ({"initial": 0.0, "final": 1.5, "begin": 0, "end": 1}, "final sparsity must be a fraction in [0, 1]"),
    ({"initial": 0.0, "final": 0.5, "begin": 5, "end": 1}, "end (1) is before begin (5)"),
    ({"initial": 0.0, "final": 0.5, "begin": 0, "end": 1, "power": 0}, "power must be a finite number > 0"),
])
def test_polynomial_schedule_rejects_bad_settings(kwargs, why):
  with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
    prune.polynomial_sparsity(**kwargs)


# --------------------------------------------------------------------------------------------
# 1. Pruned weights stay exactly zero.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", [optax.adam(1e-2), optax.sgd(1e-2, momentum=0.9),
                                   optax.adamw(1e-2, weight_decay=0.1)], ids=["adam", "sgd_momentum", "adamw"])
def test_pruned_weights_stay_exactly_zero(inner):
  # One-shot 50% at update 3: by then the momentum / moments of the weights to be pruned are non-zero.
  tx = prune.magnitude_prune(inner, 0.5, begin=3, end=3)
  step, rng = _step(tx), np.random.default_rng(1)
  params = _params()
  state = tx.init(params)
  for _ in range(4):  # updates 0..3; the last one prunes
    params, state = step(params, state, _grads(params, rng))
  masks = state.masks
  assert int(state.count) == 4
  assert [_zeros(params[k]) for k in ("w1", "w2", "b")] == [24, 40, 0]
  assert [int(np.sum(~np.asarray(masks[k]))) for k in ("w1", "w2")] == [24, 40]
  for _ in range(20):
    before = params
    params, state = step(params, state, _grads(params, rng))
    for k in ("w1", "w2"):
      pruned = ~np.asarray(masks[k])
      assert np.all(np.asarray(params[k])[pruned] == 0.0)
      assert np.array_equal(np.asarray(state.masks[k]), np.asarray(masks[k]))  # fixed after `end`
      assert np.all(np.asarray(params[k])[~pruned] != np.asarray(before[k])[~pruned])  # kept ones train
    assert _zeros(params["w1"]) == 24 and _zeros(params["w2"]) == 40
  assert int(state.count) == 24


# --------------------------------------------------------------------------------------------
# 2. The gradual schedule: achieved sparsity at every pruning step.
# --------------------------------------------------------------------------------------------


def _numpy_sparsity(t, initial, final, begin, end, power):
  """Zhu & Gupta's s(t), written out independently of the module (float64)."""
  frac = min(max((t - begin) / (end - begin), 0.0), 1.0)
  return final + (initial - final) * (1.0 - frac) ** power


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_gradual_sparsity_follows_schedule(scope):
  initial, final, begin, end, frequency, power = 0.05, 0.8, 2, 12, 2, 3
  sched = prune.polynomial_sparsity(initial, final, begin, end, power)
  tx = prune.magnitude_prune(optax.sgd(1e-2, momentum=0.9), sched, frequency=frequency, begin=begin, end=end,
                             scope=scope)
  step, rng = _step(tx), np.random.default_rng(2)
  params = _params()
  state = tx.init(params)
  kernels = ("w1", "w2")
  sizes = {k: params[k].size for k in kernels}
  expected = {k: 0 for k in kernels + ("all",)}
  pruning_steps = []
  for t in range(16):
    old_masks = state.masks
    params, state = step(params, state, _grads(params, rng))
    if begin <= t <= end and (t - begin) % frequency == 0:
      pruning_steps.append(t)
      s = _numpy_sparsity(t, initial, final, begin, end, power)
      if scope == "layerwise":
        expected.update({k: round(s * n) for k, n in sizes.items()})
      else:
        expected["all"] = round(s * sum(sizes.values()))
    zeros = {k: _zeros(params[k]) for k in kernels}
    if scope == "layerwise":
      assert zeros == {k: expected[k] for k in kernels}, t
    else:
      assert sum(zeros.values()) == expected["all"], t
    assert _zeros(params["b"]) == 0
    for k in kernels:  # masks only grow: a pruned weight stays pruned while the target rises
      assert not np.any(np.asarray(state.masks[k]) & ~np.asarray(old_masks[k]))
      assert np.array_equal(np.asarray(params[k]) == 0, ~np.asarray(state.masks[k]))
  assert pruning_steps == [2, 4, 6, 8, 10, 12]
  if scope == "layerwise":  # by hand: s(12) = 0.8 -> round(38.4) = 38 of 48, round(64.0) = 64 of 80
    assert (expected["w1"], expected["w2"]) == (38, 64)
  else:  # round(0.8 * 128) = round(102.4)
    assert expected["all"] == 102


def test_global_scope_uses_one_threshold_across_leaves():
  # Global 50% of 8 weights: the 4 smallest magnitudes overall are all in "small".
  params = {"big": jnp.array([[4.0, -5.0], [6.0, 7.0]]), "small": jnp.array([[0.1, -0.2], [0.3, 0.4]])}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  for scope, want in (("global", {"big": 0, "small": 4}), ("layerwise", {"big": 2, "small": 2})):
    tx = prune.magnitude_prune(optax.sgd(0.1), 0.5, begin=0, end=0, scope=scope)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert {k: _zeros(v) for k, v in new.items()} == want, scope


def test_ties_are_broken_by_position():
  params = {"w": jnp.array([[1.0, -1.0, 1.0], [-1.0, 2.0, 1.0]])}
  tx = prune.magnitude_prune(optax.sgd(0.1), 0.5, begin=0, end=0)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  # five ties at |1|: the first three in row-major order go.
  assert optax.apply_updates(params, updates)["w"].tolist() == [[0.0, 0.0, 0.0], [-1.0, 2.0, 1.0]]


# --------------------------------------------------------------------------------------------
# 3. What is prunable.
# --------------------------------------------------------------------------------------------


def test_biases_never_pruned_and_prunable_override():
  params = _params()
  params["scale"] = jnp.full((5,), 0.01)  # tiny: first in line if 1-D leaves were pruned
  zero_grads = jax.tree.map(jnp.zeros_like, params)

  def run(tx):
    state = tx.init(params)
    updates, state = tx.update(zero_grads, state, params)
    return optax.apply_updates(params, updates), state

  new, state = run(prune.magnitude_prune(optax.sgd(0.1), 0.9, begin=0, end=0, scope="global"))
  assert _zeros(new["w1"]) + _zeros(new["w2"]) == 115  # round(0.9 * 128) of the kernels alone
  assert _zeros(new["b"]) == 0 and _zeros(new["scale"]) == 0
  assert state.masks["b"].shape == () and state.masks["scale"].shape == () and state.masks["w1"].shape == (8, 6)

  only_w1 = lambda path, leaf: jax.tree_util.keystr(path) == "['w1']"
  new, state = run(prune.magnitude_prune(optax.sgd(0.1), 0.5, begin=0, end=0, prunable=only_w1))
  assert {k: _zeros(v) for k, v in new.items()} == {"w1": 24, "w2": 0, "b": 0, "scale": 0}
  assert state.masks["w2"].shape == ()

  everything = lambda path, leaf: True  # the override may also prune 1-D leaves
  new, _ = run(prune.magnitude_prune(optax.sgd(0.1), 0.4, begin=0, end=0, prunable=everything))
  assert {k: _zeros(v) for k, v in new.items()} == {"w1": round(0.4 * 48), "w2": 32, "b": round(0.4 * 6),
                                                    "scale": 2}


# --------------------------------------------------------------------------------------------
# 4. N:M structured sparsity.
# --------------------------------------------------------------------------------------------


def test_n_m_two_of_four_keeps_the_two_largest_per_group():
  rng = np.random.default_rng(4)
  params = {"dense": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),  # (in, out)
            "conv": jnp.asarray(rng.normal(size=(3, 12, 2)), jnp.float32),  # (k, in, out)
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  tx = prune.magnitude_prune(optax.adam(1e-2), n_m=(2, 4), begin=0, end=0)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)  # adam: zero grads, no move
  new = optax.apply_updates(params, updates)
  for k in ("dense", "conv"):
    w, w0 = np.moveaxis(np.asarray(new[k]), -2, -1), np.moveaxis(np.asarray(params[k]), -2, -1)
    groups, groups0 = w.reshape(w.shape[:-1] + (-1, 4)), w0.reshape(w0.shape[:-1] + (-1, 4))
    assert np.all(np.sum(groups == 0, axis=-1) >= 2)
    assert np.all(np.sum(groups == 0, axis=-1) == 2)
    kept = np.sort(np.argsort(np.abs(groups0), axis=-1)[..., 2:], axis=-1)  # the 2 largest of each group
    kept_now = np.sort(np.argsort(groups != 0, axis=-1, kind="stable")[..., 2:], axis=-1)
    assert np.array_equal(kept, kept_now)
    assert np.array_equal(np.take_along_axis(groups, kept, -1), np.take_along_axis(groups0, kept, -1))
  assert _zeros(new["b"]) == 0
  assert _zeros(new["dense"]) == 12 and _zeros(new["conv"]) == 36  # exactly half of each

  # The pattern holds through further updates.
  step, rng = _step(tx), np.random.default_rng(5)
  params = new
  for _ in range(5):
    params, state = step(params, state, _grads(params, rng))
  assert _zeros(params["dense"]) == 12 and _zeros(params["conv"]) == 36


def test_n_m_rejects_leaves_not_divisible_and_bad_settings():
  tx = prune.magnitude_prune(optax.sgd(0.1), n_m=(2, 4))
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(6, 3\)"):
    tx.init({"w": jnp.ones((6, 3))})
  with pytest.raises(ValueError, match="do not give sparsity"):
    prune.magnitude_prune(optax.sgd(0.1), 0.5, n_m=(2, 4))
  with pytest.raises(ValueError, match="needs N < M"):
    prune.magnitude_prune(optax.sgd(0.1), n_m=(4, 4))
  with pytest.raises(ValueError, match="scope must be one of"):
    prune.magnitude_prune(optax.sgd(0.1), 0.5, scope="per_row")
  with pytest.raises(ValueError, match="give a sparsity"):
    prune.magnitude_prune(optax.sgd(0.1))
  with pytest.raises(ValueError, match="frequency must be an integer >= 1"):
    prune.magnitude_prune(optax.sgd(0.1), 0.5, frequency=0)
  with pytest.raises(ValueError, match="needs params"):
    tx = prune.magnitude_prune(optax.sgd(0.1), 0.5)
    tx.update({"w": jnp.ones((4, 4))}, tx.init({"w": jnp.ones((4, 4))}))


# --------------------------------------------------------------------------------------------
# 5. Composition: partition, MultiSteps, loss scale, jit.
# --------------------------------------------------------------------------------------------


def test_inside_partition_per_stage_targets_and_stage_sparsity():
  rng = np.random.default_rng(6)
  params = {"stages": {s: {"body": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                                    "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}} for s in ("s0", "s1")}}
  tx = optax.partition({"s0": prune.magnitude_prune(optax.adam(1e-2), 0.5, begin=1, end=1),
                        "s1": optax.adam(1e-2)}, optim.stage_labels(("s0", "s1")))
  step = _step(tx)
  state = tx.init(params)
  for t in range(6):
    params, state = step(params, state, _grads(params, rng))
    sp = {k: float(v) for k, v in prune.stage_sparsity(params).items()}
    assert sp == {"train/sparsity/s0": 0.0 if t < 1 else 0.5, "train/sparsity/s1": 0.0}, t
  assert _zeros(params["stages"]["s0"]["body"]["kernel"]) == 16
  assert _zeros(params["stages"]["s0"]["body"]["bias"]) == 0
  sp = jax.jit(prune.stage_sparsity)(params)  # jit-able for the train step
  assert float(sp["train/sparsity/s0"]) == 0.5


def test_inside_multisteps_masks_change_only_on_real_updates():
  sched = prune.polynomial_sparsity(0.25, 0.75, begin=1, end=3, power=1)  # 0.25, 0.5, 0.75 at updates 1, 2, 3
  tx = optax.MultiSteps(prune.magnitude_prune(optax.sgd(1e-2, momentum=0.9), sched, begin=1, end=3), every_k_schedule=2)
  step, rng = _step(tx), np.random.default_rng(7)
  params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}
  state = tx.init(params)
  zeros_after = []
  for micro in range(10):
    before = params
    params, state = step(params, state, _grads(params, rng))
    inner = state.inner_opt_state
    assert isinstance(inner, prune.PruneState)
    assert int(inner.count) == (micro + 1) // 2  # real updates only
    if micro % 2 == 0:  # accumulation step: nothing moves
      assert _bits(params) == _bits(before)
    zeros_after.append(_zeros(params["w"]))
  # real updates 0..4 happen at micro-steps 1, 3, 5, 7, 9; pruning at real updates 1, 2, 3.
  assert zeros_after == [0, 0, 0, 8, 8, 16, 16, 24, 24, 24]


def test_under_loss_scale_a_skipped_step_keeps_masks_and_count():
  tx = precision.dynamic_loss_scale(prune.magnitude_prune(optax.adam(1e-2), 0.5, begin=0, end=0),
                                    initial_scale=1.0, min_scale=1.0)
  step, rng = _step(tx), np.random.default_rng(8)
  params = {"w": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
  state = tx.init(params)
  params, state = step(params, state, _grads(params, rng))
  assert _zeros(params["w"]) == 8 and int(state.inner_state.count) == 1
  masks = np.asarray(state.inner_state.masks["w"])
  bad = {"w": jnp.full((4, 4), jnp.inf)}
  before = params
  params, state = step(params, state, bad)  # skipped
  assert _bits(params) == _bits(before) and int(state.inner_state.count) == 1 and int(state.skipped_steps) == 1
  for _ in range(3):
    params, state = step(params, state, _grads(params, rng))
  assert np.array_equal(np.asarray(state.inner_state.masks["w"]), masks)
  assert np.all(np.asarray(params["w"])[~masks] == 0) and _zeros(params["w"]) == 8


def test_state_is_a_pytree_through_jit_and_flatten():
  tx = prune.magnitude_prune(optax.adam(1e-2), prune.polynomial_sparsity(0.0, 0.5, 0, 4), begin=0, end=4)
  step, rng = _step(tx), np.random.default_rng(9)
  params = _params()
  state = jax.jit(tx.init)(params)
  assert isinstance(state, prune.PruneState) and state.count.dtype == jnp.int32
  assert state.masks["w1"].dtype == jnp.bool_
  for _ in range(3):
    params, state = step(params, state, _grads(params, rng))
  leaves, treedef = jax.tree.flatten(state)
  copy = jax.tree.unflatten(treedef, [jnp.array(x) for x in leaves])
  assert isinstance(copy, prune.PruneState) and jax.tree.structure(copy) == jax.tree.structure(state)
  grads = [_grads(params, rng) for _ in range(3)]
  p1, s1, p2, s2 = params, state, params, copy
  for g in grads:
    p1, s1 = step(p1, s1, g)
    p2, s2 = step(p2, s2, g)
  assert _bits(p1) == _bits(p2) and _bits(s1) == _bits(s2)
  assert _zeros(p1["w1"]) == 24  # s(4) = 0.5 of 48


# --------------------------------------------------------------------------------------------
# 6. Checkpointing.
# --------------------------------------------------------------------------------------------


def test_orbax_round_trip_continues_bit_identically(tmp_path):
  sched = prune.polynomial_sparsity(0.0, 0.6, begin=1, end=6)
  tx = prune.magnitude_prune(optax.sgd(1e-2, momentum=0.9), sched, begin=1, end=6, scope="global")
  step, rng = _step(tx), np.random.default_rng(10)
  params = _params()
  state = tx.init(params)
  for _ in range(4):
    params, state = step(params, state, _grads(params, rng))
  assert int(state.count) == 4 and _zeros(params["w1"]) + _zeros(params["w2"]) > 0

  path = tmp_path / "state"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, abstract)
  r_params, r_state = restored["params"], restored["opt_state"]
  assert isinstance(r_state, prune.PruneState) and int(r_state.count) == 4
  assert r_state.masks["w1"].dtype == jnp.bool_ and r_state.masks["b"].shape == ()
  assert _bits(r_state) == _bits(state) and _bits(r_params) == _bits(params)

  grads = [_grads(params, rng) for _ in range(3)]  # updates 4, 5, 6: masks still change
  for g in grads:
    params, state = step(params, state, g)
    r_params, r_state = step(r_params, r_state, g)
  assert _bits(r_params) == _bits(params) and _bits(r_state) == _bits(state)
  assert _zeros(params["w1"]) + _zeros(params["w2"]) == round(0.6 * 128)


def test_docstring_examples_run():
  result = doctest.testmod(prune, extraglobs={"jax": jax, "jnp": jnp, "optax": optax},
                           optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 10 and result.failed == 0


# --------------------------------------------------------------------------------------------
# Through the trainer (`config.compress.prune`).
# --------------------------------------------------------------------------------------------


def _schedule_value(t, initial, final, begin, end, power=3.0):
  """s(t) of the polynomial schedule, in numpy."""
  frac = min(max((t - begin) / (end - begin), 0.0), 1.0)
  return final + (initial - final) * (1.0 - frac) ** power


def test_training_with_pruning_reaches_the_schedule_and_logs_sparsity(tmp_path):
  """Gradual pruning to 50% over updates 0..20, masks every 10: each eval logs the sparsity of the last pruning
  step's target (per kernel, rounded), and the final kernels hold exactly that many zeros, biases none."""
  import helpers
  from chainjax import metrics as metrics_lib
  from chainjax import train

  config = helpers.load_config("default", "runlocal", total_steps=40, eval_every=10, checkpoint_every=40, **{
      "compress.prune.sparsity": 0.5, "compress.prune.begin_step": 0, "compress.prune.end_step": 20,
      "compress.prune.frequency": 10})
  train.train_and_evaluate(config, str(tmp_path))
  records = {r["step"]: r for r in metrics_lib.read_metrics(str(tmp_path))}
  params = helpers.final_state(tmp_path)["tree"]["params"]["stages"]
  kernels = {stage: [np.asarray(x) for x in jax.tree.leaves(params[stage]) if np.ndim(x) >= 2] for stage in params}
  for step, last_pruned in ((10, 0), (20, 10), (30, 20), (40, 20)):  # pruning steps t = 0, 10, 20 (0-based)
    target = _schedule_value(last_pruned, 0.0, 0.5, 0, 20)
    for stage, leaves in kernels.items():
      sizes = [leaf.size for leaf in leaves]
      expected = sum(round(target * n) for n in sizes) / sum(sizes)
      assert records[step][f"train/sparsity/{stage}"] == pytest.approx(expected, abs=1e-6), (step, stage)
  for stage, leaves in kernels.items():
    assert sum(int((leaf == 0).sum()) for leaf in leaves) == sum(round(0.5 * leaf.size) for leaf in leaves)
    assert all(np.all(np.asarray(x) != 0) for x in jax.tree.leaves(params[stage]) if np.ndim(x) == 1)


@pytest.mark.parametrize("overrides,field", [
    ({"compress.prune.sparsity": 0.5, "compress.prune.end_step": 3000}, "compress.prune.end_step"),
    ({"compress.prune.sparsity": 0.5, "compress.prune.begin_step": 3000}, "compress.prune.begin_step"),
    ({"compress.prune.sparsity": 0.5, "compress.prune.initial_sparsity": 0.6}, "compress.prune.initial_sparsity"),
    ({"compress.prune.sparsity": 0.5, "chain.mode": "progressive"}, "compress.prune.sparsity"),
    ({"compress.prune.n_m": "2:3", "compress.prune.sparsity": 0.5}, "compress.prune.n_m"),  # 256 inputs: not /3
])
def test_pruning_config_is_checked_against_the_run(overrides, field):
  import helpers
  from chainjax import config as config_lib
  from chainjax import experiment

  config = helpers.load_config("default", "", **overrides)
  with pytest.raises(config_lib.ConfigError) as info:
    experiment.validate(config, num_devices=1)
  assert info.value.field == field, str(info.value)


@pytest.mark.parametrize("count", [0, 1, 999, 1000, 2500, 3000, 3001, 30000, 65535, 65536])
def test_keep_top_is_the_stable_argsort_mask(count):
  """The bisection finds exactly the mask of a stable sort, ties (equal magnitudes, pruned -1s) by index."""
  scores = jnp.abs(jax.random.normal(jax.random.key(0), (65536,))).at[:1000].set(0.5).at[1000:3000].set(-1.0)
  order = np.argsort(np.asarray(scores), kind="stable")
  expected = np.ones(65536, bool)
  expected[order[:count]] = False
  np.testing.assert_array_equal(jax.jit(prune._keep_top)(scores, jnp.int32(count)), expected)
