"""Post-training quantization (`chainjax.compress.ptq`) and one-shot pruning (`prune.prune_once`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chainjax.compress import prune
from chainjax.compress import ptq
from chainjax.compress import quant


def test_int4_pack_and_unpack_round_trip_every_value_and_odd_sizes():
  q = jnp.asarray(np.arange(-7, 8).tolist() * 3, jnp.int8)[:43].reshape(43, 1)  # odd size: one padded nibble
  packed = ptq.pack_int4(q)
  assert packed.dtype == jnp.uint8 and packed.shape == (22,)
  np.testing.assert_array_equal(ptq.unpack_int4(packed, q.shape), q)
  # The first value of a pair in the low nibble: [1, -2] -> 0b1110_0001.
  assert int(ptq.pack_int4(jnp.asarray([1, -2], jnp.int8))[0]) == 0xE1


@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
def test_integers_times_scales_equal_the_qat_forward_pass(bits):
  """PTQ's grid is QAT's: dequantized integers equal `quant.quantize_weight` exactly, per output channel."""
  w = jax.random.normal(jax.random.key(bits), (9, 5)) * jnp.arange(1, 6)
  t = ptq.quantize_tensor(w, bits)
  assert t.scale.shape == (1, 5)
  np.testing.assert_allclose(t.scale[0], jnp.abs(w).max(axis=0) / (2 ** (bits - 1) - 1), rtol=1e-6)
  if bits > 4:
    assert t.values.dtype == jnp.int8 and t.values.shape == w.shape
    assert int(jnp.abs(t.values).max()) == 2 ** (bits - 1) - 1  # each channel's max-abs weight hits the grid's end
  else:
    assert t.values.dtype == jnp.uint8 and t.values.size == (w.size + 1) // 2
  np.testing.assert_array_equal(ptq.dequantize_tensor(t, w.shape, bits), quant.quantize_weight(w, bits, True))


def test_embedding_tables_get_one_scale_per_row_and_biases_stay_float():
  params = {"embed": {"embedding": jnp.arange(12.0).reshape(4, 3) - 5},
            "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.arange(2.0)}}
  q = ptq.quantize_params(params, 8)
  assert q["embed"]["embedding"].scale.shape == (4, 1)
  assert q["dense"]["kernel"].scale.shape == (1, 2)
  assert q["dense"]["bias"] is params["dense"]["bias"]
  back = ptq.dequantize_params(q, params, 8)
  np.testing.assert_allclose(back["embed"]["embedding"], params["embed"]["embedding"], atol=7 / 127 / 2 + 1e-6)
  np.testing.assert_array_equal(back["dense"]["kernel"], params["dense"]["kernel"])


def test_bytes_per_form_are_counted_with_scales():
  params = {"stages": {"a": {"kernel": jnp.asarray([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]), "bias": jnp.zeros(3)},
                       "b": {"kernel": jnp.ones((5, 2))}}}
  sizes = ptq.stage_bytes(params)
  # a: kernel 6 weights + bias 3: float32 36; int8 6 + 3 scales * 4 + bias 12 = 30; int4 3 + 12 + 12 = 27;
  # sparse: 3 nonzeros * 4 + 1 mask byte + bias 12 = 25.
  assert {k: sizes["a"][k] for k in ("params", "float32", "int8", "int4", "sparse")} == dict(
      params=9, float32=36, int8=30, int4=27, sparse=25)
  assert sizes["a"]["sparsity"] == pytest.approx(0.5)
  assert sizes["b"]["int4"] == 5 + 8 and sizes["b"]["sparsity"] == 0.0
  total = ptq.total_bytes(sizes)
  assert total["float32"] == 36 + 40 and total["sparsity"] == pytest.approx(3 / 16)


def test_default_chain_meets_the_byte_targets():
  """int8 <= 0.27x and int4 <= 0.15x of float32, scales and float biases included (issue targets)."""
  import helpers
  from chainjax import experiment

  exp = experiment.Experiment(helpers.load_config("default"))
  total = ptq.total_bytes(ptq.stage_bytes(jax.tree.map(lambda x: np.ones(x.shape, x.dtype), exp.abstract_state().params)))
  assert total["int8"] / total["float32"] <= 0.27, total
  assert total["int4"] / total["float32"] <= 0.15, total


def test_quantized_tree_survives_an_orbax_round_trip(tmp_path):
  from chainjax import checkpoint

  params = {"stages": {"s": {"kernel": jax.random.normal(jax.random.key(0), (7, 3)), "bias": jnp.ones(3)}}}
  q = ptq.quantize_params(params, 4)
  writer = checkpoint.Checkpointer(tmp_path / "int4")
  writer.save(3, q, {"bits": 4})
  writer.close()
  reader = checkpoint.Checkpointer(tmp_path / "int4", read_only=True)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), q)
  step, back, meta = reader.restore_latest(abstract)
  reader.close()
  assert step == 3 and meta == {"bits": 4}
  jax.tree.map(np.testing.assert_array_equal, back, q)
  assert back["stages"]["s"]["kernel"].values.dtype == jnp.uint8


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9])
def test_prune_once_zeroes_exactly_the_smallest_fraction_of_each_selected_leaf(sparsity):
  w = jax.random.permutation(jax.random.key(1), jnp.arange(1.0, 41.0)).reshape(8, 5) * jnp.where(
      jnp.arange(40).reshape(8, 5) % 2 == 0, 1, -1)
  params = {"kernel": w, "bias": jnp.arange(5.0) + 1}
  out = prune.prune_once(params, sparsity)
  zeros = int(jnp.sum(out["kernel"] == 0))
  assert zeros == round(sparsity * 40)
  kept = jnp.abs(out["kernel"][out["kernel"] != 0])
  assert zeros == 0 or float(kept.min()) == zeros + 1  # |w| = 1..40: the `zeros` smallest went
  np.testing.assert_array_equal(out["bias"], params["bias"])
  with pytest.raises(ValueError, match="sparsity"):
    prune.prune_once(params, 1.5)


def test_the_config_checks_the_widths_quant_supports():
  from chainjax import config
  assert (config.MIN_BITS, config.MAX_BITS) == (quant.MIN_BITS, quant.MAX_BITS)


def test_ptq_uses_the_qat_grid_of_every_layer_kind_including_attention():
  """With the axes of `quant.weight_channel_axes`, a PTQ weight equals the QAT forward pass's weight for
  Linear, Embed and the attention projections (LinearGeneral: one scale per head and feature)."""
  import helpers
  from flax import nnx
  from chainjax import chain as chain_lib
  from chainjax.data import text

  config = helpers.load_config("text_transformer", "runlocal", **{
      "data.train_size": 256, "compress.qat.rules": (".* w=4 a=8",)})
  model = chain_lib.build_chain(config, text.text_task(config, None), rngs=nnx.Rngs(0))
  axes = ptq.axes_of(quant.weight_channel_axes(model))
  params = nnx.state(model, nnx.Param)
  fake = dict(nnx.to_flat_state(ptq.fake_quantize_params(params, 4, axes=axes)))
  layers = quant.quantized_layers(model)
  kinds = set()
  for name, layer in layers.items():
    path = tuple(int(k) if k.isdigit() else k for k in name.split("/")) + (layer.weight_name,)
    np.testing.assert_array_equal(fake[path][...], layer.quantized_weight(), err_msg=name)
    kinds.add(layer.layer_type)
  assert kinds == {"Embed", "Linear", "LinearGeneral"}, kinds
  query = layers["stages/encoder/body/blocks/0/attn/query"]
  assert ptq.quantize_tensor(query.kernel[...], 8, axes(("stages", "encoder", "body", "blocks", 0, "attn", "query",
                                                            "kernel"))).scale.shape == (1,) + query.kernel.shape[1:]
