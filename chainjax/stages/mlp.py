"""A multi-layer perceptron stage: `depth` Dense layers acting on the last axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from chainjax.errors import ConfigError
from chainjax.stages import init as init_lib

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "silu": jax.nn.silu}
NORMS = ("none", "layer")


class MLP(nnx.Module):
  """`depth` x (Dense -> optional LayerNorm -> activation) on the last axis."""

  def __init__(self, in_features: int, *, features: int, depth: int, activation: str, norm: str,
               rngs: nnx.Rngs, kernel_init: init_lib.Initializer | None = None):
    self.activation = activation  # a name, so the graphdef stays a plain static value
    widths = [in_features] + [features] * depth
    init = init_lib.init_kwargs(kernel_init)
    self.layers = nnx.List([nnx.Linear(a, b, **init, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
    # Pre-activation LayerNorm, one per layer; an empty list when `norm == "none"`.
    self.norms = nnx.List([nnx.LayerNorm(features, rngs=rngs) for _ in range(depth)] if norm == "layer" else [])

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del train, key  # no dropout or batch statistics in this stage
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      x = x.astype(jnp.float32)
    act = ACTIVATIONS[self.activation]
    for i, dense in enumerate(self.layers):
      x = dense(x)
      if self.norms:
        x = self.norms[i](x)
      x = act(x)
    return x


def build(cfg, in_shape: tuple[int, ...], in_dtype, *, rngs: nnx.Rngs, path: str) -> MLP:
  """The MLP of a validated `mlp` stage config; the input needs a feature axis."""
  del in_dtype  # integer inputs are cast to float32
  if len(in_shape) < 1:
    raise ConfigError(f"{path}.type", f"mlp needs an input with a feature axis, got per-example shape {in_shape}")
  return MLP(in_shape[-1], features=cfg.features, depth=cfg.depth, activation=cfg.activation, norm=cfg.norm,
             rngs=rngs, kernel_init=init_lib.kernel_init(cfg.init))
