"""The fast LSTM (`lstm.lstm_sequence`, a hand-written VJP) against `nnx.RNN(nnx.OptimizedLSTMCell)`.

Both implementations of the stage read the same parameters, so two stages built from the same seed
hold the same weights: outputs and gradients (all parameters and the input) are compared on them.
Sizes are small ([8, 16] input and [4, 16] recurrent kernels, a few steps) to keep compiles short.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from chainjax.compress import quant
from chainjax.stages import lstm

sys.path.insert(0, helpers.REPO)  # benchmarks/ is not an installed package

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

F_IN, F = 8, 4


def _pair(output: str):
  """A "fast" and a "scan" LSTM stage with the same weights (the same seed)."""
  return [lstm.LSTM(F_IN, features=F, output=output, rngs=nnx.Rngs(0), impl=impl) for impl in ("fast", "scan")]


def _value_and_grads(module, x, cotangent, dtype):
  """(output, d <output, cotangent> / d (params, x)), with params and x cast to `dtype` as the
  precision policy casts them (inside the differentiated function)."""
  graphdef, params = nnx.split(module)

  @jax.jit
  def run(params, x):
    def f(params, x):
      y = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params))(x.astype(dtype), train=True)
      return jnp.sum(y.astype(jnp.float32) * cotangent), y
    (_, y), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads

  y, (g_params, g_x) = run(params, x)
  flat = {"/".join(map(str, path)): np.asarray(v, np.float32) for path, v in nnx.to_flat_state(g_params)}
  return {"output": np.asarray(y, np.float32), **flat, "x": np.asarray(g_x, np.float32)}


def _inputs(shape, output, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  out_shape = shape[:-1] + (F,) if output == "sequence" else shape[:-2] + (F,)
  return x, jnp.asarray(rng.normal(size=out_shape), jnp.float32)


def test_fast_path_is_the_default_and_keeps_the_parameter_tree():
  fast, scan = _pair("last")
  assert lstm.LSTM(F_IN, features=F, output="last", rngs=nnx.Rngs(0)).uses_fast_path()
  assert fast.uses_fast_path() and not scan.uses_fast_path()
  paths = lambda m: sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param)))
  assert paths(fast) == paths(scan) == ["rnn/cell/dense_h/bias", "rnn/cell/dense_h/kernel", "rnn/cell/dense_i/kernel"]
  with lstm.implementation("scan"):
    assert not lstm.LSTM(F_IN, features=F, output="last", rngs=nnx.Rngs(0)).uses_fast_path()


@pytest.mark.parametrize("output", lstm.OUTPUTS)
@pytest.mark.parametrize("shape", [(3, 7, F_IN), (2, 3, 7, F_IN)], ids=["batch", "extra_leading_axis"])
def test_fast_matches_nnx_rnn_in_float32(output, shape):
  x, cotangent = _inputs(shape, output)
  fast, scan = (_value_and_grads(m, x, cotangent, jnp.float32) for m in _pair(output))
  assert sorted(fast) == sorted(scan) == ["output", "rnn/cell/dense_h/bias", "rnn/cell/dense_h/kernel",
                                          "rnn/cell/dense_i/kernel", "x"]
  for name, ref in scan.items():
    assert fast[name].shape == ref.shape, name
    np.testing.assert_allclose(fast[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("output", lstm.OUTPUTS)
def test_fast_matches_nnx_rnn_in_bfloat16(output):
  """bf16 compute (params and input cast to bf16, as under a bf16 compute policy).

  Tolerance: bf16 keeps 8 significant bits (a relative rounding of 2^-9 per operation), and the two
  backward passes round in different places: autodiff of the scan adds the weight gradients step by
  step in bf16, the fast path sums them over all steps at once, in float32, and rounds once. Over 32
  steps the two bf16 results may so differ by a few bf16 ulps of the largest entry, so each is checked
  within 2^-5 of the largest magnitude of the float32 result, and the fast path must be at least about as
  close to float32 as the reference bf16 computation is (it is closer on the weight gradients).
  """
  x, cotangent = _inputs((4, 32, F_IN), output)
  fast, scan = (_value_and_grads(m, x, cotangent, jnp.bfloat16) for m in _pair(output))
  exact = _value_and_grads(_pair(output)[1], x, cotangent, jnp.float32)
  for name, ref in exact.items():
    scale = np.abs(ref).max()
    np.testing.assert_allclose(fast[name], scan[name], rtol=0, atol=2 ** -5 * scale, err_msg=name)
    fast_err, scan_err = np.abs(fast[name] - ref).max(), np.abs(scan[name] - ref).max()
    assert fast_err <= 1.5 * scan_err + 2 ** -8 * scale, (name, fast_err, scan_err)


def test_qat_wrapped_cell_falls_back_to_nnx_rnn_and_is_fake_quantized():
  fast, float_twin = _pair("last")
  quant.quantize(fast, [quant.Rule(r"rnn/cell/dense_.", weight_bits=2, act_bits=2)])
  assert fast.impl == "fast" and not fast.uses_fast_path()  # dense_i, dense_h are QuantizedLayers now
  graphdef, state = nnx.split(fast)
  x, _ = _inputs((3, 7, F_IN), "last")

  @functools.partial(jax.jit, static_argnums=2)
  def forward(state, x, enabled):
    with quant.enabled(enabled):
      return nnx.merge(graphdef, state)(x, train=False)

  quantized, unquantized = forward(state, x, True), forward(state, x, False)
  np.testing.assert_allclose(unquantized, nnx.jit(lambda m, x: m(x, train=False))(float_twin, x), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(quantized) - np.asarray(unquantized)).max() > 1e-3  # 2-bit weights and inputs


def test_imdb_lstm_chain_trains_with_the_fast_lstm():
  """The trainer's jitted step (8 fake devices) on imdb_lstm runlocal: on a fixed batch the loss goes down,
  update by update as with the nnx.RNN stage (same init, same batch)."""
  config = lambda: helpers.load_config("imdb_lstm", "data=synthetic,runlocal", **{"data.max_len": 16})
  losses = {}
  for impl in lstm.IMPLS:
    with lstm.implementation(impl):
      bench = common.StepBench(config())
    encoder = nnx.merge(bench.exp.graphdef, bench.state.params, bench.state.rest).stages["encoder"].body
    assert encoder.uses_fast_path() == (impl == "fast")
    batch = bench.train_batches(1)
    losses[impl] = []
    for _ in range(10):
      bench.run(batch)
      losses[impl].append(float(jax.device_get(bench.metrics["loss"])))
  fast = np.asarray(losses["fast"])
  assert np.all(np.isfinite(fast)) and np.all(np.diff(fast) < 0) and fast[-1] < fast[0] - 0.02, fast
  np.testing.assert_allclose(fast, losses["scan"], rtol=1e-4)
