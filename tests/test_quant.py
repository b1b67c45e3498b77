"""Quantization-aware training (`chainjax.compress.quant`): grids, gradients, observers, and model surgery."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chainjax import chain as chain_lib
from chainjax import data as data_lib
from chainjax import stages
from chainjax.compress import quant

SPECS = (data_lib.LabelSpec("bit"),) * 3


def mlp_chain(levels=3, seed=0):
  cfgs = [stages.stage_config("mlp", name=f"s{i}", features=8, depth=1) for i in range(levels)]
  return chain_lib.Chain(cfgs, (16,), jnp.float32, SPECS[:levels], rngs=nnx.Rngs(seed))


def np_fake_quant(x, scale, zero_point, qmin, qmax):
  x = np.asarray(x, np.float32)
  scale, zero_point = np.float32(scale), np.float32(zero_point)
  return ((np.clip(np.round(x / scale + zero_point), qmin, qmax) - zero_point) * scale).astype(np.float32)


def param_paths(model):
  return {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# --------------------------------------------------------------------------------------------
# Primitives.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, signed, scale, zero_point, grid", [
    (8, True, 0.05, 0, (-127, 127)),
    (4, True, 0.3, 0, (-7, 7)),
    (8, False, 0.04, 37, (0, 255)),
])
def test_fake_quant_is_round_to_nearest_on_the_clipped_grid(bits, signed, scale, zero_point, grid):
  assert quant.int_range(bits, signed) == grid
  x = np.concatenate([np.random.default_rng(0).normal(0, 4, 200), [0.0, 1e3, -1e3]]).astype(np.float32)
  want = np_fake_quant(x, scale, zero_point, *grid)
  got = quant.fake_quant(jnp.asarray(x), scale, zero_point, bits, signed=signed)
  np.testing.assert_array_equal(np.asarray(got), want)
  jitted = jax.jit(lambda x, s, z: quant.fake_quant(x, s, z, bits, signed=signed))
  np.testing.assert_array_equal(np.asarray(jitted(x, jnp.float32(scale), jnp.float32(zero_point))), want)
  assert set(np.unique(np.round(want / np.float32(scale) + zero_point))) <= set(range(grid[0], grid[1] + 1))
  assert want.max() == (grid[1] - zero_point) * np.float32(scale)  # 1e3 clips to the top of the grid


def test_ste_gradient_is_one_inside_the_range_and_zero_outside():
  # Signed int8, scale 1/8: the representable range is [-127/8, 127/8] = [-15.875, 15.875], bounds included.
  x = jnp.array([-20.0, -15.9, -15.875, -3.3, 0.0, 7.01, 15.875, 15.9, 100.0])
  grad = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, 0.125, 0, 8, signed=True)))(x)
  np.testing.assert_array_equal(np.asarray(grad), [0, 0, 1, 1, 1, 1, 1, 0, 0])
  # Unsigned int8, scale 1/4, zero point 10: the range is [-10/4, 245/4] = [-2.5, 61.25].
  x = jnp.array([-3.0, -2.5, 0.0, 61.25, 61.3])
  grad = jax.grad(lambda x: jnp.sum(quant.fake_quant(x, 0.25, 10, 8, signed=False)))(x)
  np.testing.assert_array_equal(np.asarray(grad), [0, 1, 1, 1, 0])
  # The upstream gradient passes through unchanged (not just summed ones).
  up = jnp.array([3.0, -2.0, 0.5, 7.0, 9.0])
  grad = jax.grad(lambda x: jnp.sum(up * quant.fake_quant(x, 0.25, 10, 8, signed=False)))(x)
  np.testing.assert_array_equal(np.asarray(grad), [0, -2.0, 0.5, 7.0, 0])


def test_per_channel_scales_are_max_abs_over_the_other_axes_over_qmax():
  dense = np.asarray(nnx.Linear(5, 7, rngs=nnx.Rngs(0)).kernel[...])
  conv = np.asarray(nnx.Conv(2, 4, kernel_size=(3, 3), rngs=nnx.Rngs(1)).kernel[...])
  for w, axes in ((dense, (0,)), (conv, (0, 1, 2))):
    for bits, qmax in ((8, 127), (4, 7)):
      scales = quant.weight_scales(jnp.asarray(w), bits, per_channel=True)
      assert scales.shape == (1,) * (w.ndim - 1) + (w.shape[-1],)  # one per output channel
      np.testing.assert_allclose(np.asarray(scales), np.abs(w).max(axis=axes, keepdims=True) / qmax, rtol=1e-6)
      tensor = quant.weight_scales(jnp.asarray(w), bits, per_channel=False)
      assert tensor.shape == ()
      np.testing.assert_allclose(float(tensor), np.abs(w).max() / qmax, rtol=1e-6)
  # Zero-safe: an all-zero channel gets scale 1 and stays exactly zero.
  w = dense.copy()
  w[:, 2] = 0.0
  scales = quant.weight_scales(jnp.asarray(w), 4, per_channel=True)
  assert float(scales[0, 2]) == 1.0 and bool(jnp.all(jnp.isfinite(scales)))
  wq = np.asarray(quant.quantize_weight(jnp.asarray(w), 4, per_channel=True))
  np.testing.assert_array_equal(wq[:, 2], 0.0)
  np.testing.assert_allclose(wq, np.round(w / np.asarray(scales)).clip(-7, 7) * np.asarray(scales), rtol=1e-6)
  # Embedding tables: one scale per row (token).
  table = jnp.asarray(np.random.default_rng(0).normal(size=(10, 4)), jnp.float32)
  assert quant.weight_scales(table, 8, per_channel=True, channel_axis=0).shape == (10, 1)


def test_weight_ste_gradient_is_identity():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  grad = jax.grad(lambda w: jnp.sum(jnp.arange(15.0).reshape(5, 3) * quant.quantize_weight(w, 4, True)))(w)
  np.testing.assert_array_equal(np.asarray(grad), np.arange(15.0).reshape(5, 3))


# --------------------------------------------------------------------------------------------
# Activation observers.
# --------------------------------------------------------------------------------------------


def test_ema_observer_updates_only_in_training_and_is_not_a_param():
  aq = quant.ActQuantizer(8, symmetric=False, act_range="ema", decay=0.99)
  x1 = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.float32)
  x2 = 3.0 * jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.float32)
  # Not yet observed: eval uses the batch's own range and changes nothing.
  y = aq(x1, train=False)
  assert int(aq.count[...]) == 0 and float(aq.min[...]) == 0.0 and float(aq.max[...]) == 0.0
  lo, hi = float(x1.min()), float(x1.max())
  scale, zero_point = (hi - lo) / 255, np.round(-lo / ((hi - lo) / 255))
  np.testing.assert_allclose(np.asarray(y), np_fake_quant(x1, scale, zero_point, 0, 255), atol=1e-6)
  aq(x1, train=True)  # the first batch initializes
  assert int(aq.count[...]) == 1 and float(aq.min[...]) == lo and float(aq.max[...]) == hi
  aq(x2, train=True)
  np.testing.assert_allclose(float(aq.min[...]), 0.99 * lo + 0.01 * float(x2.min()), rtol=1e-6)
  np.testing.assert_allclose(float(aq.max[...]), 0.99 * hi + 0.01 * float(x2.max()), rtol=1e-6)
  stats = (int(aq.count[...]), float(aq.min[...]), float(aq.max[...]))
  with quant.training(True):
    aq(x2, train=False)  # an explicit train=False wins over the context
  aq(x2)  # no training context: no update
  assert (int(aq.count[...]), float(aq.min[...]), float(aq.max[...])) == stats
  with quant.training(True):
    aq(x2)
  assert int(aq.count[...]) == 3
  _, params, rest = nnx.split(aq, nnx.Param, ...)
  assert not nnx.to_flat_state(params)
  assert {path for path, _ in nnx.to_flat_state(rest)} == {("count",), ("min",), ("max",)}
  assert all(isinstance(v, quant.QuantStats) and not isinstance(v, nnx.Param)
             for _, v in nnx.to_flat_state(nnx.state(aq)))


def test_chain_observers_follow_the_training_context_and_live_in_rest():
  model = quant.quantize(mlp_chain(), [quant.Rule(r"stages/s1/.*", weight_bits=8, act_bits=8)])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)
  counts = lambda: [int(q.input_quant.count[...]) for q in quant.quantized_layers(model).values()]
  model(x)  # eval: observers stay
  assert counts() == [0, 0]
  model(x, train=True)  # the chain sets each stage's training context from `train`
  assert counts() == [1, 1]
  with quant.training(True):  # the chain's own flag wins over an outer context
    model(x)
  assert counts() == [1, 1]
  model(x, train=True, mode="progressive", phase=0)  # s1 does not train in phase 0: its observers stay
  assert counts() == [1, 1]
  _, params, rest = nnx.split(model, nnx.Param, ...)
  rest_paths = {path for path, _ in nnx.to_flat_state(rest)}
  assert ("stages", "s1", "body", "layers", 0, "input_quant", "min") in rest_paths
  assert ("stages", "s1", "head", "out", "input_quant", "count") in rest_paths
  assert not any("input_quant" in path for path, _ in nnx.to_flat_state(params))


def test_lsq_scale_gets_the_lsq_gradient():
  aq = quant.ActQuantizer(4, symmetric=True, act_range="lsq")
  aq.count[...] = jnp.ones((), jnp.int32)
  aq.base_scale[...] = jnp.full((), 0.25, jnp.float32)  # grid [-7, 7] * 0.25 = [-1.75, 1.75]
  x = jnp.array([[0.1, -0.6, 1.3], [2.0, -3.0, 0.8]], jnp.float32)
  up = jnp.array([[1.0, 2.0, -1.0], [0.5, 1.5, 3.0]], jnp.float32)
  graphdef, params, rest = nnx.split(aq, nnx.Param, ...)

  def loss(params):
    return jnp.sum(up * nnx.merge(graphdef, params, rest, copy=True)(x, train=False))

  grad = float(jax.grad(loss)(params)["scale_delta"][...])
  q = np.asarray(x) / 0.25
  r = np.clip(np.round(q), -7, 7)
  ds = np.where(np.abs(q) <= 7, r - q, r)  # LSQ: round(q) - q inside, the clipped bound outside
  want = float(np.sum(np.asarray(up) * ds)) / np.sqrt(3 * 7)  # gradient scale 1 / sqrt(n * qmax), n = 3
  assert grad != 0.0
  np.testing.assert_allclose(grad, want, rtol=1e-5)
  assert {path for path, _ in nnx.to_flat_state(params)} == {("scale_delta",)}


def test_lsq_base_scale_comes_from_the_first_training_batch():
  aq = quant.ActQuantizer(8, symmetric=True, act_range="lsq")
  x = jnp.array([[0.5, -2.54], [1.0, 0.0]], jnp.float32)
  aq(jnp.zeros((2, 2)), train=True)  # all zeros carry no range: not an initialization
  assert int(aq.count[...]) == 0
  aq(x, train=True)
  assert int(aq.count[...]) == 1
  np.testing.assert_allclose(float(aq.base_scale[...]), 2.54 / 127, rtol=1e-6)
  aq(10.0 * x, train=True)
  np.testing.assert_allclose(float(aq.base_scale[...]), 2.54 / 127, rtol=1e-6)  # fixed after the first


# --------------------------------------------------------------------------------------------
# Model surgery.
# --------------------------------------------------------------------------------------------


def test_rules_select_exactly_the_named_modules():
  ref = mlp_chain()
  model = quant.quantize(nnx.clone(ref), [quant.Rule(r"stages/s1/.*", weight_bits=4, act_bits=8)])
  assert list(quant.candidate_layers(ref)) == [f"stages/s{i}/{m}" for i in range(3) for m in ("body/layers/0",
                                                                                               "head/out")]
  assert sorted(quant.quantized_layers(model)) == ["stages/s1/body/layers/0", "stages/s1/head/out"]
  assert sorted(quant.candidate_layers(model)) == [f"stages/s{i}/{m}" for i in (0, 2) for m in ("body/layers/0",
                                                                                                 "head/out")]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)
  out, want = model(x), ref(x)
  np.testing.assert_array_equal(np.asarray(out.hiddens[0]), np.asarray(want.hiddens[0]))
  np.testing.assert_array_equal(np.asarray(out.predictions[0]), np.asarray(want.predictions[0]))
  assert not np.array_equal(np.asarray(out.hiddens[1]), np.asarray(want.hiddens[1]))  # s1 is quantized
  h = out.hiddens[1]  # s2 on the same input: the float stage, unchanged
  for part in ("body", "head"):
    got = getattr(model.stages["s2"], part)(h, train=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(getattr(ref.stages["s2"], part)(h, train=False)))
  # s1's body is the float layer called with the fake-quantized kernel and input.
  layer = model.stages["s1"].body.layers[0]
  kernel = np.asarray(ref.stages["s1"].body.layers[0].kernel[...])
  scales = np.abs(kernel).max(axis=0, keepdims=True) / 7
  kq = np.clip(np.round(kernel / scales), -7, 7) * scales
  xq = layer.input_quant(out.hiddens[0], train=False)
  np.testing.assert_allclose(np.asarray(layer(out.hiddens[0])),
                             np.asarray(xq) @ kq + np.asarray(layer.bias[...]), rtol=1e-5, atol=1e-5)


def test_first_matching_rule_wins_and_float_rules_wrap_nothing():
  model = quant.quantize(mlp_chain(), [quant.Rule(r"stages/s0/.*", weight_bits=None, act_bits=None),
                                       quant.Rule(r"stages/s[01]/head/.*", weight_bits=2, act_bits=None),
                                       quant.Rule(r".*", weight_bits=8, act_bits=None, per_channel=False)])
  wrapped = quant.quantized_layers(model)
  assert sorted(wrapped) == ["stages/s1/body/layers/0", "stages/s1/head/out", "stages/s2/body/layers/0",
                             "stages/s2/head/out"]
  assert wrapped["stages/s1/head/out"].weight_bits == 2 and wrapped["stages/s2/head/out"].weight_bits == 8
  assert not wrapped["stages/s2/head/out"].per_channel and wrapped["stages/s1/head/out"].input_quant is None


def test_no_rules_is_bit_identical_in_forward_and_gradients():
  ref = mlp_chain()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)
  labels = [jnp.asarray(np.random.default_rng(i).integers(0, 2, 8), jnp.float32) for i in range(3)]
  loss_fn = chain_lib.ChainLoss("deep_supervision", SPECS, ("sigmoid_bce",) * 3, (1.0,) * 3)

  def grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    objective = lambda p: loss_fn(nnx.merge(graphdef, p, rest, copy=True)(x, train=True), labels, jnp.ones(8))[0]
    return nnx.to_pure_dict(jax.grad(objective)(params))

  want_out, want_grads = ref(x), grads(ref)
  for rules in ([], [quant.Rule(r".*", weight_bits=None, act_bits=None)]):
    model = quant.quantize(nnx.clone(ref), rules)
    assert not quant.quantized_layers(model)
    out = model(x)
    for a, b in zip(out.hiddens + out.predictions, want_out.hiddens + want_out.predictions):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grads(model), want_grads)


def test_parameter_paths_are_unchanged_and_keyed_by_stage():
  ref = mlp_chain()
  rules = [quant.Rule(r"stages/s1/.*", 4, 8, act_range="lsq"), quant.Rule(r".*", 8, 8)]
  model = quant.quantize(nnx.clone(ref), rules)
  old, new = param_paths(ref), param_paths(model)
  assert old <= new
  added = new - old
  assert added == {("stages", "s1", "body", "layers", 0, "input_quant", "scale_delta"),
                   ("stages", "s1", "head", "out", "input_quant", "scale_delta")}
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, value in nnx.to_flat_state(nnx.state(ref, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(params[path][...]), np.asarray(value[...]))
  for path in new | {p for p, _ in nnx.to_flat_state(nnx.state(model))}:
    assert path[0] == "stages" and chain_lib.stage_of_path(path) in ("s0", "s1", "s2")
  layer = model.stages["s0"].body.layers[0]
  assert isinstance(layer, quant.QuantizedLayer) and isinstance(layer.kernel, nnx.Param)
  assert layer.kernel.shape == (16, 8)


def test_bad_rules_raise():
  with pytest.raises(ValueError, match=re.escape("stages/nope/.*")):
    quant.quantize(mlp_chain(), [quant.Rule(r"stages/s0/.*", 8, 8), quant.Rule(r"stages/nope/.*", 8, 8)])
  for kwargs in ({"weight_bits": 1}, {"weight_bits": 9}, {"act_bits": 1}, {"act_bits": 9}, {"weight_bits": True}):
    with pytest.raises(ValueError, match="bits"):
      quant.Rule(r".*", **kwargs)
  with pytest.raises(ValueError, match="act_range"):
    quant.Rule(r".*", act_range="minmax")
  with pytest.raises(ValueError, match=re.escape("stages/(")):
    quant.Rule(r"stages/(")
  for bits in (1, 9):
    with pytest.raises(ValueError, match="bits"):
      quant.fake_quant(jnp.ones(3), 1.0, 0, bits)
    with pytest.raises(ValueError, match="bits"):
      quant.ActQuantizer(bits)


def test_rules_parse_from_config_strings():
  assert quant.Rule.parse("stages/s1/.* w=4 a=none per_channel=false act_range=lsq") == quant.Rule(
      "stages/s1/.*", weight_bits=4, act_bits=None, per_channel=False, act_range="lsq")
  assert quant.Rule.parse(r"stages/s\d/head/.*") == quant.Rule(r"stages/s\d/head/.*")
  assert quant.Rule.parse(".* act_bits=6 act_symmetric=true").act_symmetric
  for text in (".* bits=4", ".* w=four", ".* w=12", ".* per_channel=maybe", ".* w"):
    with pytest.raises(ValueError):
      quant.Rule.parse(text)


def test_lstm_conv_and_embedding_stages_quantize():
  specs = SPECS[:2]
  lstm = chain_lib.Chain([stages.stage_config("lstm", name="l0", features=8),
                          stages.stage_config("mlp", name="m1", features=8, depth=1)], (5, 3), jnp.float32, specs,
                         rngs=nnx.Rngs(0))
  quant.quantize(lstm, [quant.Rule(r"stages/l0/body/.*", 4, 8)])
  assert sorted(quant.quantized_layers(lstm)) == [f"stages/l0/body/rnn/cell/dense_{k}" for k in "hi"]
  graphdef, params, rest = nnx.split(lstm, nnx.Param, ...)

  @jax.jit
  def forward(params, rest, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    with quant.training(True):
      out = model(x, train=True)
    return out.predictions[1], nnx.state(model, nnx.Not(nnx.Param))

  y, rest = forward(params, rest, jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 3)), jnp.float32))
  assert y.shape == (4,) and bool(jnp.all(jnp.isfinite(y)))
  counts = {path[-3]: int(v[...]) for path, v in nnx.to_flat_state(rest) if path[-1] == "count"}
  assert counts == {"dense_i": 5, "dense_h": 4}  # one observation per time step; h_0 = 0 is skipped

  conv = chain_lib.Chain([stages.stage_config("conv", name="c0", features=(4,), norm="batch"),
                          stages.stage_config("mlp", name="m1", features=8, depth=1)], (8, 8, 2), jnp.float32, specs,
                         rngs=nnx.Rngs(0))
  quant.quantize(conv, [quant.Rule(r"stages/c0/body/.*", 8, 8)])
  layer = conv.stages["c0"].body.convs[0]
  assert isinstance(layer, quant.QuantizedLayer) and layer.layer_type == "Conv" and "bias" not in layer.var_names
  with quant.training(True):
    assert conv(jnp.ones((2, 8, 8, 2)), train=True).predictions[1].shape == (2,)

  emb = chain_lib.Chain([stages.stage_config("embedding", name="e0", vocab_size=10, features=4),
                         stages.stage_config("mlp", name="m1", features=8, depth=1)], (6,), jnp.int32, specs,
                        rngs=nnx.Rngs(0))
  table = np.asarray(emb.stages["e0"].body.embed.embedding[...])
  quant.quantize(emb, [quant.Rule(r"stages/e0/.*", 4, 8)])
  layer = emb.stages["e0"].body.embed
  assert isinstance(layer, quant.QuantizedLayer) and layer.input_quant is None  # tokens are not activations
  tokens = jnp.array([[0, 3, 9, 3, 1, 2]])
  scales = np.abs(table).max(axis=1, keepdims=True) / 7  # one scale per row
  want = (np.clip(np.round(table / scales), -7, 7) * scales)[np.asarray(tokens)]
  np.testing.assert_allclose(np.asarray(layer(tokens)), want, rtol=1e-6)


def test_boundary_quantizers_attach_under_their_stage():
  model = mlp_chain()
  attached = quant.attach_boundary_quantizers(model, 8, act_range="lsq", stages=("s0", "s1"))
  assert set(attached) == {"s0", "s1"} and model.stages["s0"].out_quant is attached["s0"]
  paths = param_paths(model) - param_paths(mlp_chain())
  assert paths == {("stages", "s0", "out_quant", "scale_delta"), ("stages", "s1", "out_quant", "scale_delta")}
  h = model(jnp.ones((2, 16))).hiddens[0]
  model.stages["s0"].out_quant(h, train=True)
  assert int(model.stages["s0"].out_quant.count[...]) == 1
  with pytest.raises(ValueError, match="nope"):
    quant.attach_boundary_quantizers(model, 8, stages=("nope",))


def test_jitted_train_step_over_a_quantized_chain_lowers_the_loss():
  model = quant.quantize(mlp_chain(), [quant.Rule(r"stages/s1/.*", weight_bits=4, act_bits=8, act_range="lsq"),
                                       quant.Rule(r".*", weight_bits=8, act_bits=8)])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 2, (64, 16)), jnp.float32)
  labels = [x[:, 0], jnp.logical_xor(x[:, 0] > 0, x[:, 1] > 0).astype(jnp.float32), x[:, 2]]
  mask = jnp.ones(64)
  loss_fn = chain_lib.ChainLoss("deep_supervision", SPECS, ("sigmoid_bce",) * 3, (1.0,) * 3)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def train_step(params, rest):
    def objective(params):
      model = nnx.merge(graphdef, params, rest, copy=True)  # as chainjax's train step
      with quant.training(True):
        output = model(x, train=True)
      loss, _ = loss_fn(output, labels, mask)
      return loss, nnx.state(model, nnx.Not(nnx.Param))

    (loss, rest_out), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), rest_out, loss, grads

  losses = []
  for _ in range(25):
    params, rest, loss, grads = train_step(params, rest)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  flat_grads = dict(nnx.to_flat_state(grads))
  assert float(jnp.abs(flat_grads[("stages", "s1", "body", "layers", 0, "input_quant", "scale_delta")][...])) > 0
  counts = [int(v[...]) for path, v in nnx.to_flat_state(rest) if path[-1] == "count"]
  assert counts == [25] * 6


# --------------------------------------------------------------------------------------------
# Through the trainer (`config.compress.qat.rules`).
# --------------------------------------------------------------------------------------------


def _qat_config(**overrides):
  import helpers
  return helpers.load_config("default", "runlocal", **{
      "compress.qat.rules": ("stages/level2/.* w=4 a=8",), "optim.schedule": "constant", **overrides})


def test_qat_run_quantizes_the_named_stage_and_resumes_exactly(tmp_path):
  """Stage level2 trains int4/int8: its observers are in the checkpoint, the other stages have none, and a
  run stopped at step 20 and resumed (observer state included) ends bit-identical to an uninterrupted one."""
  import helpers
  from chainjax import train

  whole = train.train_and_evaluate(_qat_config(total_steps=40, eval_every=20, checkpoint_every=20),
                                   str(tmp_path / "whole"))
  train.train_and_evaluate(_qat_config(total_steps=20, eval_every=20, checkpoint_every=20), str(tmp_path / "cut"))
  resumed = train.train_and_evaluate(_qat_config(total_steps=40, eval_every=20, checkpoint_every=20),
                                     str(tmp_path / "cut"))
  assert whole["step"] == resumed["step"] == 40
  ref, got = helpers.final_state(tmp_path / "whole")["tree"], helpers.final_state(tmp_path / "cut")["tree"]
  helpers.assert_trees_equal(ref["params"], got["params"])
  helpers.assert_trees_equal(ref["rest"], got["rest"])
  observers = {"/".join(str(k) for k in path[:2]) for path, _ in _flat(got["rest"]) if "input_quant" in path}
  assert observers == {"stages/level2"}
  counts = [v for path, v in _flat(got["rest"]) if "input_quant" in path and "count" in path]
  assert counts and all(float(np.asarray(c)) == 40 for c in counts)  # one observation per training update
  assert whole["eval/accuracy"] == resumed["eval/accuracy"]


def _flat(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat(v, prefix + (str(k),))
  else:
    yield prefix, tree


# --------------------------------------------------------------------------------------------
# Attention (nnx.LinearGeneral) and the transformer stage.
# --------------------------------------------------------------------------------------------


def test_attention_projections_quantize_per_output_feature():
  """MultiHeadAttention's query/key/value/out are LinearGeneral layers: kernels [in, heads, head_dim] and
  [heads, head_dim, out], one weight scale per output feature (the kernel's trailing out_features axes)."""
  ref = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
  mha = quant.quantize(nnx.clone(ref), [quant.Rule(r".*", weight_bits=4, act_bits=8)])
  assert sorted(quant.quantized_layers(mha)) == ["key", "out", "query", "value"]
  query, out = mha.query, mha.out
  assert query.layer_type == "LinearGeneral" and query.channel_axis == (1, 2) and out.channel_axis == (2,)
  kernel = np.asarray(ref.query.kernel[...])
  assert kernel.shape == (8, 2, 4)
  scales = np.asarray(quant.weight_scales(jnp.asarray(kernel), 4, True, query.channel_axis))
  assert scales.shape == (1, 2, 4)  # heads x head_dim: one per output feature
  np.testing.assert_allclose(scales, np.abs(kernel).max(axis=0, keepdims=True) / 7, rtol=1e-6)
  assert quant.weight_scales(out.kernel[...], 4, True, out.channel_axis).shape == (1, 1, 8)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
  kq = np.clip(np.round(kernel / scales), -7, 7) * scales
  want = np.einsum("btd,dhk->bthk", np.asarray(query.input_quant(x, train=False)), kq) + np.asarray(query.bias[...])
  np.testing.assert_allclose(np.asarray(query(x)), want, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(np.asarray(mha(x)), np.asarray(ref(x)))
  with quant.enabled(False):  # the float attention, bit for bit
    np.testing.assert_array_equal(np.asarray(mha(x)), np.asarray(ref(x)))
  assert param_paths(mha) == param_paths(ref)


def test_attention_rule_on_the_text_transformer_config():
  import helpers
  from chainjax import experiment
  from chainjax.data import base, text

  config = helpers.load_config("text_transformer", "runlocal", **{
      "data.train_size": 256, "compress.qat.rules": ("stages/encoder/body/blocks/.*/attn/.* w=8 a=8",)})
  experiment.validate(config, num_devices=8)
  task = text.text_task(config, None)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  assert sorted(quant.quantized_layers(model)) == [f"stages/encoder/body/blocks/{i}/attn/{m}" for i in range(2)
                                                   for m in ("key", "out", "query", "value")]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = next(task.train_iterator(config.batch_size, base.Shard()))

  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(batch["inputs"], train=True, key=jax.random.key(0)).predictions[-1]
    loss = jnp.mean(jax.nn.softplus(logits) - batch["labels"][-1] * logits)
    return loss, nnx.state(model, nnx.Not(nnx.Param))

  (loss, rest), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert np.isfinite(float(loss))
  counts = {path: int(v[...]) for path, v in nnx.to_flat_state(rest) if path[-1] == "count"}
  assert len(counts) == 8 and set(counts.values()) == {1}  # every projection's input observed once
  for path, g in nnx.to_flat_state(grads):
    if "attn" in path and path[-1] == "kernel":
      assert float(jnp.abs(g[...]).sum()) > 0, path
