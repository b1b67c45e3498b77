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
from chainjax import train

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


def test_decoupled_stage1_gradient_is_gradient_of_l1_alone():
  config = parity_config("decoupled")
  _, model, loss_fn, batch = setup(config)
  chain_grads = grads_of(model, lambda m: loss_fn(m(batch["inputs"], mode="decoupled"),
                                                  batch["labels"], batch["mask"])[0])
  l1_grads = grads_of(model, lambda m: 0.5 * stage_loss(loss_fn, m, batch, 0))
  s0 = chain_grads["stages"]["s0"]
  assert float(optax.tree.norm(s0)) > 0
  jax.tree.map(np.testing.assert_array_equal, s0, l1_grads["stages"]["s0"])


def test_deep_supervision_stage1_gradient_is_sum_of_per_loss_gradients():
  """dL/dtheta_1 = sum_i w_i dl_i/dtheta_1 (design document, section 4.2)."""
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
  graphdef, state = train.init_train_state(model, tx)
  step = jax.jit(train.make_train_step(graphdef, loss_fn, tx, seed=0, phase=1, stage_names=("s0", "s1", "s2")))
  before = nnx.to_pure_dict(state["params"])
  for i in range(3):
    state, _ = step(state, jax.tree.map(jnp.asarray, task.train_batch(i, 32)))
  after = nnx.to_pure_dict(state["params"])
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
