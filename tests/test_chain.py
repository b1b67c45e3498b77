"""The chain: forward outputs, losses, and where each mode lets the gradient flow."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainjax import chain as chain_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import stages
from chainjax import experiment

from helpers import override


def parity_config(mode="deep_supervision", d=16, levels=3, **overrides):
  config = config_lib.base_config()
  config.data.d, config.data.levels, config.data.eval_size = d, levels, 64
  config.chain.mode = mode
  config.chain.stages = [stages.stage_config("mlp", name=f"s{i}", features=32, depth=1) for i in range(levels)]
  config.chain.loss_weights = (0.5, 2.0, 1.0)[:levels]
  return override(config, **overrides)


def setup(config, batch_size=32):
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  batch = jax.tree.map(jnp.asarray, task.train_batch(0, batch_size))
  return task, model, loss_fn, batch


def grads_of(model, fn):
  """Gradient of `fn(model)` w.r.t. every nnx.Param, as a pure dict."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.grad(lambda p: fn(nnx.merge(graphdef, p, rest)))(params)
  return nnx.to_pure_dict(grads)


def stage_loss(loss_fn, model, batch, i, mode="deep_supervision"):
  """l_i alone (unweighted), computed through the full chain of `mode`."""
  out = model(batch["inputs"], mode=mode)
  return jnp.mean(chain_lib.per_example_loss(loss_fn.losses[i], out.predictions[i], batch["labels"][i]))


def test_forward_returns_every_hidden_and_prediction():
  task, model, _, batch = setup(parity_config())
  out = model(batch["inputs"])
  assert [h.shape for h in out.hiddens] == [(32, 32)] * 3
  assert [y.shape for y in out.predictions] == [(32, 4), (32, 2), (32,)]
  assert [s.logits_shape for s in task.label_specs] == [(4,), (2,), ()]


def test_chain_loss_is_weighted_sum_of_stage_losses():
  _, model, loss_fn, batch = setup(parity_config())
  out = model(batch["inputs"])
  total, metrics = loss_fn(out, batch["labels"], batch["mask"])
  expected = sum(w * metrics[f"stage_{i + 1}/loss"] for i, w in enumerate((0.5, 2.0, 1.0)))
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  end_to_end = chain_lib.ChainLoss.from_config(parity_config("end_to_end"), loss_fn.specs)
  total_e2e, _ = end_to_end(out, batch["labels"], batch["mask"])
  np.testing.assert_allclose(total_e2e, metrics["stage_3/loss"], rtol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid_bce", "hinge", "softmax_ce"])
def test_per_example_losses_match_numpy(kind):
  rng = np.random.default_rng(0)
  if kind == "softmax_ce":
    logits, labels = rng.normal(size=(5, 3)), rng.integers(0, 3, size=5)
    z = logits - logits.max(1, keepdims=True)
    expected = -(z[np.arange(5), labels] - np.log(np.exp(z).sum(1)))
  else:
    logits, labels = rng.normal(size=(5, 2)), rng.integers(0, 2, size=(5, 2)).astype(np.float32)
    if kind == "sigmoid_bce":
      p = 1 / (1 + np.exp(-logits))
      expected = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean(1)
    else:
      expected = np.maximum(0, 1 - (2 * labels - 1) * logits).mean(1)
  got = chain_lib.per_example_loss(kind, jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_masked_mean_ignores_padding():
  config = parity_config()
  task, model, loss_fn, batch = setup(config)
  out = model(batch["inputs"])
  mask = jnp.concatenate([jnp.ones(20), jnp.zeros(12)])
  _, metrics = loss_fn(out, batch["labels"], mask)
  l1 = chain_lib.per_example_loss("sigmoid_bce", out.predictions[0], batch["labels"][0])
  np.testing.assert_allclose(metrics["stage_1/loss"], l1[:20].mean(), rtol=1e-6)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_decoupled_stage_gradient_is_gradient_of_its_own_loss_alone(i):
  """In `decoupled`, stage i's body and head get the gradient of w_i * l_i and nothing else.

  Checked at every stage, not just the first: a chain that cut only the 1->2 link would
  still isolate stage 1, but stage 2 would then also learn from l_3.
  """
  config = parity_config("decoupled")
  _, model, loss_fn, batch = setup(config)
  assert loss_fn.weights == (0.5, 2.0, 1.0)  # distinct, so a stray term changes the gradient
  chain_grads = grads_of(model, lambda m: loss_fn(m(batch["inputs"], mode="decoupled"),
                                                  batch["labels"], batch["mask"])[0])
  own_grads = grads_of(model, lambda m: loss_fn.weights[i] * stage_loss(loss_fn, m, batch, i))
  name = f"s{i}"
  for part in ("body", "head"):
    assert float(optax.tree.norm(chain_grads["stages"][name][part])) > 0
  jax.tree.map(np.testing.assert_array_equal, chain_grads["stages"][name], own_grads["stages"][name])


def test_deep_supervision_stage1_gradient_is_sum_of_per_loss_gradients():
  """dL/dtheta_1 = sum_i w_i dl_i/dtheta_1 (the chain rule through every stage)."""
  config = parity_config("deep_supervision")
  _, model, loss_fn, batch = setup(config)
  chain_grads = grads_of(model, lambda m: loss_fn(m(batch["inputs"]), batch["labels"], batch["mask"])[0])
  per_loss = [grads_of(model, lambda m, i=i: w * stage_loss(loss_fn, m, batch, i))["stages"]["s0"]
              for i, w in enumerate((0.5, 2.0, 1.0))]
  for g in per_loss:  # every downstream loss reaches stage 1
    assert float(optax.tree.norm(g)) > 0
  summed = jax.tree.map(lambda *g: sum(g), *per_loss)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               chain_grads["stages"]["s0"], summed)
  # And it differs from what decoupled training would give stage 1 (l_1's gradient alone).
  assert not np.allclose(jax.tree.leaves(chain_grads["stages"]["s0"])[0], jax.tree.leaves(per_loss[0])[0])


def test_end_to_end_only_last_head_learns_but_gradient_reaches_stage1():
  _, model, loss_fn, batch = setup(parity_config("end_to_end"))
  grads = grads_of(model, lambda m: loss_fn(m(batch["inputs"], mode="end_to_end"), batch["labels"],
                                            batch["mask"])[0])
  assert float(optax.tree.norm(grads["stages"]["s0"]["head"])) == 0.0
  assert float(optax.tree.norm(grads["stages"]["s0"]["body"])) > 0.0
  assert float(optax.tree.norm(grads["stages"]["s2"]["head"])) > 0.0


def test_progressive_phase_trains_only_its_stage_bit_identically():
  config = parity_config("progressive", total_steps=30)
  task, model, loss_fn, _ = setup(config)
  tx = optax.adamw(1e-2, weight_decay=0.1)  # weight decay would move frozen params if they were not held
  graphdef, state = experiment.init_train_state(model, tx)
  step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, phase=1, stage_names=("s0", "s1", "s2")))
  before = nnx.to_pure_dict(state.params)
  for i in range(3):
    state, _ = step(state, jax.tree.map(jnp.asarray, task.train_batch(i, 32)))
  after = nnx.to_pure_dict(state.params)
  for name in ("s0", "s2"):
    jax.tree.map(np.testing.assert_array_equal, before["stages"][name], after["stages"][name])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before["stages"]["s1"],
                                         after["stages"]["s1"]))
  assert all(changed)


def test_phase_starts_split_budget():
  config = parity_config("progressive", total_steps=10)
  assert chain_lib.phase_starts(config) == (0, 4, 7)
  config.chain.phase_steps = (2, 3, 5)
  starts = chain_lib.phase_starts(config)
  assert starts == (0, 2, 5)
  assert [chain_lib.phase_at(starts, s) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]


def test_consistency_term_is_kl_between_consecutive_heads_of_same_label_space():
  spec = data_lib.LabelSpec("class", (), num_classes=3, default_loss="softmax_ce")
  loss_fn = chain_lib.ChainLoss("deep_supervision", (spec, spec), ("softmax_ce",) * 2, (1.0, 1.0), 0.5)
  a = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
  b = jnp.array([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
  out = chain_lib.ChainOutput((a, b), (a, b))
  labels = (jnp.array([0, 1]), jnp.array([0, 1]))
  total, metrics = loss_fn(out, labels, jnp.ones(2))
  p, q = jax.nn.softmax(b), jax.nn.softmax(a)
  kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
  np.testing.assert_allclose(metrics["consistency"], kl, rtol=1e-5)
  np.testing.assert_allclose(total, metrics["stage_1/loss"] + metrics["stage_2/loss"] + 0.5 * kl, rtol=1e-5)
  # Heads of different label spaces get no consistency term.
  other = data_lib.LabelSpec("other", (), num_classes=3, default_loss="softmax_ce")
  loss_fn2 = chain_lib.ChainLoss("deep_supervision", (spec, other), ("softmax_ce",) * 2, (1.0, 1.0), 0.5)
  assert "consistency" not in loss_fn2(out, labels, jnp.ones(2))[1]


def same_label_chain(mode, weights, consistency_weight, batch_size=32):
  """A 3-stage MLP chain whose heads all predict one 3-class label, so both consistency terms are on."""
  spec = data_lib.LabelSpec("class", (), num_classes=3, default_loss="softmax_ce")
  cfgs = [stages.stage_config("mlp", name=f"s{i}", features=16, depth=1) for i in range(3)]
  model = chain_lib.Chain(cfgs, (8,), jnp.float32, (spec,) * 3, rngs=nnx.Rngs(0))
  loss_fn = chain_lib.ChainLoss(mode, (spec,) * 3, ("softmax_ce",) * 3, weights, consistency_weight)
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, 3, size=batch_size))
  batch = {"inputs": jnp.asarray(rng.normal(size=(batch_size, 8)), jnp.float32),
           "labels": (labels,) * 3, "mask": jnp.ones(batch_size)}
  return model, loss_fn, batch


def own_consistency_term(model, batch, i, weight):
  """weight * KL(p_{i+1} || p_i) with p_{i+1} held fixed: what stage i alone should learn from (0 for the last)."""
  if i == 2:
    return jnp.zeros(())
  preds = model(batch["inputs"], mode="decoupled").predictions
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(preds[i + 1]))
  log_q = jax.nn.log_softmax(preds[i])
  return weight * jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def test_decoupled_consistency_target_gets_no_gradient():
  """KL(p_{i+1} || p_i) in `decoupled` pulls head i towards head i+1, never head i+1 towards head i.

  With every w_i = 0 the chain loss is the consistency term alone: the last stage is only
  ever a target, so its gradient is exactly zero; the first is only a learner, so its
  gradient is not; the middle one learns from KL(p_3 || p_2) only, not from being p_1's target.
  """
  model, loss_fn, batch = same_label_chain("decoupled", (0.0, 0.0, 0.0), 0.5)
  out = model(batch["inputs"], mode="decoupled")
  total, metrics = loss_fn(out, batch["labels"], batch["mask"])
  assert float(metrics["consistency"]) > 1e-4  # the heads disagree, so there is something to learn
  np.testing.assert_allclose(total, 0.5 * metrics["consistency"], rtol=1e-6)
  grads = grads_of(model, lambda m: loss_fn(m(batch["inputs"], mode="decoupled"), batch["labels"],
                                            batch["mask"])[0])["stages"]
  for leaf in jax.tree.leaves(grads["s2"]):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  for part in ("body", "head"):
    assert float(optax.tree.norm(grads["s0"][part])) > 1e-6
  own = grads_of(model, lambda m: own_consistency_term(m, batch, 1, 0.5))["stages"]["s1"]
  assert float(optax.tree.norm(own)) > 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), grads["s1"], own)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_decoupled_stage_gradient_with_consistency_is_own_loss_plus_own_term(i):
  """With `consistency_weight` > 0, stage i's gradient is that of w_i * l_i + c * KL(sg(p_{i+1}) || p_i).

  Neither the other stages' losses nor the consistency term that uses stage i's head as
  its target may reach stage i.
  """
  weights, c = (0.5, 2.0, 1.0), 0.7
  model, loss_fn, batch = same_label_chain("decoupled", weights, c)
  chain_grads = grads_of(model, lambda m: loss_fn(m(batch["inputs"], mode="decoupled"), batch["labels"],
                                                  batch["mask"])[0])["stages"][f"s{i}"]

  def own_objective(m):
    y = m(batch["inputs"], mode="decoupled").predictions[i]
    l_i = jnp.mean(chain_lib.per_example_loss("softmax_ce", y, batch["labels"][i]))
    return weights[i] * l_i + own_consistency_term(m, batch, i, c)

  own_grads = grads_of(model, own_objective)["stages"][f"s{i}"]
  for part in ("body", "head"):
    assert float(optax.tree.norm(chain_grads[part])) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), chain_grads, own_grads)


def test_progressive_keeps_frozen_stages_batchnorm_statistics_bit_identical():
  """Phase j updates only stage j's BatchNorm running statistics; every other stage's stay bit for bit.

  A frozen stage is still run in the forward pass of every phase; if it ran in training mode,
  its running mean and variance would drift towards the current batches even though its
  parameters are held, and its eval-time output would change behind the optimizer's back.
  """
  spec = data_lib.LabelSpec("bit")  # one binary label per example
  cfgs = [stages.stage_config("conv", name=f"s{i}", features=(4,), norm="batch") for i in range(3)]
  model = chain_lib.Chain(cfgs, (8, 8, 1), jnp.float32, (spec,) * 3, rngs=nnx.Rngs(0))  # 8 -> 4 -> 2 -> 1 px
  loss_fn = chain_lib.ChainLoss("progressive", (spec,) * 3, ("sigmoid_bce",) * 3, (1.0, 1.0, 1.0))
  tx = optax.adamw(1e-2, weight_decay=0.1)
  graphdef, state = experiment.init_train_state(model, tx)
  phase = 1
  step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, phase=phase,
                                       stage_names=("s0", "s1", "s2")))
  before = nnx.to_pure_dict(state.rest)["stages"]
  assert all(len(jax.tree.leaves(before[f"s{i}"])) == 2 for i in range(3))  # mean and var of one BatchNorm
  rng = np.random.default_rng(0)
  for _ in range(3):
    images = rng.normal(size=(16, 8, 8, 1)) * 3.0 + 1.0  # far from the initial mean 0, var 1
    labels = jnp.asarray(rng.integers(0, 2, size=16), jnp.float32)
    batch = {"inputs": jnp.asarray(images, jnp.float32), "labels": (labels,) * 3, "mask": jnp.ones(16)}
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  after = nnx.to_pure_dict(state.rest)["stages"]
  for name in ("s0", "s2"):  # upstream and downstream of the trained stage
    jax.tree.map(np.testing.assert_array_equal, before[name], after[name])
  for old, new in zip(jax.tree.leaves(before["s1"]), jax.tree.leaves(after["s1"])):
    assert np.abs(np.asarray(old) - np.asarray(new)).max() > 1e-4


# --------------------------------------------------------------------------------------------
# Chain modes as objects; progressive_finetune.
# --------------------------------------------------------------------------------------------


def test_every_mode_is_one_definition_with_its_phases():
  assert tuple(chain_lib.MODES) == ("end_to_end", "deep_supervision", "decoupled", "progressive",
                                    "progressive_finetune")
  assert [len(chain_lib.MODES[m].phases(3)) for m in chain_lib.MODES] == [1, 1, 1, 3, 4]
  last = chain_lib.MODES["progressive_finetune"].phase(3, 3)  # the fine-tuning phase: end to end on the last loss
  assert [last.counts(i) for i in range(3)] == [False, False, True]
  assert [last.cuts_before(i) for i in range(3)] == [False, False, False] and last.trains_every_stage
  greedy = chain_lib.MODES["progressive_finetune"].phase(3, 1)
  assert [greedy.counts(i) for i in range(3)] == [False, True, False]
  assert [greedy.cuts_before(i) for i in range(3)] == [False, True, False]
  assert [greedy.trains(i) for i in range(3)] == [False, True, False]
  with pytest.raises(config_lib.ConfigError, match=r"^config.chain.mode: 'greedy' is not one of: end_to_end"):
    chain_lib.get_mode("greedy")


def test_progressive_finetune_budgets_split_the_greedy_part_then_finetune():
  config = parity_config("progressive_finetune", total_steps=13, **{"chain.finetune_steps": 3})
  assert chain_lib.phase_budgets(config) == (4, 3, 3, 3)
  assert chain_lib.phase_starts(config) == (0, 4, 7, 10)
  config.chain.phase_steps = (2, 3, 5)
  assert chain_lib.phase_starts(config) == (0, 2, 5, 10)


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_progressive_finetune_greedy_phase_gradient_is_its_stage_loss_alone(phase):
  """Phase j < n: only stage j gets a gradient, that of w_j * l_j alone (as in `progressive`)."""
  config = parity_config("progressive_finetune", total_steps=40, **{"chain.finetune_steps": 10})
  _, model, loss_fn, batch = setup(config)
  grads = grads_of(model, lambda m: loss_fn(m(batch["inputs"], mode=loss_fn.mode, phase=phase), batch["labels"],
                                            batch["mask"], phase=phase)[0])["stages"]
  own = grads_of(model, lambda m: loss_fn.weights[phase] * stage_loss(loss_fn, m, batch, phase))["stages"]
  for i in range(3):
    if i == phase:
      assert float(optax.tree.norm(grads[f"s{i}"])) > 0
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), grads[f"s{i}"], own[f"s{i}"])
    else:
      assert float(optax.tree.norm(grads[f"s{i}"])) == 0.0


def test_progressive_finetune_last_phase_gradient_is_end_to_end():
  """Phase n: the gradient of every stage is that of w_n * l_n through the whole chain (as `end_to_end`)."""
  config = parity_config("progressive_finetune", total_steps=40, **{"chain.finetune_steps": 10})
  _, model, loss_fn, batch = setup(config)
  grads = grads_of(model, lambda m: loss_fn(m(batch["inputs"], mode=loss_fn.mode, phase=3), batch["labels"],
                                            batch["mask"], phase=3)[0])["stages"]
  e2e = chain_lib.ChainLoss.from_config(parity_config("end_to_end"), loss_fn.specs)
  expected = grads_of(model, lambda m: e2e(m(batch["inputs"], mode="end_to_end"), batch["labels"],
                                           batch["mask"])[0])["stages"]
  for name in ("s0", "s1"):
    assert float(optax.tree.norm(grads[name]["body"])) > 0 and float(optax.tree.norm(grads[name]["head"])) == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), grads, expected)


def test_progressive_finetune_steps_train_one_stage_then_every_stage():
  config = parity_config("progressive_finetune", total_steps=40, **{"chain.finetune_steps": 10})
  task, model, loss_fn, _ = setup(config)
  tx = optax.adam(1e-2)
  graphdef, state = experiment.init_train_state(model, tx)
  names = ("s0", "s1", "s2")
  for phase, trained in ((2, {"s2"}), (3, set(names))):
    step = jax.jit(experiment.make_train_step(graphdef, loss_fn, tx, seed=0, phase=phase, stage_names=names))
    before = nnx.to_pure_dict(state.params)["stages"]
    state, _ = step(state, jax.tree.map(jnp.asarray, task.train_batch(phase, 32)))
    after = nnx.to_pure_dict(state.params)["stages"]
    for name in names:
      moved = float(optax.tree.norm(jax.tree.map(jnp.subtract, after[name]["body"], before[name]["body"])))
      assert (moved > 0) == (name in trained), (phase, name, moved)


@pytest.mark.parametrize("finetune_steps,phase_steps,field", [
    (0, (), "chain.finetune_steps"), (40, (), "chain.finetune_steps"), (10, (10, 10, 20), "chain.phase_steps"),
    (38, (), "total_steps")])
def test_progressive_finetune_budgets_are_validated(finetune_steps, phase_steps, field):
  config = parity_config("progressive_finetune", total_steps=40,
                         **{"chain.finetune_steps": finetune_steps, "chain.phase_steps": phase_steps})
  with pytest.raises(config_lib.ConfigError) as info:
    experiment.validate(config, num_devices=1)
  assert info.value.field == field, str(info.value)
