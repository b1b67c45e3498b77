"""Kernel initializers chosen by a stage config's `init` and `recurrent_init` fields.

The variance checks use large kernels (half a million entries), so the sample
variance is within ~0.3% of the true one and a 3% tolerance leaves room. On CPU
each new kernel shape costs XLA compiles of its initializer's ops, so the large
kernels all have 512 * 1024 entries and almost every small one is [8, 8].
"""

import jax
import numpy as np
import pytest
from flax import nnx

from chainjax import stages
from chainjax.config import ConfigError
from chainjax.data.base import LabelSpec
from chainjax.stages import init as init_lib

D = 8
SPEC = LabelSpec("class", num_classes=4, default_loss="softmax_ce")

# (type, per-example input shape, input dtype, overrides): one small case per stage type.
CASES = [
    ("mlp", (D,), np.float32, dict(features=D, norm="layer")),
    ("conv", (8, 8, D), np.float32, dict(features=(D,), norm="batch", head={"pool": "mean"})),
    ("embedding", (5,), np.int32, dict(vocab_size=D, features=D, head={"pool": "mean"})),
    ("lstm", (5, D), np.float32, dict(features=2)),  # input kernel [8, 4 * 2], recurrent [2, 8]
    ("transformer", (5, D), np.float32,
     dict(num_layers=1, num_heads=2, mlp_dim=D, max_len=D, head={"pool": "mean"})),  # q, k, v, out: [8, 8]
]
IDS = [case[0] for case in CASES]


def _stage_and_head(type, in_shape, in_dtype, head=None, **overrides):
  """A stage and its head (with a hidden layer) built from one `Rngs(0)`, as `Chain` builds them."""
  cfg = stages.stage_config(type, "s", head={"hidden": D, **(head or {})}, **overrides)
  rngs = nnx.Rngs(0)
  stage = stages.build_stage(cfg, in_shape, in_dtype, rngs=rngs)
  head = stages.build_head(cfg, stages.output_shape(stage, in_shape, in_dtype).shape, SPEC, rngs=rngs)
  return stage, head


def _params(*modules) -> dict[str, np.ndarray]:
  """All parameters of `modules` by path, as numpy arrays."""
  out = {}
  for i, module in enumerate(modules):
    for path, value in nnx.to_flat_state(nnx.state(module, nnx.Param)):
      out["/".join(map(str, (i,) + path))] = np.asarray(value[...])
  return out


def _as_matrix(path: str, kernel: np.ndarray) -> np.ndarray:
  """`kernel` as the [fan_in, fan_out] matrix its initializer saw."""
  if kernel.ndim == 3:  # attention LinearGeneral: q/k/v [D, H, Dh]; out [H, Dh, D]
    return kernel.reshape(-1, kernel.shape[-1]) if "/out/" in path else kernel.reshape(kernel.shape[0], -1)
  return kernel.reshape(-1, kernel.shape[-1])  # Dense [in, out]; Conv [kh, kw, in, out] -> [kh * kw * in, out]


def _is_orthonormal(matrix: np.ndarray, atol: float = 1e-4) -> bool:
  """Whether the columns (for a tall matrix) or rows (for a wide one) of `matrix` are orthonormal."""
  gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
  return np.allclose(gram, np.eye(gram.shape[0]), atol=atol)


def _kernels(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The kernels and embedding tables among `params` (not biases, norms or the position embedding)."""
  return {path: value for path, value in params.items() if path.rsplit("/", 1)[-1] in ("kernel", "embedding")}


FAN_IN, FAN_OUT = 512, 1024


@pytest.mark.parametrize("name,variance", [
    ("xavier_uniform", 2 / (FAN_IN + FAN_OUT)),
    ("xavier_normal", 2 / (FAN_IN + FAN_OUT)),
    ("he_uniform", 2 / FAN_IN),
    ("he_normal", 2 / FAN_IN),
    ("lecun_normal", 1 / FAN_IN),
])
def test_kernel_variance_matches_the_formula(name, variance):
  cfg = stages.stage_config("mlp", "s", features=FAN_OUT, depth=1, init=name)
  stage = stages.build_stage(cfg, (FAN_IN,), np.float32, rngs=nnx.Rngs(0))
  kernel = np.asarray(stage.layers[0].kernel[...], np.float64)  # [512, 1024]
  assert kernel.shape == (FAN_IN, FAN_OUT)
  assert abs(kernel.mean()) < 0.01 * np.sqrt(variance)  # the sampling error of the mean is ~0.0014 std
  assert abs(kernel.var() / variance - 1) < 0.03, f"{name}: var {kernel.var():.3e}, expected {variance:.3e}"


def test_embedding_fan_in_is_the_feature_size():
  # The table [V, F] = [512, 1024]: fan_in is F (as in Flax's default), not V.
  cfg = stages.stage_config("embedding", "s", vocab_size=FAN_IN, features=FAN_OUT, init="he_normal")
  table = np.asarray(stages.build_stage(cfg, (5,), np.int32, rngs=nnx.Rngs(0)).embed.embedding[...], np.float64)
  assert table.shape == (FAN_IN, FAN_OUT)
  assert abs(table.var() / (2 / FAN_OUT) - 1) < 0.03


def test_orthogonal_square_kernel():
  cfg = stages.stage_config("mlp", "s", features=D, depth=1, init="orthogonal")
  kernel = np.asarray(stages.build_stage(cfg, (D,), np.float32, rngs=nnx.Rngs(0)).layers[0].kernel[...])
  np.testing.assert_allclose(kernel.T @ kernel, np.eye(D), atol=1e-4)
  np.testing.assert_allclose(kernel @ kernel.T, np.eye(D), atol=1e-4)


def test_lstm_input_and_recurrent_inits_are_separate():
  """`init` sets the input kernel [F_in, 4F]; `recurrent_init` the recurrent kernel [F, 4F] (gates side by side)."""
  features, in_features = FAN_OUT // 4, FAN_IN  # input kernel [512, 1024], recurrent [256, 1024]
  cfg = stages.stage_config("lstm", "s", features=features, init="xavier_normal")  # recurrent_init: orthogonal
  cell = stages.build_stage(cfg, (5, in_features), np.float32, rngs=nnx.Rngs(0)).rnn.cell
  recurrent = np.asarray(cell.dense_h.kernel[...])
  assert recurrent.shape == (features, 4 * features)
  # A [F, 4F] kernel can only have orthonormal rows: K K^T = I.
  np.testing.assert_allclose(recurrent @ recurrent.T, np.eye(features), atol=1e-4)
  inputs = np.asarray(cell.dense_i.kernel[...], np.float64)
  assert abs(inputs.var() / (2 / (in_features + 4 * features)) - 1) < 0.03

  cfg = stages.stage_config("lstm", "s", features=features, recurrent_init="he_normal")
  recurrent = np.asarray(stages.build_stage(cfg, (5, in_features), np.float32, rngs=nnx.Rngs(0))
                         .rnn.cell.dense_h.kernel[...], np.float64)
  assert not _is_orthonormal(recurrent)
  assert abs(recurrent.var() / (2 / features) - 1) < 0.03


@pytest.mark.parametrize("type,in_shape,in_dtype,overrides", CASES, ids=IDS)
def test_init_reaches_every_kernel_of_stage_and_head(type, in_shape, in_dtype, overrides):
  stage, head = _stage_and_head(type, in_shape, in_dtype, init="orthogonal", **overrides)
  kernels = _kernels(_params(stage, head))
  assert len(kernels) >= 3
  for path, kernel in kernels.items():
    assert _is_orthonormal(_as_matrix(path, kernel)), f"{path} {kernel.shape} did not get init='orthogonal'"
  # With Flax's defaults no kernel is orthonormal (the LSTM's recurrent one is, by its own default).
  default = _kernels(_params(*_stage_and_head(type, in_shape, in_dtype, **overrides)))
  assert default.keys() == kernels.keys()
  for path, kernel in default.items():
    assert _is_orthonormal(_as_matrix(path, kernel)) == path.endswith("dense_h/kernel"), path


@pytest.mark.parametrize("type,in_shape,in_dtype,overrides", CASES, ids=IDS)
def test_default_init_leaves_params_unchanged(type, in_shape, in_dtype, overrides):
  """Configs that leave the fields unset, or set them to "default", build the same params for one seed.

  For the LSTM, "default" leaves the recurrent kernel to Flax (orthogonal) while the
  field's default "orthogonal" passes our initializer: they must agree bit for bit.
  """
  unset = _params(*_stage_and_head(type, in_shape, in_dtype, **overrides))
  explicit = dict(init="default", **(dict(recurrent_init="default") if type == "lstm" else {}))
  default = _params(*_stage_and_head(type, in_shape, in_dtype, **explicit, **overrides))
  assert unset.keys() == default.keys()
  for path in unset:
    np.testing.assert_array_equal(unset[path], default[path], err_msg=path)


def test_default_init_matches_plain_flax_modules():
  """An MLP stage and head with init="default" are exactly the Flax `Linear`s built with no init arguments."""
  stage, head = _stage_and_head("mlp", (D,), np.float32, features=D, depth=2)
  rngs = nnx.Rngs(0)  # the same draws, in the same order, as the stage and then its head
  plain = [nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs),  # stage layers
           nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, SPEC.num_classes, rngs=rngs)]  # head hidden, out
  ours = [stage.layers[0], stage.layers[1], head.hidden, head.out]
  for mine, flax_linear in zip(ours, plain):
    np.testing.assert_array_equal(np.asarray(mine.kernel[...]), np.asarray(flax_linear.kernel[...]))
    np.testing.assert_array_equal(np.asarray(mine.bias[...]), np.asarray(flax_linear.bias[...]))


def test_kernel_init_names():
  assert init_lib.INITS == ("default", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal",
                            "lecun_normal", "orthogonal")
  assert init_lib.kernel_init("default") is None
  assert init_lib.init_kwargs(None) == {}
  key = jax.random.key(0)
  for name in init_lib.INITS[1:]:
    assert init_lib.kernel_init(name)(key, (D, D)).shape == (D, D)
  with pytest.raises(ValueError, match="xavier_uniform"):
    init_lib.kernel_init("glorot_uniform")


@pytest.mark.parametrize("type,field,value", [
    ("mlp", "init", "glorot_uniform"),
    ("conv", "init", ""),
    ("lstm", "recurrent_init", "identity"),
])
def test_bad_init_name_is_rejected(type, field, value):
  with pytest.raises(ConfigError) as err:
    stages.stage_config(type, "s", **{field: value})
  assert err.value.field == f"stage[s].{field}"
  for name in init_lib.INITS:
    assert repr(name) in str(err.value)

  cfg = stages.stage_config(type, "s")
  cfg[field] = value  # a config edited after it was made is caught by validation too
  with pytest.raises(ConfigError) as err:
    stages.validate_stage_config(cfg, "chain.stages[3]")
  assert err.value.field == f"chain.stages[3].{field}"
  assert str(err.value).startswith(f"config.chain.stages[3].{field}:")
  assert "'he_normal'" in str(err.value)


def test_recurrent_init_is_an_lstm_field():
  with pytest.raises(ConfigError) as err:
    stages.stage_config("mlp", "s", recurrent_init="orthogonal")
  assert err.value.field == "stage[s].recurrent_init"
  assert stages.stage_config("lstm", "s").recurrent_init == "orthogonal"
  assert stages.stage_config("transformer", "s").init == "default"
