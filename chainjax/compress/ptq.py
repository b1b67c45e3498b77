"""Post-training quantization (PTQ) of a parameter tree: integer weights with scales, packed int4, bytes.

What: `quantize_params(params, bits)` replaces every kernel and embedding table of a parameter tree
(ndim >= 2; biases and norm scales stay float32) by a `QuantizedTensor`: integer values on the
symmetric restricted grid [-(2^(b-1)-1), 2^(b-1)-1] with one float32 scale per output channel
(`compress.quant.weight_scales`: max |w| / qmax; the last axis of a kernel, the row of an embedding),
so `w ~ values * scale`. 8-bit values are stored as int8; 4-bit (and any b <= 4) values are packed two
per byte (uint8, the first of each pair in the low nibble), which is what makes int4 weights take half
the bytes of int8. `dequantize_params` turns the tree back into float32 parameters of the original
shapes. The tree of `QuantizedTensor`s holds only arrays, so Orbax saves and restores it as it is.

Why: the deployed form of a chain. The QAT transform (`compress.quant`) trains with fake-quantized
weights on the same grid with the same per-channel scales (`axes_of(quant.weight_channel_axes(model))`
gives its channel axes per layer), so a kernel trained with a per-channel rule of the same width
quantizes here with no further rounding error.

`tree_bytes` and `stage_bytes` count the bytes of a parameter tree in float32, int8, int4 (scales
included) and sparse form (the float32 nonzeros plus a one-bit mask per weight), per chain stage.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chainjax import chain as chain_lib
from chainjax.compress import quant

PACKED_MAX_BITS = 4  # widths stored two per byte


def _is_weight(path, leaf) -> bool:
  """Kernels and embedding tables (ndim >= 2) are quantized; biases and norm scales are not."""
  del path
  return jnp.ndim(leaf) >= 2


def _names(path) -> list[str]:
  """A key path's names, without the `.value` an nnx.Variable adds at the end."""
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return names[:-1] if names and names[-1] == "value" and not isinstance(path[-1], jax.tree_util.DictKey) else names


def path_str(path) -> str:
  """A parameter's key path as "stages/s1/body/layers/0/kernel" (the keys `quant.weight_channel_axes` uses)."""
  return "/".join(_names(path))


def channel_axis(path) -> int:
  """The output-channel axis of a weight without a layer to ask (see `quant.weight_channel_axes`): the row of
  an embedding table, else the kernel's last axis."""
  names = _names(path)
  return 0 if names and names[-1] == "embedding" else -1


Axes = Callable[[tuple], "int | tuple[int, ...]"]


def axes_of(layer_axes: dict[str, tuple[int, ...]] | None = None) -> Axes:
  """`path -> output-channel axes`: from `quant.weight_channel_axes(model)` where the path is there, else
  `channel_axis`."""
  layer_axes = layer_axes or {}
  return lambda path: layer_axes.get(path_str(path), channel_axis(path))


class QuantizedTensor(NamedTuple):
  """A weight as integers and per-channel scales: `w ~ unpack(values) * scale`.

  `values`: int8 of the weight's shape (bits > 4), or uint8 of shape (ceil(size / 2),) holding two
  values per byte (bits <= 4, the weight flattened in C order). `scale`: float32, the weight's shape
  with 1 on every axis but the channel axis.
  """

  values: jax.Array
  scale: jax.Array


def pack_int4(q: jax.Array) -> jax.Array:
  """Signed values in [-8, 7] -> uint8 of ceil(size / 2) bytes, two per byte (first value in the low nibble)."""
  flat = q.reshape(-1).astype(jnp.int8)
  if flat.size % 2:
    flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.int8)])
  low, high = flat[0::2].astype(jnp.uint8) & 0xF, flat[1::2].astype(jnp.uint8) & 0xF
  return low | (high << 4)


def unpack_int4(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The inverse of `pack_int4`: int8 values of `shape`."""
  nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1).astype(jnp.int8)
  signed = jnp.where(nibbles > 7, nibbles - 16, nibbles).astype(jnp.int8)
  return signed[:math.prod(shape)].reshape(shape)


def quantize_tensor(w: jax.Array, bits: int, axis: int | tuple[int, ...] = -1, per_channel: bool = True
                    ) -> QuantizedTensor:
  """One weight -> `QuantizedTensor` (round to nearest, half to even, as the QAT forward pass)."""
  bits = quant.check_bits(bits, "bits")
  w = jnp.asarray(w, jnp.float32)
  scale = quant.weight_scales(w, bits, per_channel, axis)
  qmin, qmax = quant.int_range(bits, signed=True)
  q = jnp.clip(jnp.round(w / scale), qmin, qmax).astype(jnp.int8)
  return QuantizedTensor(pack_int4(q) if bits <= PACKED_MAX_BITS else q, scale.astype(jnp.float32))


def dequantize_tensor(t: QuantizedTensor, shape: tuple[int, ...], bits: int) -> jax.Array:
  """`QuantizedTensor` -> float32 weight of `shape`."""
  q = unpack_int4(t.values, shape) if bits <= PACKED_MAX_BITS else t.values
  return q.astype(jnp.float32) * t.scale


def _is_quantized(x) -> bool:
  return isinstance(x, QuantizedTensor)


def quantize_params(params: Any, bits: int, select: Callable[[tuple, Any], bool] = _is_weight,
                    per_channel: bool = True, axes: Axes = channel_axis) -> Any:
  """`params` with every leaf `select(path, leaf)` accepts (default: ndim >= 2) as a `QuantizedTensor`
  with scales per `axes(path)` (see `axes_of`); the other leaves unchanged."""
  return jax.tree.map_with_path(
      lambda path, w: quantize_tensor(w, bits, axes(path), per_channel) if select(path, w) else w, params)


def dequantize_params(qparams: Any, like: Any, bits: int) -> Any:
  """Float32 parameters from `quantize_params`' output; `like`: the original tree (arrays or shape structs)."""
  return jax.tree.map(lambda q, ref: dequantize_tensor(q, tuple(ref.shape), bits) if _is_quantized(q) else q,
                      qparams, like, is_leaf=_is_quantized)


def fake_quantize_params(params: Any, bits: int, select: Callable[[tuple, Any], bool] = _is_weight,
                         per_channel: bool = True, axes: Axes = channel_axis) -> Any:
  """`dequantize_params(quantize_params(params, bits))` in one pass: the float32 weights a PTQ model computes with."""
  return dequantize_params(quantize_params(params, bits, select, per_channel, axes), params, bits)


def abstract_quantized(params: Any, bits: int, select: Callable[[tuple, Any], bool] = _is_weight,
                       axes: Axes = channel_axis) -> Any:
  """Shapes and dtypes of `quantize_params(params, bits)` (for restoring a saved quantized tree)."""
  return jax.eval_shape(lambda p: quantize_params(p, bits, select, axes=axes), params)


# --------------------------------------------------------------------------------------------
# Bytes.
# --------------------------------------------------------------------------------------------

FORMS = ("float32", "int8", "int4", "sparse")


def leaf_bytes(path, w, axes: Axes = channel_axis) -> dict[str, int]:
  """Bytes of one parameter in each of `FORMS`; sparse: float32 nonzeros + one mask bit per weight.

  Biases and norm scales (ndim <= 1) stay float32 in every form. Quantized weights count their
  integer values and their float32 per-channel scales."""
  w = np.asarray(w)
  dense = 4 * w.size
  if not _is_weight(path, w):
    return dict(float32=dense, int8=dense, int4=dense, sparse=dense)
  channel_axes = axes(path)
  channels = math.prod(w.shape[a] for a in ((channel_axes,) if isinstance(channel_axes, int) else channel_axes))
  return dict(float32=dense, int8=w.size + 4 * channels, int4=-(-w.size // 2) + 4 * channels,
              sparse=4 * int(np.count_nonzero(w)) + -(-w.size // 8))


def stage_bytes(params: Any, axes: Axes = channel_axis) -> dict[str, dict[str, float]]:
  """Per chain stage (`params` holds the chain's `('stages', <name>, ...)` tree): `params` (count), `weights` (of them, the quantizable ones), their `zeros` and `sparsity`,
  and the bytes in each of `FORMS`."""
  out: dict[str, dict[str, float]] = {}
  for path, w in jax.tree.leaves_with_path(params):
    entry = out.setdefault(chain_lib.stage_of_path(path), dict(params=0, weights=0, zeros=0, **{f: 0 for f in FORMS}))
    w = np.asarray(w)
    entry["params"] += w.size
    for form, n in leaf_bytes(path, w, axes).items():
      entry[form] += n
    if _is_weight(path, w):
      entry["weights"] += w.size
      entry["zeros"] += w.size - int(np.count_nonzero(w))
  return {name: _with_sparsity(entry) for name, entry in out.items()}


def _with_sparsity(entry: dict) -> dict:
  entry["sparsity"] = entry["zeros"] / entry["weights"] if entry["weights"] else 0.0
  return entry


def total_bytes(per_stage: dict[str, dict[str, float]]) -> dict[str, float]:
  """The sum of `stage_bytes` over stages."""
  return _with_sparsity({k: sum(s[k] for s in per_stage.values()) for k in ("params", "weights", "zeros", *FORMS)})


__all__ = ["FORMS", "QuantizedTensor", "abstract_quantized", "axes_of", "channel_axis", "dequantize_params",
           "dequantize_tensor", "fake_quantize_params", "leaf_bytes", "pack_int4", "quantize_params",
           "path_str", "quantize_tensor", "stage_bytes", "total_bytes", "unpack_int4"]
