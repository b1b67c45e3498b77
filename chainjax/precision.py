"""Mixed precision: a dtype policy and loss scaling as an optax wrapper.

Why in-house rather than jmp: jmp is no longer developed, and its
`DynamicLossScale` drops a custom minimum scale whenever it crosses `jit` (the
value is not part of its pytree, so it comes back as the default 1.0). Here
every number the loss scale needs at run time lives in the optimizer state as
an array: it survives `jit`, sharding and an Orbax checkpoint round trip like
any other state.

Two independent pieces:

* `Policy` (from `get_policy("params=float32,compute=bfloat16,output=float32")`):
  parameters are stored in `param_dtype`; the train step casts params and inputs
  to `compute_dtype` inside the loss function and the loss/outputs to
  `output_dtype`. Only floating leaves are cast (token ids stay integers).
* Loss scaling (from `build_loss_scale("dynamic", inner)`): the train step
  multiplies the loss by `current_loss_scale(opt_state)` before
  differentiating; the wrapper divides the gradients by the same scale (in
  float32) and, for `dynamic`, skips a step whose gradients are not finite:
  zero updates, inner state kept, scale divided by `factor` (not below
  `min_scale`), `skipped_steps` + 1. After `period` finite steps in a row the
  scale is multiplied by `factor`.

Keeping params bit-identical on a skipped step: the wrapper's updates on such a
step are -0.0, and `p + (-0.0) == p` bit for bit for every IEEE float `p`
(-0.0, inf and NaN included), so `optax.apply_updates` already keeps params when
the wrapper is the outermost transformation (verified on CPU; a later
`scale(-lr)` would turn -0.0 into +0.0, and `-0.0 + 0.0 == +0.0`). The train
step should still select explicitly, which holds on every backend (also one
that flushes denormals) and for any wrapping order:

    finite = precision.is_finite_step(opt_state, new_opt_state)
    params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_params, params)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# --------------------------------------------------------------------------------------------
# Dtype policy.
# --------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": np.dtype(jnp.float32), "f32": np.dtype(jnp.float32),
    "bfloat16": np.dtype(jnp.bfloat16), "bf16": np.dtype(jnp.bfloat16),
    "float16": np.dtype(jnp.float16), "f16": np.dtype(jnp.float16),
}
_KEYS = ("params", "compute", "output")
_ALLOWED_DTYPES = ", ".join(_DTYPES)


def _is_floating(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree, dtype):
  """Casts the floating-point leaves of `tree` to `dtype`; every other leaf is returned as is."""
  dtype = np.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dtype) if _is_floating(x) and x.dtype != dtype else x, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Which dtype parameters are stored in, computed in, and returned in.

  Example:
    >>> policy = get_policy("params=float32,compute=bfloat16,output=float32")
    >>> policy.cast_to_compute({"w": jnp.ones(2), "ids": jnp.arange(2)})["w"].dtype
    dtype(bfloat16)
  """

  param_dtype: np.dtype
  compute_dtype: np.dtype
  output_dtype: np.dtype

  def cast_to_compute(self, tree):
    """Floating leaves to `compute_dtype` (params and inputs, inside the loss function)."""
    return cast_floating(tree, self.compute_dtype)

  def cast_to_output(self, tree):
    """Floating leaves to `output_dtype` (the loss, logits, metrics)."""
    return cast_floating(tree, self.output_dtype)


def _parse_dtype(name: str, where: str) -> np.dtype:
  dtype = _DTYPES.get(name.strip().lower())
  if dtype is None:
    raise ValueError(f"precision policy: unknown dtype {name.strip()!r} in {where!r}; allowed: {_ALLOWED_DTYPES}")
  return dtype


def get_policy(spec: str | Policy) -> Policy:
  """Parses a jmp-style policy string; missing keys default to float32.

  Forms: `"params=float32,compute=bfloat16,output=float32"` (keys `params`,
  `compute`, `output`; dtypes float32/bfloat16/float16 or f32/bf16/f16), or a
  single dtype such as `"bf16"` for all three.

  Example:
    >>> get_policy("compute=f16").compute_dtype
    dtype('float16')
  """
  if isinstance(spec, Policy):
    return spec
  text = spec.strip()
  form = "'params=<dtype>,compute=<dtype>,output=<dtype>' or a single '<dtype>'"
  if not text:
    raise ValueError(f"precision policy: empty string; expected {form} (dtypes: {_ALLOWED_DTYPES})")
  if "=" not in text:
    dtype = _parse_dtype(text, spec)
    return Policy(dtype, dtype, dtype)
  chosen: dict[str, np.dtype] = {}
  for part in text.split(","):
    key, eq, value = part.partition("=")
    key = key.strip().lower()
    if not eq or key not in _KEYS:
      raise ValueError(f"precision policy: bad entry {part.strip()!r} in {spec!r}; expected {form} with keys "
                       f"{', '.join(_KEYS)}")
    if key in chosen:
      raise ValueError(f"precision policy: key {key!r} given twice in {spec!r}")
    chosen[key] = _parse_dtype(value, spec)
  f32 = np.dtype(jnp.float32)
  return Policy(chosen.get("params", f32), chosen.get("compute", f32), chosen.get("output", f32))


# --------------------------------------------------------------------------------------------
# Loss scaling.
# --------------------------------------------------------------------------------------------


class LossScaleState(NamedTuple):
  """Loss-scale wrapper state; every field is an array, so all of it survives jit and checkpoints."""

  scale: jax.Array  # float32 []: the train step multiplies the loss by it
  good_steps: jax.Array  # int32 []: finite steps since the scale last changed
  skipped_steps: jax.Array  # int32 []: non-finite steps skipped so far (cumulative)
  min_scale: jax.Array  # float32 []: the scale never drops below it
  inner_state: Any  # the wrapped optimizer's state


def _make_state(scale: float, min_scale: float, inner_state) -> LossScaleState:
  return LossScaleState(
      scale=jnp.asarray(scale, jnp.float32),
      good_steps=jnp.zeros((), jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32),
      min_scale=jnp.asarray(min_scale, jnp.float32),
      inner_state=inner_state,
  )


def _unscale(grads, scale: jax.Array):
  """grads / scale, computed in float32 and returned in each leaf's dtype."""
  return jax.tree.map(
      lambda g: (g.astype(jnp.float32) / scale).astype(g.dtype) if _is_floating(g) else g, grads)


def all_finite(tree) -> jax.Array:
  """A scalar bool: every floating element of `tree` is finite (True for a tree without any)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_floating(x)]
  return jnp.stack(flags).all() if flags else jnp.asarray(True)


def _check_positive(name: str, value: float) -> float:
  value = float(value)
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f"loss scale: {name} must be a finite number > 0, got {value}")
  return value


def static_options(scale: float) -> dict[str, float]:
  """The checked options of `static_loss_scale`; raises ValueError. `parse_loss_scale` (and so
  `config.validate`) runs the same check, so a config string that validates always builds."""
  return {"scale": _check_positive("scale", scale)}


def dynamic_options(initial_scale: float = 2.0**15, period: int = 2000, factor: float = 2.0,
                    min_scale: float = 1.0) -> dict[str, float]:
  """The checked options of `dynamic_loss_scale` (defaults filled in); raises ValueError.

  The one place the options are judged: `dynamic_loss_scale` and `parse_loss_scale` (and so
  `config.validate`) both call it.
  """
  initial_scale = _check_positive("initial_scale", initial_scale)
  min_scale = _check_positive("min_scale", min_scale)
  factor = float(factor)
  if not np.isfinite(factor) or factor <= 1:
    raise ValueError(f"loss scale: factor must be a finite number > 1, got {factor}")
  if isinstance(period, bool) or not np.isfinite(period) or int(period) != period or period < 1:
    raise ValueError(f"loss scale: period must be an integer >= 1, got {period}")
  if initial_scale < min_scale:
    raise ValueError(f"loss scale: initial_scale ({initial_scale}) is below min_scale ({min_scale})")
  return {"initial_scale": initial_scale, "period": int(period), "factor": factor, "min_scale": min_scale}


def static_loss_scale(inner: optax.GradientTransformation, scale: float) -> optax.GradientTransformationExtraArgs:
  """Divides the (scaled) gradients by a fixed `scale`, then runs `inner`.

  No step is skipped: a non-finite gradient reaches `inner` (and the train
  step's fail-fast check), as without scaling. With a power of two the
  unscaling is exact.

  Example:
    >>> tx = static_loss_scale(optax.sgd(0.1), 128.0)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> current_loss_scale(state)  # the train step multiplies its loss by this
    Array(128., dtype=float32)
  """
  scale = static_options(scale)["scale"]
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return _make_state(scale, scale, inner.init(params))

  def update(updates, state, params=None, **extra_args):
    grads = _unscale(updates, state.scale)
    new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    return new_updates, state._replace(inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    initial_scale: float = 2.0**15,
    period: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Unscales the gradients, skips non-finite steps and adapts the scale (wrap the whole optimizer).

  Finite step: `inner` runs on grads / scale; after `period` finite steps in a
  row the scale is multiplied by `factor` (unless that overflows float32).
  Non-finite step: the updates are -0.0 (params stay bit-identical under
  `optax.apply_updates`), `inner_state` is kept (its step count and schedules
  do not advance), the scale is divided by `factor` but not below `min_scale`,
  `good_steps` resets and `skipped_steps` grows by one.

  `min_scale` is stored in the state when `init` runs; from then on the state's
  value governs (a restored checkpoint keeps its own), as for the scale itself.

  Example:
    >>> tx = dynamic_loss_scale(optax.adam(1e-3), initial_scale=2.0**15, min_scale=4.0)
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([1.0, jnp.inf, 0.0])}  # an fp16 overflow, already scaled
    >>> updates, state = tx.update(grads, state, params)
    >>> current_loss_scale(state), skipped_steps(state)
    (Array(16384., dtype=float32), Array(1, dtype=int32))
  """
  options = dynamic_options(initial_scale, period, factor, min_scale)
  initial_scale, period, factor, min_scale = (options[k] for k in ("initial_scale", "period", "factor", "min_scale"))
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return _make_state(initial_scale, min_scale, inner.init(params))

  def update(updates, state, params=None, **extra_args):
    grads = _unscale(updates, state.scale)
    finite = all_finite(grads)
    # The inner optimizer sees zeros on a skipped step, so no NaN/inf flows through it (its
    # result is discarded anyway); the selects below keep the step jit-able without lax.cond.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    inner_updates, inner_state = inner.update(safe_grads, state.inner_state, params, **extra_args)
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, -jnp.zeros_like(u)), inner_updates)
    inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state)

    good = state.good_steps + 1
    grow = good >= period
    grown = state.scale * factor
    grown = jnp.where(jnp.isfinite(grown), grown, state.scale)
    scale_if_finite = jnp.where(grow, grown, state.scale)
    scale_if_skipped = jnp.maximum(state.scale / factor, state.min_scale)
    new_state = LossScaleState(
        scale=jnp.where(finite, scale_if_finite, scale_if_skipped),
        good_steps=jnp.where(finite & ~grow, good, 0).astype(jnp.int32),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        min_scale=state.min_scale,
        inner_state=inner_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------------------------
# From a config string.
# --------------------------------------------------------------------------------------------

LOSS_SCALE_FORMS = ("none", "static:<value>",
                    "dynamic[:initial_scale=<v>,period=<n>,factor=<v>,min_scale=<v>]")
_DYNAMIC_KEYS = ("initial_scale", "period", "factor", "min_scale")


def _parse_number(text: str) -> float:
  """A float, or `a**b` (so `initial_scale=2**15` reads as written); ValueError for anything else."""
  try:
    if "**" in text:
      base, _, exponent = text.partition("**")
      return float(base) ** float(exponent)
    return float(text)
  except (ValueError, OverflowError):
    raise ValueError(f"{text.strip()!r} is not a number") from None


def _bad_spec(spec: str, why: str) -> ValueError:
  return ValueError(f"loss scale {spec!r}: {why}; allowed forms: {', '.join(LOSS_SCALE_FORMS)}")


def parse_loss_scale(spec: str) -> tuple[str, dict[str, float]]:
  """`"dynamic:period=100"` -> ("dynamic", {"period": 100}); raises one-line ValueError naming the allowed forms.

  Judges the options with the checks of the builders themselves (`static_options`,
  `dynamic_options`), so what parses here builds in `build_loss_scale`, and
  `config.validate` refuses everything the optimizer would. Returns only the options given.
  """
  kind, colon, rest = spec.strip().partition(":")
  kind = kind.strip().lower()
  if kind == "none":
    if colon:
      raise _bad_spec(spec, "'none' takes no options")
    return "none", {}
  if kind not in ("static", "dynamic"):
    raise _bad_spec(spec, f"unknown kind {kind!r}")
  options: dict[str, float] = {}
  try:
    if kind == "static":
      if not rest.strip():
        raise _bad_spec(spec, "'static' needs a value, e.g. 'static:1024'")
      options["scale"] = _parse_number(rest)
      static_options(**options)
      return "static", options
    for part in rest.split(",") if rest.strip() else ():
      key, eq, value = part.partition("=")
      key = key.strip()
      if not eq or key not in _DYNAMIC_KEYS:
        raise _bad_spec(spec, f"bad dynamic option {part.strip()!r} (keys: {', '.join(_DYNAMIC_KEYS)})")
      if key in options:
        raise _bad_spec(spec, f"option {key!r} given twice")
      options[key] = _parse_number(value)
    if "period" in options and np.isfinite(options["period"]) and options["period"] == int(options["period"]):
      options["period"] = int(options["period"])
    dynamic_options(**options)
  except ValueError as e:
    message = str(e)
    if message.startswith(f"loss scale {spec!r}: "):  # already in its final form
      raise
    raise _bad_spec(spec, message.removeprefix("loss scale: ")) from None
  return "dynamic", options


def build_loss_scale(spec: str, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps `inner` in the loss scaling of `spec` ("none" returns `inner` itself).

  Example:
    >>> tx = build_loss_scale("dynamic:initial_scale=2**10,period=100,min_scale=4", optax.sgd(0.1))
    >>> current_loss_scale(tx.init({"w": jnp.zeros(2)}))
    Array(1024., dtype=float32)
  """
  kind, options = parse_loss_scale(spec)
  if kind == "none":
    return inner
  if kind == "static":
    return static_loss_scale(inner, options["scale"])
  return dynamic_loss_scale(inner, **options)


# --------------------------------------------------------------------------------------------
# Reading the state (train step, logging).
# --------------------------------------------------------------------------------------------


def find_loss_scale_state(opt_state) -> LossScaleState | None:
  """The one `LossScaleState` anywhere in `opt_state` (None without loss scaling)."""
  is_state = lambda x: isinstance(x, LossScaleState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if len(found) > 1:
    raise ValueError(f"found {len(found)} loss-scale states in the optimizer state; the loss is scaled once, "
                     "so wrap the whole optimizer in one loss-scale transformation")
  return found[0] if found else None


def with_loss_scale_of(opt_state, source):
  """`opt_state` with the loss-scale counters of `source` (its own wrapped optimizer state kept): a
  fresh optimizer state (a new progressive phase) keeps the run's scale and skipped-step count."""
  old = find_loss_scale_state(source)
  if old is None or find_loss_scale_state(opt_state) is None:
    return opt_state
  is_state = lambda x: isinstance(x, LossScaleState)
  return jax.tree.map(lambda x: old._replace(inner_state=x.inner_state) if is_state(x) else x, opt_state,
                      is_leaf=is_state)


def current_loss_scale(opt_state) -> jax.Array:
  """The scale to multiply the loss by (float32 []; 1.0 without loss scaling)."""
  state = find_loss_scale_state(opt_state)
  return jnp.ones((), jnp.float32) if state is None else state.scale


def skipped_steps(opt_state) -> jax.Array:
  """How many non-finite steps were skipped so far (int32 []; 0 without loss scaling)."""
  state = find_loss_scale_state(opt_state)
  return jnp.zeros((), jnp.int32) if state is None else state.skipped_steps


def is_finite_step(opt_state_before, opt_state_after) -> jax.Array:
  """A scalar bool: the update between the two states was applied (not skipped for non-finite grads)."""
  return skipped_steps(opt_state_after) == skipped_steps(opt_state_before)
