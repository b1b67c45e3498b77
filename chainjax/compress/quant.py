"""Quantization-aware training (QAT) for chains: fake quantization, observers, and model surgery.

What: `quantize(model, rules)` rewrites an unmodified chain (or any nnx.Module) in place so that the
kernels of the `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv` and `nnx.Embed` layers whose module path
matches a `Rule` are fake-quantized in the forward pass (round-to-nearest onto an integer grid, back to
float), and so are the inputs of the Linear/LinearGeneral/Conv layers. The LSTM stage's cell
(`nnx.OptimizedLSTMCell`) computes its gates with two `nnx.Linear` layers, `dense_i` (input kernel) and
`dense_h` (recurrent kernel), and `nnx.MultiHeadAttention` (the transformer stage) its query, key, value
and output projections with `nnx.LinearGeneral` layers, so all of these are covered by the same rule
mechanism. `attach_boundary_quantizers` adds a quantizer of each stage's output (chain-boundary QAT).

Why our own: QAT here is a research object (bits per stage, chain-boundary quantization, LSQ vs
EMA ranges), so the transform is small, explicit, and depends on nothing but jax and flax; Qwix and
AQT are peers to compare with, not dependencies.

Numerics:
  * grids: weights use the symmetric signed, restricted grid [-(2^(b-1)-1), 2^(b-1)-1] (zero point 0,
    as TFLite int8 weights); activations use that grid when `act_symmetric`, else the asymmetric
    unsigned grid [0, 2^b-1] with an integer zero point (the range is widened to contain 0, so 0 is
    exact). Rounding is round-half-to-even (`jnp.round`, as numpy).
  * gradients: a straight-through estimator with clipping: d x_hat / d x = 1 where x lies in the
    representable range [(qmin - z) s, (qmax - z) s] (bounds included) and 0 outside; the scale gets
    LSQ's gradient (round(q) - q inside, the clipped bound minus z outside, q = x / s + z).
  * weight scales: max |w| / qmax, per output channel (the last kernel axis of Dense and Conv; the
    trailing out_features axes of a LinearGeneral kernel [*batch, *in_features, *out_features], and its
    batch axes, which index separate kernels; the row, i.e. the token, of an Embed table) or per
    tensor, recomputed every forward pass with the gradient stopped (nothing clips, so every weight
    gets the identity gradient). An all-zero channel gets scale 1.
  * activation ranges: "ema": an observer of min/max, `decay * old + (1 - decay) * batch`, the first
    observed batch initializing it (an all-zero batch, e.g. an LSTM's zero initial state, is skipped:
    it carries no range); "lsq": a learned scale `s = base + delta`, where `base` is the
    first observed batch's range (max|x| / qmax, or (max - min) / (qmax - qmin) asymmetric, with the
    zero point fixed from that batch too) and `delta` is an `nnx.Param` starting at 0 whose gradient is
    LSQ's, scaled by 1 / sqrt(n * qmax) (n: elements of one example of the input). The split
    `base + delta` is what lets the first batch set the scale: chainjax's train step keeps only the
    gradients of `nnx.Param`s, never values written to them in the forward pass, while the `base`
    written to a `QuantStats` variable is carried back with the rest of the state.

Observer state lives in `QuantStats` variables (an `nnx.Variable`, not an `nnx.Param`): in
chainjax's `nnx.split(model, nnx.Param, ...)` it lands in `rest`, next to the BatchNorm statistics, is
returned by the train step and checkpointed. Observers update only in training. Stage modules call
their layers as `layer(x)`, without `train`, so a quantized layer reads the flag from the
`training(train)` context: the chain should enter `with quant.training(stage_train):` around each
stage's body and head call (outside it, observers never update). An observer that has seen nothing
yet (count 0) quantizes with the current batch's own range. Within `enabled(False)` every quantized layer
and activation quantizer is the identity and no observer updates: the float model with the same state
(chainjax trains float for the first `compress.qat.start_step` updates that way).

Parameter paths: a wrapped layer keeps its Variables under their original names, so every parameter
path of the original model is UNCHANGED (e.g. `('stages', 's1', 'body', 'layers', 0, 'kernel')`), and
float checkpoints restore into a quantized model's parameters. The wrapper only adds variables below
the layer: `<layer>/input_quant/{min,max,count}` (EMA) or `<layer>/input_quant/{base_scale,
zero_point,count}` (QuantStats) plus `<layer>/input_quant/scale_delta` (an `nnx.Param`, LSQ); a stage's
boundary quantizer adds the same under `stages/<stage name>/out_quant`. Every path keeps
`('stages', <stage name>)` as its first two elements.

Usage::

    model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
    quant.quantize(model, [quant.Rule(r"stages/s1/.*", weight_bits=4, act_bits=8)])
    with quant.training(True):
      out = model(x, train=True)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

MIN_BITS, MAX_BITS = 2, 8
ACT_RANGES = ("ema", "lsq")
_EPS = 1e-8  # the smallest learned (LSQ) scale


# --------------------------------------------------------------------------------------------
# Primitives.
# --------------------------------------------------------------------------------------------


def check_bits(bits, what: str = "bits") -> int:
  """`bits` as an int in [MIN_BITS, MAX_BITS]; raises ValueError otherwise."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{what} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
  return bits


def int_range(bits: int, signed: bool) -> tuple[int, int]:
  """(qmin, qmax) of the grid: signed restricted [-(2^(b-1)-1), 2^(b-1)-1], or unsigned [0, 2^b-1]."""
  check_bits(bits)
  if signed:
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `g` over the axes that broadcasting an array of `shape` to `g.shape` added or stretched."""
  lead = g.ndim - len(shape)
  g = g.sum(axis=tuple(range(lead))) if lead else g
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
  return (g.sum(axis=axes, keepdims=True) if axes else g).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, scale, zero_point, qmin, qmax):
  return _fake_quant_fwd(x, scale, zero_point, qmin, qmax)[0]


def _fake_quant_fwd(x, scale, zero_point, qmin, qmax):
  q = x / scale + zero_point
  r = jnp.clip(jnp.round(q), qmin, qmax)
  return (r - zero_point) * scale, (q, r, scale, zero_point)


def _fake_quant_bwd(qmin, qmax, res, g):
  q, r, scale, zero_point = res
  inside = (q >= qmin) & (q <= qmax)
  zeros = jnp.zeros_like(g)
  dx = jnp.where(inside, g, zeros)
  dscale = jnp.where(inside, r - q, r - zero_point) * g  # LSQ: d x_hat / d s
  dzero = jnp.where(inside, zeros, -scale * g)  # STE: the zero point cancels inside the range
  return dx, _sum_to(dscale, jnp.shape(scale)), _sum_to(dzero, jnp.shape(zero_point))


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, scale, zero_point=0, bits: int = 8, signed: bool = True) -> jax.Array:
  """`(clip(round(x / scale + zero_point), qmin, qmax) - zero_point) * scale`, computed in (at least)
  float32 and returned in x's dtype.

  `signed`: the symmetric restricted grid [-(2^(b-1)-1), 2^(b-1)-1] (use zero_point 0); else the
  unsigned grid [0, 2^b-1]. `scale` and `zero_point` broadcast against `x` (per-channel scales keep
  their reduced axes). Gradient: 1 for x inside the representable range (bounds included), 0 outside
  (straight-through with clipping); LSQ's gradient for `scale`; 0 inside and -scale outside for
  `zero_point`. jit-able; `bits` and `signed` are static.
  """
  qmin, qmax = int_range(bits, signed)
  dtype = jnp.promote_types(x.dtype, jnp.float32)  # the grid in at least float32, also for bfloat16 inputs
  scale = jnp.asarray(scale, dtype)
  zero_point = jnp.asarray(zero_point, dtype)
  return _fake_quant(x.astype(dtype), scale, zero_point, qmin, qmax).astype(x.dtype)


def weight_scales(w: jax.Array, bits: int, per_channel: bool, channel_axis: int | Sequence[int] = -1) -> jax.Array:
  """Max-abs scales of the symmetric grid: max|w| / qmax, 1 where max|w| is 0.

  `per_channel`: one scale per index of `channel_axis` (an axis, or several: one scale per index tuple),
  reduced over every other axis with the dims kept (shape [1, ..., C, ..., 1], so `w / scale`
  broadcasts); else one scale (shape []).
  """
  _, qmax = int_range(bits, signed=True)
  absw = jnp.abs(w)
  if per_channel:
    keep = {a % w.ndim for a in ((channel_axis,) if isinstance(channel_axis, int) else channel_axis)}
    amax = jnp.max(absw, axis=tuple(i for i in range(w.ndim) if i not in keep), keepdims=True)
  else:
    amax = jnp.max(absw)
  return jnp.where(amax > 0, amax / qmax, jnp.ones_like(amax))


def quantize_weight(w: jax.Array, bits: int, per_channel: bool, channel_axis: int | Sequence[int] = -1
                    ) -> jax.Array:
  """`w` fake-quantized on the symmetric grid with (gradient-stopped) max-abs scales."""
  scale = jax.lax.stop_gradient(weight_scales(w, bits, per_channel, channel_axis))
  return fake_quant(w, scale, 0, bits, signed=True)


def range_qparams(lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
  """(scale, zero_point) for values in [lo, hi]: max(|lo|, |hi|) / qmax with zero point 0 (symmetric),
  or (hi' - lo') / (qmax - qmin) with zero point round(qmin - lo' / scale) (asymmetric; [lo', hi'] is
  [lo, hi] widened to contain 0). A zero-width range gets scale 1."""
  qmin, qmax = int_range(bits, symmetric)
  if symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    return scale, jnp.zeros_like(scale)
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  width = hi - lo
  scale = jnp.where(width > 0, width / (qmax - qmin), 1.0)
  zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
  return scale, zero_point


def scale_gradient(x: jax.Array, factor) -> jax.Array:
  """`x` in the forward pass; its gradient multiplied by `factor` (LSQ's gradient scale)."""
  scaled = x * factor
  return scaled + jax.lax.stop_gradient(x - scaled)


# --------------------------------------------------------------------------------------------
# Activation quantizers and their state.
# --------------------------------------------------------------------------------------------


class QuantStats(nnx.Variable):
  """Observer state of an activation quantizer (ranges, counts). Not an `nnx.Param`: it is no optimizer's
  business, travels with the BatchNorm statistics in chainjax's `rest` state, and is checkpointed."""


_TRAINING: contextvars.ContextVar[bool] = contextvars.ContextVar("chainjax_quant_training", default=False)


@contextlib.contextmanager
def training(train: bool = True) -> Iterator[None]:
  """Within it, the input quantizers of quantized layers update their observers iff `train`.

  Layers are called by their stages as `layer(x)`, so this flag stands in for the stage's `train`
  argument; it is read at trace time (it works inside `jax.jit`, `nnx.scan`, ...). Outside any
  `training` context the flag is False.
  """
  token = _TRAINING.set(bool(train))
  try:
    yield
  finally:
    _TRAINING.reset(token)


def is_training() -> bool:
  """The flag of the innermost `training` context (False outside one)."""
  return _TRAINING.get()


_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("chainjax_quant_enabled", default=True)


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
  """Within `enabled(False)`, quantized layers compute with their float weights and inputs, activation
  quantizers are the identity, and no observer updates: the float model, with the same variables.

  Why: a run that trains float before QAT starts (`compress.qat.start_step`) keeps one state layout (the
  observers exist from the first update, so checkpoints and resumption do not change) and compiles a
  float and a quantized train step from the same model. Read at trace time, like `training`; outside
  any `enabled` context quantization is on.
  """
  token = _ENABLED.set(bool(flag))
  try:
    yield
  finally:
    _ENABLED.reset(token)


def is_enabled() -> bool:
  """The flag of the innermost `enabled` context (True outside one)."""
  return _ENABLED.get()


class ActQuantizer(nnx.Module):
  """Fake-quantizes an activation tensor with an observed ("ema") or learned ("lsq") range.

  Call `quantizer(x, train=...)`; `train` (default: the `training` context's flag) updates the
  observer. Non-float inputs (e.g. tokens) pass through unchanged, and so does everything within
  `enabled(False)` (the observer does not update then).
  """

  def __init__(self, bits: int, *, symmetric: bool = False, act_range: str = "ema", decay: float = 0.99):
    check_bits(bits, "act_bits")
    if act_range not in ACT_RANGES:
      raise ValueError(f"act_range must be one of {ACT_RANGES}, got {act_range!r}")
    if not 0.0 <= decay < 1.0:
      raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    self.bits, self.symmetric, self.act_range, self.decay = bits, bool(symmetric), act_range, float(decay)
    # Observed (not all-zero) batches; inside an LSTM's scan, one per time step.
    self.count = QuantStats(jnp.zeros((), jnp.int32))
    if act_range == "ema":
      self.min = QuantStats(jnp.zeros((), jnp.float32))
      self.max = QuantStats(jnp.zeros((), jnp.float32))
    else:
      self.base_scale = QuantStats(jnp.ones((), jnp.float32))
      self.zero_point = QuantStats(jnp.zeros((), jnp.float32))
      self.scale_delta = nnx.Param(jnp.zeros((), jnp.float32))

  def qparams(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """(scale, zero_point) for `x`, updating the observer first when `train`.

    An all-zero `x` (e.g. an LSTM's zero initial state) carries no range: it is not counted and
    neither initializes nor moves the observer.
    """
    xs = jax.lax.stop_gradient(x).astype(jnp.float32)
    lo, hi = jnp.min(xs), jnp.max(xs)
    informative = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) > 0
    seen = self.count[...] > 0
    if train:
      self.count[...] = self.count[...] + informative.astype(jnp.int32)
    if self.act_range == "ema":
      if train:
        d = self.decay
        self.min[...] = jnp.where(informative, jnp.where(seen, d * self.min[...] + (1.0 - d) * lo, lo), self.min[...])
        self.max[...] = jnp.where(informative, jnp.where(seen, d * self.max[...] + (1.0 - d) * hi, hi), self.max[...])
        lo, hi = self.min[...], self.max[...]
      else:
        lo, hi = jnp.where(seen, self.min[...], lo), jnp.where(seen, self.max[...], hi)
      return range_qparams(lo, hi, self.bits, self.symmetric)
    scale0, zero0 = range_qparams(lo, hi, self.bits, self.symmetric)
    base = jnp.where(seen, self.base_scale[...], scale0)
    zero_point = jnp.where(seen, self.zero_point[...], zero0)
    if train:
      self.base_scale[...], self.zero_point[...] = base, zero_point
    _, qmax = int_range(self.bits, self.symmetric)
    n = math.prod(x.shape[1:]) if x.ndim > 1 else x.size  # elements of one example
    delta = scale_gradient(self.scale_delta[...].astype(jnp.float32), 1.0 / math.sqrt(max(n, 1) * qmax))
    return jnp.maximum(base + delta, _EPS), zero_point

  def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
    if not is_enabled() or not jnp.issubdtype(x.dtype, jnp.inexact):
      return x
    scale, zero_point = self.qparams(x, is_training() if train is None else train)
    return fake_quant(x, scale, zero_point, self.bits, signed=self.symmetric)


class BoundaryQuantizer(ActQuantizer):
  """An `ActQuantizer` for a stage's output, the activation passed down the chain.

  Integration: one per stage, as an attribute of the stage's `Link` (see `attach_boundary_quantizers`),
  so its paths start with `('stages', <name>)` and its LSQ parameter goes to that stage's optimizer;
  `Chain.__call__` applies `h = link.out_quant(h)` after the body, before the head and the next stage,
  within the stage's `training` context (`chain.build_chain` attaches them for
  `compress.qat.boundary_bits`).
  """


def attach_boundary_quantizers(chain: nnx.Module, bits: int, *, symmetric: bool = False, act_range: str = "ema",
                               decay: float = 0.99, stages: Sequence[str] | None = None,
                               attribute: str = "out_quant") -> dict[str, BoundaryQuantizer]:
  """Sets `chain.stages[name].<attribute> = BoundaryQuantizer(...)` for each of `stages` (default: all).

  Only attaches them: the chain's forward pass must call them (see `BoundaryQuantizer`).
  """
  names = tuple(chain.stages.keys()) if stages is None else tuple(stages)
  out = {}
  for name in names:
    if name not in chain.stages:
      raise ValueError(f"boundary quantizer for unknown stage {name!r}; stages: {', '.join(chain.stages.keys())}")
    out[name] = BoundaryQuantizer(bits, symmetric=symmetric, act_range=act_range, decay=decay)
    setattr(chain.stages[name], attribute, out[name])
  return out


# Where `quantize` and `attach_boundary_quantizers` put activation quantizers: their variables (observer
# state, LSQ scales) are the ones a float model lacks.
QUANTIZER_ATTRIBUTES = ("input_quant", "out_quant")


def is_quantizer_path(path: tuple) -> bool:
  """Whether a variable path (plain keys, or a jax key path) lies inside an activation quantizer."""
  return any(str(getattr(key, "key", getattr(key, "name", key))) in QUANTIZER_ATTRIBUTES for key in path)


# --------------------------------------------------------------------------------------------
# Rules and model surgery.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """How to quantize the layers whose module path (e.g. "stages/s1/body/layers/0") fully matches `pattern`.

  `weight_bits` / `act_bits`: bits of the kernel / of the layer's input, in 2..8, or None for float.
  `per_channel`: one weight scale per output channel (else per tensor). `act_symmetric`: the signed
  symmetric grid for inputs (else asymmetric unsigned). `act_range`: "ema" (observed) or "lsq" (learned).
  """

  pattern: str
  weight_bits: int | None = 8
  act_bits: int | None = 8
  per_channel: bool = True
  act_symmetric: bool = False
  act_range: str = "ema"

  def __post_init__(self):
    if self.weight_bits is not None:
      check_bits(self.weight_bits, f"weight_bits of rule {self.pattern!r}")
    if self.act_bits is not None:
      check_bits(self.act_bits, f"act_bits of rule {self.pattern!r}")
    if self.act_range not in ACT_RANGES:
      raise ValueError(f"act_range of rule {self.pattern!r} must be one of {ACT_RANGES}, got {self.act_range!r}")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"rule pattern {self.pattern!r} is not a regex: {e}") from None

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None

  @property
  def is_float(self) -> bool:
    return self.weight_bits is None and self.act_bits is None

  _KEYS = {"w": "weight_bits", "a": "act_bits", "weight_bits": "weight_bits", "act_bits": "act_bits",
           "per_channel": "per_channel", "act_symmetric": "act_symmetric", "act_range": "act_range"}

  @classmethod
  def parse(cls, text: str) -> "Rule":
    """A rule from a config string: the pattern, then `key=value` fields separated by whitespace, e.g.
    `"stages/s1/.* w=4 a=8 per_channel=true act_symmetric=false act_range=lsq"` (`w`/`a` abbreviate
    weight_bits/act_bits; bits "none" or "float" mean float). Omitted fields take `Rule`'s defaults."""
    pattern, *fields = text.split()
    kwargs = {}
    for field in fields:
      key, sep, value = field.partition("=")
      if not sep or key not in cls._KEYS:
        raise ValueError(f"rule {text!r}: bad field {field!r}; fields: {', '.join(sorted(cls._KEYS))} as key=value")
      name = cls._KEYS[key]
      if name in ("weight_bits", "act_bits"):
        kwargs[name] = None if value.lower() in ("none", "float") else _parse_int(value, text)
      elif name in ("per_channel", "act_symmetric"):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(f"rule {text!r}: {key} must be true or false, got {value!r}")
        kwargs[name] = value.lower() in ("true", "1")
      else:
        kwargs[name] = value
    return cls(pattern, **kwargs)


def _parse_int(value: str, text: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"rule {text!r}: bits must be an int or none, got {value!r}") from None


# The layer types `quantize` wraps, with the name of their weight and its output-channel axes (None: the
# layer's own, see `_weight_of`).
_WEIGHTS = {nnx.Linear: ("kernel", (-1,)), nnx.LinearGeneral: ("kernel", None), nnx.Conv: ("kernel", (-1,)),
            nnx.Embed: ("embedding", (0,))}


def _weight_of(layer: nnx.Module) -> tuple[str, tuple[int, ...]]:
  """(name of the layer's weight, its output-channel axes): per-channel scales keep those axes."""
  name, axes = _WEIGHTS[type(layer)]
  if axes is None:  # LinearGeneral: kernel [*batch, *in_features, *out_features]; a batch index is its own kernel
    n_batch, n_out = len(layer.batch_axis), len(layer.out_features)
    ndim = n_batch + len(layer.in_features) + n_out
    axes = tuple(range(n_batch)) + tuple(range(ndim - n_out, ndim))
  return name, axes


class QuantizedLayer(nnx.Module):
  """A Linear, LinearGeneral, Conv or Embed layer whose weight (and, but for Embed, input) is fake-quantized.

  Holds the original layer's Variables under their original attribute names (so `q.kernel` is the
  original `nnx.Param` and parameter paths are unchanged) and the layer's graph definition; each call
  rebuilds the original layer with the fake-quantized weight and calls it with the caller's arguments,
  so the computation is exactly the original layer's (with the float weight and input within
  `enabled(False)`).
  """

  def __init__(self, layer: nnx.Module, *, weight_bits: int | None, per_channel: bool = True,
               input_quant: ActQuantizer | None = None):
    if type(layer) not in _WEIGHTS:
      raise TypeError(f"can only quantize {', '.join(t.__name__ for t in _WEIGHTS)}, got {type(layer).__name__}")
    self.layer_def, state = nnx.split(layer)  # a static attribute: the original layer without its arrays
    self.layer_type = type(layer).__name__
    self.weight_name, self.channel_axis = _weight_of(layer)
    self.var_names = tuple(name for name, _ in nnx.iter_children(layer))
    if set(self.var_names) != set(state.keys()) or self.weight_name not in self.var_names:
      raise TypeError(f"{self.layer_type} has unexpected children {self.var_names}")
    for name, child in nnx.iter_children(layer):
      setattr(self, name, child)  # the same Variable objects: the original paths, and shared with `layer`
    self.weight_bits = None if weight_bits is None else check_bits(weight_bits, "weight_bits")
    self.per_channel = bool(per_channel)
    self.input_quant = input_quant

  def quantized_weight(self) -> jax.Array:
    w = getattr(self, self.weight_name)[...]
    if self.weight_bits is None or not is_enabled():
      return w
    return quantize_weight(w, self.weight_bits, self.per_channel, self.channel_axis)

  def __call__(self, x, *args, **kwargs):
    if self.input_quant is not None:
      x = self.input_quant(x)
    arrays = {name: getattr(self, name)[...] for name in self.var_names}
    arrays[self.weight_name] = self.quantized_weight()
    return nnx.merge(self.layer_def, nnx.State(arrays))(x, *args, **kwargs)


def path_str(path: tuple) -> str:
  """A module path as rules match it: its keys joined by "/" (e.g. "stages/s1/body/layers/0")."""
  return "/".join(str(getattr(key, "key", key)) for key in path)


def _child(node, key):
  return node[key] if isinstance(node, (nnx.List, nnx.Dict, list, dict)) else getattr(node, key)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = _child(parent, key)
  key = path[-1]
  if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
    parent[key] = new
  else:
    setattr(parent, key, new)


def candidate_layers(model: nnx.Module) -> dict[str, nnx.Module]:
  """The layers `quantize` can wrap (Linear, LinearGeneral, Conv, Embed; exact types), by module path string."""
  return {path_str(path): m for path, m in nnx.iter_modules(model) if type(m) in _WEIGHTS}


def quantize(model: nnx.Module, rules: Sequence[Rule]) -> nnx.Module:
  """Wraps, IN PLACE, every Linear/LinearGeneral/Conv/Embed layer of `model` whose path a rule matches; returns
  `model`.

  The first rule whose `pattern` fully matches a layer's path (`path_str`) decides for it; a layer no
  rule matches, and a layer whose rule has weight_bits=None and act_bits=None, is left as it is (so
  no rules, or only float rules, leave the forward pass bit-identical). An Embed layer quantizes its
  table only (per row with `per_channel`): its inputs are tokens. A rule that matches no layer at all
  raises ValueError naming its pattern. Parameter paths are unchanged (see `QuantizedLayer`); a layer
  shared by several parents is wrapped at its first path only.
  """
  rules = tuple(rules)
  for rule in rules:
    if not isinstance(rule, Rule):
      raise TypeError(f"rules must be quant.Rule, got {rule!r}")
  layers = candidate_layers(model)
  used = [False] * len(rules)
  plan = []
  for name, layer in layers.items():
    for i, rule in enumerate(rules):
      if rule.matches(name):
        used[i] = True
        act_bits = None if isinstance(layer, nnx.Embed) else rule.act_bits
        if rule.weight_bits is not None or act_bits is not None:
          plan.append((name, layer, rule, act_bits))
        break
  for rule, hit in zip(rules, used):
    if not hit:
      raise ValueError(f"quantization rule pattern {rule.pattern!r} matches no Linear/LinearGeneral/Conv/Embed layer; "
                       f"the layers are: {', '.join(layers) or '(none)'}")
  paths = {path_str(path): path for path, _ in nnx.iter_modules(model)}
  for name, layer, rule, act_bits in plan:
    input_quant = None if act_bits is None else ActQuantizer(act_bits, symmetric=rule.act_symmetric,
                                                              act_range=rule.act_range)
    _replace(model, paths[name], QuantizedLayer(layer, weight_bits=rule.weight_bits, per_channel=rule.per_channel,
                                                input_quant=input_quant))
  return model


def weight_channel_axes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """The output-channel axes of every weight `quantize` handles, wrapped or not, by parameter path string
  ("<layer path>/<weight name>", e.g. "stages/s1/body/layers/0/kernel"): what a per-channel scale keeps.
  Post-training quantization (`compress.ptq`) takes its axes from here, so it uses QAT's grid."""
  out = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, QuantizedLayer):
      name, axes = module.weight_name, module.channel_axis
    elif type(module) in _WEIGHTS:
      name, axes = _weight_of(module)
    else:
      continue
    out[f"{path_str(path)}/{name}"] = tuple(axes)
  return out


def quantized_layers(model: nnx.Module) -> dict[str, QuantizedLayer]:
  """The `QuantizedLayer`s of `model`, by module path string."""
  return {path_str(path): m for path, m in nnx.iter_modules(model) if isinstance(m, QuantizedLayer)}


__all__ = [
    "ActQuantizer", "BoundaryQuantizer", "QUANTIZER_ATTRIBUTES", "QuantStats", "QuantizedLayer", "Rule",
    "attach_boundary_quantizers", "candidate_layers", "check_bits", "enabled", "fake_quant", "int_range",
    "is_enabled", "is_quantizer_path", "is_training", "path_str", "quantize", "quantize_weight", "quantized_layers",
    "range_qparams", "scale_gradient", "training", "weight_scales",
]
