"""The PyTorch peers of the benchmarks (benchmarks/peers): they run, and they are the same models.

Skipped without torch (the optional `bench` extra). "The same model" is checked as the same
number of parameters as the chainjax chain built from the config the peer claims to match; the
chain is built from its stage configs and the task's shapes alone (`chain.Chain`; no dataset is
needed, and `nnx.eval_shape` allocates nothing).
"""

from __future__ import annotations

import math
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import helpers

torch = pytest.importorskip("torch")

sys.path.insert(0, helpers.REPO)  # benchmarks/ is not a package that is installed

from benchmarks import peers  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.peers import torch_models  # pylint: disable=g-import-not-at-top,wrong-import-position
from chainjax import chain as chain_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from chainjax.data.base import LabelSpec  # pylint: disable=g-import-not-at-top,wrong-import-position


def _chainjax_param_count(config, input_shape, input_dtype, specs) -> int:
  """Trainable scalars (`nnx.Param`) of the chain of `config` for inputs of `input_shape` per example."""
  model = nnx.eval_shape(lambda: chain_lib.Chain(config.chain.stages, input_shape, input_dtype, specs,
                                                 rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_available():
  assert peers.available()


def test_quick_rows_have_positive_rates():
  """One quick row per model (the LSTM at batch 16): positive rates, min <= median <= max."""
  rows = peers.rows(quick=True, names=("imdb_lstm b16", "fashion_mnist_cnn b128"))
  assert [row["name"] for row in rows] == ["imdb_lstm b16", "fashion_mnist_cnn b128"]
  for row in rows:
    assert set(row) == {"name", "examples_per_sec", "min", "max", "torch", "threads"}
    assert 0 < row["min"] <= row["examples_per_sec"] <= row["max"], row
    assert row["torch"] == torch.__version__ and row["threads"] >= 1


def test_cnn_has_the_chainjax_parameter_count():
  config = helpers.load_config("fashion_mnist_cnn")
  specs = (LabelSpec(name="label", num_classes=10, default_loss="softmax_ce"),) * 3
  ours = _chainjax_param_count(config, (28, 28, 1), np.uint8, specs)
  # conv kernels (no bias: BatchNorm follows) + BatchNorm scale and bias + heads on the flattened maps
  assert ours == (9 * 16 + 2 * 16 + 14 * 14 * 16 * 10 + 10) + (9 * 16 * 32 + 2 * 32 + 7 * 7 * 32 * 10 + 10) + (
      9 * 32 * 64 + 2 * 64 + 3 * 3 * 64 * 128 + 128 + 128 * 10 + 10)
  assert torch_models.param_count(torch_models.fashion_mnist_cnn_model()) == ours


def test_lstm_has_the_chainjax_parameter_count_up_to_torch_second_bias():
  """Torch's LSTM has two bias vectors per gate set (b_ih and b_hh, 4F each) where chainjax's
  (Flax's OptimizedLSTMCell: input kernel without bias, recurrent kernel with one) has one: the
  same function (the biases only ever appear summed), 4 * 128 = 512 more parameters in torch."""
  config = helpers.load_config("imdb_lstm")
  specs = (LabelSpec(name="sentiment"),) * 3
  ours = _chainjax_param_count(config, (torch_models.IMDB_SEQ_LEN,), np.int32, specs)
  features = torch_models.IMDB_FEATURES
  model = torch_models.imdb_lstm_model()
  assert model.lstm.bias_ih_l0.numel() == model.lstm.bias_hh_l0.numel() == 4 * features
  assert torch_models.param_count(model) == ours + 4 * features
  assert ours == 20000 * 128 + (2 * 128 * 512 + 512) + (128 * 128 + 128) + (128 + 1)
