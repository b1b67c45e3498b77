"""Kernel initializers by name: the one place that maps a stage config's `init` and `recurrent_init` to code.

"default" maps to None, meaning "pass nothing and keep the Flax module's own
default". That way a config that does not ask for an init builds exactly the
parameters it built before these fields existed, and follows Flax if its
defaults change.

Fans follow `jax.nn.initializers`: for a Dense kernel [in, out], fan_in = in and
fan_out = out; for a Conv kernel [kh, kw, in, out], both are multiplied by
kh * kw; Flax's LinearGeneral (the attention projections) flattens its kernel to
[in, out] before calling the initializer. Embedding tables pass other axes (see
`embedding.py`).
"""

from __future__ import annotations

from typing import Callable

import jax

Initializer = Callable[..., jax.Array]  # (key, shape, dtype) -> array, as in jax.nn.initializers

INITS = ("default", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "lecun_normal", "orthogonal")


def kernel_init(name: str, *, in_axis: int = -2, out_axis: int = -1) -> Initializer | None:
  """The initializer called `name` (one of `INITS`); None for "default" (the module keeps its own).

  `in_axis` and `out_axis` are the kernel axes that count as fan-in and fan-out.
  For "orthogonal", `out_axis` is the column axis: with the kernel seen as a matrix
  [rest, out], its columns are orthonormal when rest >= out, else its rows are.
  """
  inits = jax.nn.initializers
  if name == "default":
    return None
  if name == "orthogonal":
    return inits.orthogonal(column_axis=out_axis)
  factories = {
      "xavier_uniform": inits.glorot_uniform,  # Var = 2 / (fan_in + fan_out)
      "xavier_normal": inits.glorot_normal,  # Var = 2 / (fan_in + fan_out)
      "he_uniform": inits.he_uniform,  # Var = 2 / fan_in
      "he_normal": inits.he_normal,  # Var = 2 / fan_in
      "lecun_normal": inits.lecun_normal,  # Var = 1 / fan_in
  }
  if name not in factories:  # validated configs never get here
    raise ValueError(f"unknown init {name!r}; allowed: {', '.join(INITS)}")
  return factories[name](in_axis=in_axis, out_axis=out_axis)


def init_kwargs(initializer: Initializer | None, key: str = "kernel_init") -> dict[str, Initializer]:
  """`{key: initializer}` to pass to a Flax constructor, or {} for None so the constructor keeps its default."""
  return {} if initializer is None else {key: initializer}
