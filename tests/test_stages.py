"""Stages and heads: shapes, train/eval behaviour, gradients, and config validation.

Sizes are chosen so that almost every kernel is [8, 8]: on CPU each new parameter
shape costs an XLA compile of its initializer (~1 s), which would otherwise
dominate the runtime of this file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chainjax import stages
from chainjax.stages import conv
from chainjax.config import ConfigError
from chainjax.data.base import LabelSpec

B = 3
D = 8  # feature size of every stage in these tests


def _build(type, in_shape, in_dtype=np.float32, **overrides):
  cfg = stages.stage_config(type, "s", **overrides)
  return stages.build_stage(cfg, in_shape, in_dtype, rngs=nnx.Rngs(0), path="chain.stages[0]")


def _head(h_shape, spec, **head):
  cfg = stages.stage_config("mlp", "s", head=head)
  return stages.build_head(cfg, h_shape, spec, rngs=nnx.Rngs(0), path="chain.stages[1]")


@nnx.jit(static_argnames=("train",))
def _call(module, x, *, train, key=None):
  """One jitted forward pass (eager NNX runs op by op, which is slow on CPU); updates BatchNorm stats."""
  return module(x, train=train, key=key)


def _inputs(in_shape, in_dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  if np.issubdtype(in_dtype, np.integer):
    return jnp.asarray(rng.integers(0, D, size=(B,) + in_shape), in_dtype)
  return jnp.asarray(rng.normal(size=(B,) + in_shape), in_dtype)


# Stage configs shared by several tests.
MLP = ("mlp", (D,), dict(features=D, norm="layer", activation="gelu"))
CONV = ("conv", (8, 8, D), dict(features=(D, D), norm="batch"))
LSTM = ("lstm", (5, D), dict(features=2))  # dense_i kernel [8, 4 * 2]
TRANSFORMER = ("transformer", (D, D), dict(num_layers=1, num_heads=2, mlp_dim=D, max_len=D))


@pytest.mark.parametrize("type,in_shape,in_dtype,overrides,out_shape", [
    ("mlp", (D,), np.float32, dict(features=D), (D,)),
    ("mlp", (5, D), np.float32, dict(features=D, depth=3, norm="layer", activation="tanh"), (5, D)),
    ("conv", (8, 8, D), np.float32, dict(features=(D, D)), (2, 2, D)),
    ("conv", (2, 8, 8, D), np.float32, dict(features=(D, D), pool="avg"), (2, 2, 2, D)),  # k=2 images each
    ("conv", (6, 6, D), np.uint8, dict(features=(D,), pool="none"), (6, 6, D)),
    ("embedding", (7,), np.int32, dict(vocab_size=D, features=D), (7, D)),
    ("lstm", (5, D), np.float32, dict(features=2), (2,)),
    ("lstm", (5, D), np.float32, dict(features=2, output="sequence"), (5, 2)),
    ("transformer", (5, D), np.float32, dict(num_heads=2, mlp_dim=D, max_len=D), (5, D)),
    ("transformer", (5, D), np.float32, dict(num_heads=2, mlp_dim=D, max_len=D, pool="mean"), (D,)),
    ("transformer", (5, D), np.float32, dict(num_heads=2, mlp_dim=D, max_len=D, pool="first"), (D,)),
])
def test_stage_output_shapes(type, in_shape, in_dtype, overrides, out_shape):
  stage = _build(type, in_shape, in_dtype, **overrides)
  expected = stages.output_shape(stage, in_shape, in_dtype)
  assert expected.shape == out_shape
  out = _call(stage, _inputs(in_shape, in_dtype), train=False)
  assert out.shape == (B,) + out_shape
  assert out.dtype == expected.dtype == jnp.float32


@pytest.mark.parametrize("h_shape,spec,head,logits_shape", [
    ((D,), LabelSpec("level_1", shape=(D,)), {}, (D,)),  # parity: D XORs of one level, binary
    ((D,), LabelSpec("level_3", shape=()), {}, ()),  # parity: the final bit
    ((3, 2, 2, 2), LabelSpec("line", shape=(3,), item_axes=1), {}, (3,)),  # line_parity: one bit per image
    ((3, 2, 2, D), LabelSpec("line", shape=(3,), item_axes=1), dict(pool="mean", hidden=D), (3,)),
    ((D,), LabelSpec("class", num_classes=D, default_loss="softmax_ce"), dict(hidden=D), (D,)),
    ((5, D), LabelSpec("class", num_classes=D, default_loss="softmax_ce"), dict(pool="last"), (D,)),
    ((2, D), LabelSpec("tok", shape=(2,), num_classes=4, item_axes=1), dict(pool="flatten"), (2, 4)),
])
def test_head_output_shapes(h_shape, spec, head, logits_shape):
  module = _head(h_shape, spec, **head)
  assert stages.output_shape(module, h_shape, np.float32).shape == logits_shape
  assert _call(module, _inputs(h_shape), train=False).shape == (B,) + logits_shape


def test_head_pools_reduce_the_right_axes():
  spec = LabelSpec("class", num_classes=D)
  h = _inputs((5, D))  # [B, T, F]
  h_changed = h.at[:, :-1].set(0.0)  # only the last position kept
  last = _head((5, D), spec, pool="last")
  np.testing.assert_allclose(_call(last, h, train=False), _call(last, h_changed, train=False), rtol=1e-6)
  mean = _head((5, D), spec, pool="mean")
  shuffled = h[:, ::-1]  # the mean over T ignores order
  np.testing.assert_allclose(_call(mean, h, train=False), _call(mean, shuffled, train=False), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(np.asarray(_call(mean, h, train=False) - _call(mean, h_changed, train=False))).max() > 1e-3


def test_items_get_the_same_head():
  spec = LabelSpec("line", shape=(3,), item_axes=1)
  head = _head((3, 2, 2, 2), spec)
  h = _inputs((3, 2, 2, 2))
  swapped = h[:, ::-1]  # reversing the items reverses their logits
  np.testing.assert_allclose(_call(head, swapped, train=False), _call(head, h, train=False)[:, ::-1], rtol=1e-6)


def test_disabled_head_is_none():
  cfg = stages.stage_config("mlp", "s", **{"head.enabled": False})
  assert stages.build_head(cfg, (D,), LabelSpec("y"), rngs=nnx.Rngs(0)) is None


@pytest.mark.parametrize("h_shape,spec,head,field", [
    ((4, 2, 2, 2), LabelSpec("line", shape=(3,), item_axes=1), {}, "chain.stages[1].head"),  # 4 items, 3 labels
    ((D,), LabelSpec("y", shape=(D,)), dict(pool="last"), "chain.stages[1].head.pool"),  # no sequence axis
])
def test_head_that_cannot_fit_raises(h_shape, spec, head, field):
  with pytest.raises(ConfigError) as err:
    _head(h_shape, spec, **head)
  assert err.value.field == field
  assert f"config.{field}:" in str(err.value)


def test_conv_batchnorm_updates_stats_only_in_training():
  type, in_shape, overrides = CONV
  stage = _build(type, in_shape, **overrides)
  x = _inputs(in_shape) * 3.0 + 1.0
  snapshot = lambda: jax.tree.map(np.array, nnx.state(stage, nnx.BatchStat))  # nnx.state is live, so copy
  before = snapshot()
  assert len(jax.tree.leaves(before)) == 4  # mean and var of two BatchNorms
  eval_out = _call(stage, x, train=False)
  jax.tree.map(np.testing.assert_array_equal, before, snapshot())
  np.testing.assert_array_equal(eval_out, _call(stage, x, train=False))  # eval is deterministic
  _call(stage, x, train=True)
  for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(snapshot())):
    assert np.abs(old - new).max() > 1e-4


@pytest.mark.parametrize("shape", [(3, 28, 28, 4), (2, 7, 9, 3)])  # even, and odd (the last row/column dropped)
def test_training_max_pool_matches_flax_max_pool_in_values_and_gradient(shape):
  x = jax.random.normal(jax.random.key(0), shape)  # continuous: every window's maximum is unique
  flax_pool = lambda x: nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
  np.testing.assert_array_equal(conv.max_pool_2x2(x), flax_pool(x))
  cotangent = jax.random.normal(jax.random.key(1), flax_pool(x).shape)
  grad = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * cotangent))(x)
  np.testing.assert_array_equal(grad(conv.max_pool_2x2), grad(flax_pool))


def test_conv_stage_trains_and_evaluates_to_the_same_values():
  """The pool of training (`max_pool_2x2`) and of inference (`nnx.max_pool`) give the same stage output."""
  cfg = stages.stage_config("conv", name="s", features=(4, 8), norm="none")
  net = stages.build_stage(cfg, (13, 13, 1), jnp.float32, rngs=nnx.Rngs(0), path="s")
  x = jax.random.normal(jax.random.key(2), (5, 13, 13, 1))
  np.testing.assert_array_equal(net(x, train=True), net(x, train=False))


def test_transformer_dropout_only_in_training():
  type, in_shape, overrides = TRANSFORMER
  stage = _build(type, in_shape, **overrides, dropout_rate=0.3)
  x = _inputs(in_shape)
  a = _call(stage, x, train=True, key=jax.random.key(1))
  b = _call(stage, x, train=True, key=jax.random.key(2))
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  np.testing.assert_array_equal(a, _call(stage, x, train=True, key=jax.random.key(1)))
  e1 = _call(stage, x, train=False)
  np.testing.assert_array_equal(e1, _call(stage, x, train=False, key=jax.random.key(3)))
  assert np.abs(np.asarray(a - e1)).max() > 1e-3
  with pytest.raises(ValueError, match="key"):
    _call(stage, x, train=True)


def test_lstm_last_is_last_position_of_sequence():
  type, in_shape, overrides = LSTM
  last = _build(type, in_shape, **overrides)
  seq = _build(type, in_shape, **overrides, output="sequence")  # same seed -> same weights
  x = _inputs(in_shape)
  h_seq = _call(seq, x, train=False)
  assert np.abs(np.asarray(h_seq[:, 0] - h_seq[:, -1])).max() > 1e-4  # the sequence output is not constant
  np.testing.assert_allclose(_call(last, x, train=False), h_seq[:, -1], rtol=1e-6, atol=1e-6)


def test_lstm_recurrent_kernel_is_orthogonal():
  type, in_shape, overrides = LSTM
  stage = _build(type, in_shape, **overrides)
  kernel = np.asarray(stage.rnn.cell.dense_h.kernel[...])  # [F, 4F]
  np.testing.assert_allclose(kernel @ kernel.T, np.eye(kernel.shape[0]), atol=1e-5)


@pytest.mark.parametrize("type,in_shape,overrides", [
    MLP, CONV, LSTM, TRANSFORMER], ids=["mlp", "conv", "lstm", "transformer"])
def test_gradient_reaches_every_parameter(type, in_shape, overrides):
  stage = _build(type, in_shape, **overrides)
  graphdef, params, rest = nnx.split(stage, nnx.Param, ...)
  x = _inputs(in_shape)
  probe = jax.random.normal(jax.random.key(0), (B,) + stages.output_shape(stage, in_shape, np.float32).shape)

  def loss(params, rest):
    # copy=True: split/merge share the module's Variables, and BatchNorm may only
    # mutate Variables created in the current (grad) trace.
    model = nnx.merge(graphdef, params, rest, copy=True)
    out = model(x, train=True, key=jax.random.key(0))
    return jnp.sum(out * probe), nnx.state(model, nnx.Not(nnx.Param))

  grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, rest)
  flat = nnx.to_flat_state(grads)
  assert len(flat) == len(nnx.to_flat_state(params)) >= 3
  for path, grad in flat:
    assert np.abs(np.asarray(grad[...])).max() > 0, f"zero gradient for {path}"


def test_stage_config_defaults_and_overrides():
  cfg = stages.stage_config("transformer", "enc", num_heads=8, dropout_rate=0, head={"hidden": 32},
                            **{"head.pool": "mean"})
  assert (cfg.name, cfg.type, cfg.num_heads, cfg.mlp_dim, cfg.max_len) == ("enc", "transformer", 8, 256, 512)
  assert isinstance(cfg.dropout_rate, float) and cfg.dropout_rate == 0.0  # int accepted, stored as float
  assert (cfg.head.enabled, cfg.head.pool, cfg.head.hidden) == (True, "mean", 32)
  assert (cfg.loss, cfg.pass_to_next) == ("", "hidden")
  assert stages.stage_config("conv", "c", features=[8]).features == (8,)
  assert stages.stage_config("conv", "c").features == (32, 64)
  assert stages.STAGE_TYPES == ("mlp", "conv", "embedding", "lstm", "transformer")


@pytest.mark.parametrize("type,overrides,field", [
    ("mlp", dict(widht=3), "stage[s].widht"),
    ("mlp", {"head.poool": "mean"}, "stage[s].head.poool"),
    ("mlp", dict(features="wide"), "stage[s].features"),
    ("mlp", dict(activation="swish"), "stage[s].activation"),
    ("mlp", dict(depth=0), "stage[s].depth"),
    ("conv", dict(features=(8, 0)), "stage[s].features"),
    ("transformer", dict(dropout_rate=1.0), "stage[s].dropout_rate"),
    ("rnn", {}, "stage[s].type"),
    ("mlp", dict(head="mean"), "stage[s].head"),
])
def test_stage_config_rejects_bad_overrides(type, overrides, field):
  with pytest.raises(ConfigError) as err:
    stages.stage_config(type, "s", **overrides)
  assert err.value.field == field
  assert field in str(err.value)


def _mutated(stage_type="mlp", **changes):
  """A valid stage config with `changes` forced in, past ConfigDict's own type checks."""
  cfg = stages.stage_config(stage_type, "s")
  for key, value in changes.items():
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    if leaf in node:
      del node[leaf]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize("changes,field,allowed", [
    (dict(extra=1), "chain.stages[2].extra", "activation"),  # unknown key; the message lists the fields
    (dict(features=2.5), "chain.stages[2].features", "int"),  # wrong type
    (dict(depth=True), "chain.stages[2].depth", "int"),  # a bool is not an int
    (dict(activation="swish"), "chain.stages[2].activation", "'gelu'"),  # bad enum
    (dict(pass_to_next="logits"), "chain.stages[2].pass_to_next", "'prediction'"),
    ({"head.pool": "max"}, "chain.stages[2].head.pool", "'last'"),
    ({"head.enabled": 1}, "chain.stages[2].head.enabled", "bool"),
    ({"head.hidden": -1}, "chain.stages[2].head.hidden", ">= 0"),
    (dict(features=0), "chain.stages[2].features", "positive"),
    (dict(name=""), "chain.stages[2].name", "non-empty"),
    (dict(type="rnn"), "chain.stages[2].type", "transformer"),
])
def test_validate_stage_config_names_the_field(changes, field, allowed):
  cfg = _mutated(**changes)
  with pytest.raises(ConfigError) as err:
    stages.validate_stage_config(cfg, "chain.stages[2]")
  assert err.value.field == field
  assert str(err.value).startswith(f"config.{field}:")
  assert allowed in str(err.value)


def test_validate_stage_config_accepts_defaults_and_int_for_float():
  for type in stages.STAGE_TYPES:
    stages.validate_stage_config(stages.stage_config(type, "s"), "chain.stages[0]")
  stages.validate_stage_config(_mutated("transformer", dropout_rate=0), "chain.stages[0]")
  with pytest.raises(ConfigError, match="float"):
    stages.validate_stage_config(_mutated("transformer", dropout_rate="0.1"), "chain.stages[0]")


@pytest.mark.parametrize("type,in_shape,in_dtype,overrides,field", [
    ("conv", (16,), np.float32, {}, "chain.stages[0].type"),  # rank-1 input
    ("conv", (4, 4, 1), np.float32, dict(features=(2, 2, 2)), "chain.stages[0].features"),  # pooled to nothing
    ("embedding", (7,), np.float32, {}, "chain.stages[0].type"),  # float tokens
    ("lstm", (7,), np.float32, {}, "chain.stages[0].type"),  # no feature axis
    ("mlp", (), np.float32, {}, "chain.stages[0].type"),  # a scalar input
    ("transformer", (9, 8), np.float32, dict(max_len=8), "chain.stages[0].max_len"),
    ("transformer", (7, 6), np.float32, dict(num_heads=4), "chain.stages[0].num_heads"),
])
def test_build_stage_rejects_inputs_that_do_not_fit(type, in_shape, in_dtype, overrides, field):
  with pytest.raises(ConfigError) as err:
    _build(type, in_shape, in_dtype, **overrides)
  assert err.value.field == field


def _neighbour_vs_distant_effect(transformer_module) -> float:
  """How much more a word's output moves when the word before it changes than when a word 10 places away does,
  for an untrained 1-block encoder (mean over a batch of random inputs)."""
  enc = transformer_module.Transformer(32, num_layers=1, num_heads=2, mlp_dim=32, dropout_rate=0.0, pool="none",
                                       max_len=32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 32, 32))
  out = enc(x, train=False)
  change = jax.random.normal(jax.random.key(2), (8, 32))
  moved = lambda j: float(jnp.abs(enc(x.at[:, j].add(change), train=False)[:, 16] - out[:, 16]).mean())
  return moved(15) / moved(6)


def test_transformer_starts_local_so_neighbouring_words_interact():
  """At init, word i hears word i - 1 far better than word i - 10 (the ALiBi-style `rel_bias` prior). The old
  stage (absolute positions only: attention spread evenly) gave a ratio of ~1, and on `synthetic_sentiment` it
  never learned negation ("not" + "good"), staying at bag-of-words AUC 0.76; see chainjax/stages/transformer.py."""
  from chainjax.stages import transformer
  assert _neighbour_vs_distant_effect(transformer) > 3.0
