"""The per-stage classifier head: stage output [B, *items, *feat] -> logits [B, *spec.logits_shape].

The first `spec.item_axes` axes after the batch index separate items (e.g. the k
images of one example); the head is applied to each item on its own. The
remaining feature axes are reduced by `pool` and flattened, an optional hidden
layer follows, and a final Dense gives the logits of one item.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from chainjax.errors import ConfigError
from chainjax.data.base import LabelSpec
from chainjax.stages import init as init_lib

POOLS = ("flatten", "mean", "last")


def pooled_features(feature_shape: tuple[int, ...], pool: str) -> int:
  """Size of one item's feature vector after `pool` (shapes as in `ClassifierHead`)."""
  if pool == "flatten":
    return math.prod(feature_shape)
  if pool == "mean":
    return feature_shape[-1]
  return math.prod(feature_shape[1:])  # "last"


class ClassifierHead(nnx.Module):
  """Pool the feature axes of each item, [Dense(hidden) -> relu], Dense to the label's logits."""

  def __init__(self, in_shape: tuple[int, ...], spec: LabelSpec, *, pool: str, hidden: int, rngs: nnx.Rngs,
               path: str = "stage", kernel_init: init_lib.Initializer | None = None):
    items = tuple(spec.shape[: spec.item_axes])
    if tuple(in_shape[: spec.item_axes]) != items:
      raise ConfigError(f"{path}.head",
                        f"label {spec.name!r} has {spec.item_axes} item axes of sizes {items}, but the stage "
                        f"output has per-example shape {tuple(in_shape)}")
    feature_shape = tuple(in_shape[spec.item_axes:])
    if pool in ("mean", "last") and len(feature_shape) < 2:
      raise ConfigError(f"{path}.head.pool",
                        f"pool={pool!r} needs a sequence/spatial axis before the feature axis, but each item "
                        f"has feature shape {feature_shape}; allowed here: 'flatten'")
    self.pool = pool
    self.item_axes = spec.item_axes
    self.logits_shape = tuple(spec.logits_shape)
    features = pooled_features(feature_shape, pool)
    init = init_lib.init_kwargs(kernel_init)
    self.hidden = nnx.Linear(features, hidden, **init, rngs=rngs) if hidden > 0 else None
    self.out = nnx.Linear(hidden if hidden > 0 else features, math.prod(self.logits_shape[spec.item_axes:]),
                          **init, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del train, key  # no dropout or batch statistics in the head
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      x = x.astype(jnp.float32)
    lead = x.shape[: 1 + self.item_axes]  # [B, *items]
    if self.pool == "mean":
      x = x.mean(axis=tuple(range(len(lead), x.ndim - 1)))
    elif self.pool == "last":
      x = x[(slice(None),) * len(lead) + (-1,)]
    x = x.reshape(lead + (-1,))  # [B, *items, F]
    if self.hidden is not None:
      x = jax.nn.relu(self.hidden(x))
    return self.out(x).reshape((x.shape[0],) + self.logits_shape)  # [B, *logits_shape]


def build(head_cfg, in_shape: tuple[int, ...], spec: LabelSpec, *, rngs: nnx.Rngs, path: str,
          kernel_init: init_lib.Initializer | None = None) -> ClassifierHead:
  """The head of a validated stage config's `head` field; `kernel_init` comes from the stage's `init`."""
  return ClassifierHead(tuple(in_shape), spec, pool=head_cfg.pool, hidden=head_cfg.hidden, rngs=rngs, path=path,
                        kernel_init=kernel_init)
