"""ROC AUC (exact and thresholded), Keras-like epoch lines, and the eval AUC of a training run."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from chainjax import metrics


def reference_auc(scores, labels):
  """P(positive scored above negative) + 1/2 P(tie), over all pairs: the definition, O(n^2)."""
  pos = [s for s, y in zip(scores, labels) if y]
  neg = [s for s, y in zip(scores, labels) if not y]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("levels", [3, 50, None])  # heavy ties, some ties, continuous
def test_exact_auc_matches_the_pairwise_definition(levels):
  rng = np.random.default_rng(levels or 0)
  labels = rng.integers(0, 2, 600)
  scores = rng.normal(size=600) + labels
  if levels:
    scores = np.round(scores * levels / 4) / levels
  assert metrics.roc_auc(scores, labels) == pytest.approx(reference_auc(scores, labels), abs=1e-12)


def test_exact_auc_known_values_mask_and_degenerate_cases():
  assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # the scikit-learn docs example
  assert metrics.roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # all tied
  assert metrics.roc_auc([3, 2, 1], [1, 1, 0]) == 1.0
  # masked-out (padding) examples do not count, whatever their score
  assert metrics.roc_auc([0.1, 0.9, 5.0, -5.0], [0, 1, 0, 1], mask=[1, 1, 0, 0]) == 1.0
  assert np.isnan(metrics.roc_auc([0.2, 0.3], [1, 1]))


def test_thresholded_auc_of_summed_batches_is_close_to_exact():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 4000).astype(np.float32)
  logits = (rng.normal(size=4000) + 1.5 * labels).astype(np.float32)
  mask = np.ones(4000, np.float32)
  counts = sum(np.asarray(metrics.auc_counts(jnp.asarray(logits[i:i + 500]), jnp.asarray(labels[i:i + 500]),
                                             jnp.asarray(mask[i:i + 500]))) for i in range(0, 4000, 500))
  assert metrics.auc_from_counts(counts) == pytest.approx(metrics.roc_auc(logits, labels), abs=5e-3)
  records = [{"stage_1/auc_counts": counts / 2, "loss": 1.0}, {"stage_1/auc_counts": counts / 2, "loss": 3.0}]
  summary = metrics.mean_metrics(records)
  assert summary["loss"] == 2.0 and "stage_1/auc_counts" not in summary
  assert summary["stage_1/auc"] == pytest.approx(metrics.auc_from_counts(counts))


def test_epoch_line_is_keras_like():
  record = {"train/loss": 0.33, "train/auc": 0.85, "train/accuracy": 0.8, "eval/loss": 0.41, "eval/auc": 0.81}
  assert metrics.epoch_line(3, 20, 12.4, record) == (
      "Epoch 3/20 - 12s - loss: 0.3300 - auc: 0.8500 - val_loss: 0.4100 - val_auc: 0.8100")
  assert metrics.epoch_line(1, 5, 90, {"train/loss": 1.0, "train/accuracy": 0.5, "eval/loss": 2.0,
                                       "eval/accuracy": 0.25}) == (
      "Epoch 1/5 - 90s - loss: 1.0000 - accuracy: 0.5000 - val_loss: 2.0000 - val_accuracy: 0.2500")


def test_eval_auc_is_the_exact_auc_of_the_whole_padded_eval_set():
  """`train.evaluate` on 8 devices, eval set not a multiple of the batch: AUC of the model's own logits."""
  import jax
  from flax import nnx

  from chainjax import chain as chain_lib
  from chainjax import data as data_lib
  from chainjax import parallel
  from chainjax import train
  from chainjax.data import base
  from helpers import load_config

  config = load_config("default", "runlocal", **{"data.eval_size": 300, "eval_batch_size": 64})
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(3))
  loss_fn = chain_lib.ChainLoss.from_config(config, task.label_specs)
  graphdef, state = train.init_train_state(model, train.build_tx(config, 10))
  mesh = parallel.make_mesh()
  with jax.set_mesh(mesh):
    result = train.evaluate(jax.jit(train.make_eval_step(graphdef, loss_fn)), state,
                            task.eval_iterator(64, base.Shard()), mesh, 64, 3)
  inputs, labels = task._eval  # the whole held-out set, unpadded
  logits = model(jnp.asarray(inputs)).predictions[-1]
  expected = metrics.roc_auc(np.asarray(logits), labels[-1])
  assert result["eval/auc"] == result["eval/stage_3/auc"] == pytest.approx(expected, abs=1e-9)
  assert "eval/stage_1/auc" not in result  # stage 1 predicts 4 bits per example: no single ROC
  # Loss and accuracy: the 300 real examples only (the last batch holds 20 padded rows), each counted once.
  _, by_hand = loss_fn(model(jnp.asarray(inputs)), [jnp.asarray(y) for y in labels], jnp.ones(300))
  for key in ("stage_1/loss", "stage_1/accuracy", "stage_2/loss", "stage_2/accuracy", "stage_3/loss",
              "stage_3/accuracy"):
    assert result[f"eval/{key}"] == pytest.approx(float(by_hand[key]), rel=1e-5), key
  assert result["eval/loss"] == pytest.approx(sum(float(by_hand[f"stage_{i}/loss"]) * w for i, w in
                                                  zip((1, 2, 3), config.chain.loss_weights)), rel=1e-5)
  assert result["eval/accuracy"] == result["eval/stage_3/accuracy"]
