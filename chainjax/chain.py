"""A chain of stages with sub-task heads, the four chain modes, and the chain loss.

    h_1 = M_1(x),  h_i = M_i(h_{i-1}),  y_i = head_i(h_i),  L = sum_i w_i * l_i(y_i, label_i)

The mode (`config.chain.mode`) decides which losses enter `L` and where the
gradient may flow:

| mode               | loss terms                 | gradient between stages            |
|--------------------|----------------------------|------------------------------------|
| `end_to_end`       | the last stage's only      | flows through every stage          |
| `deep_supervision` | every stage with a head    | flows through every stage          |
| `decoupled`        | every stage with a head    | `stop_gradient` on each h_{i-1}    |
| `progressive`      | stage j's only, in phase j | `stop_gradient` on h_{j-1}; the    |
|                    |                            | train step keeps other stages fixed|

Parameters live under `stages/<stage name>/{body,head}/...`, so the stage name
is the second element of every parameter path (per-stage optimizers use it).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from chainjax import metrics as metrics_lib
from chainjax import stages as stages_lib
from chainjax.config import ConfigError
from chainjax.data.base import LabelSpec

MODES = ("end_to_end", "deep_supervision", "decoupled", "progressive")


class Link(nnx.Module):
  """One stage of the chain: its body `M_i` and optional head."""

  def __init__(self, body: nnx.Module, head: nnx.Module | None, pass_to_next: str):
    self.body = body
    self.head = head
    self.pass_to_next = pass_to_next


@dataclasses.dataclass(frozen=True)
class ChainOutput:
  """Every stage's output `h_i` and every head's prediction `y_i` (None without a head)."""

  hiddens: tuple[jax.Array, ...]
  predictions: tuple[jax.Array | None, ...]


class Chain(nnx.Module):
  """An ordered list of named stages; the forward pass returns all hiddens and predictions."""

  def __init__(
      self,
      stage_configs: Sequence[ml_collections.ConfigDict],
      input_shape: tuple[int, ...],
      input_dtype,
      label_specs: Sequence[LabelSpec],
      *,
      rngs: nnx.Rngs,
  ):
    self.names = tuple(cfg.name for cfg in stage_configs)
    links = {}
    shape, dtype = tuple(input_shape), input_dtype
    for i, (cfg, spec) in enumerate(zip(stage_configs, label_specs)):
      path = f"chain.stages[{i}]"
      body = stages_lib.build_stage(cfg, shape, dtype, rngs=rngs, path=path)
      out = stages_lib.output_shape(body, shape, dtype)
      head = None
      if cfg.head.enabled:
        head = stages_lib.build_head(cfg, tuple(out.shape), spec, rngs=rngs, path=path)
      if cfg.pass_to_next == "prediction":
        if head is None:
          raise ConfigError(f"chain.stages[{i}].pass_to_next", "'prediction' needs head.enabled=True")
        shape, dtype = spec.logits_shape, jnp.float32
      else:
        shape, dtype = tuple(out.shape), out.dtype
      links[cfg.name] = Link(body, head, cfg.pass_to_next)
    self.stages = nnx.Dict(links)

  @property
  def has_head(self) -> tuple[bool, ...]:
    return tuple(self.stages[n].head is not None for n in self.names)

  def __call__(
      self,
      x: jax.Array,
      *,
      mode: str = "deep_supervision",
      train: bool = False,
      key: jax.Array | None = None,
      phase: int | None = None,
  ) -> ChainOutput:
    """Runs every stage; `phase` (progressive mode) is the one stage that trains."""
    hiddens, predictions = [], []
    h = x
    for i, name in enumerate(self.names):
      link = self.stages[name]
      stage_train = train
      if i > 0 and (mode == "decoupled" or (mode == "progressive" and i == phase)):
        h = jax.lax.stop_gradient(h)
      if mode == "progressive":
        stage_train = train and i == phase  # frozen stages keep their BatchNorm statistics
      stage_key = None if key is None else jax.random.fold_in(key, i)
      h = link.body(h, train=stage_train, key=stage_key)
      y = None if link.head is None else link.head(h, train=stage_train, key=stage_key)
      hiddens.append(h)
      predictions.append(y)
      if link.pass_to_next == "prediction":
        h = y
    return ChainOutput(tuple(hiddens), tuple(predictions))


def phase_starts(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Progressive mode: the first update of every phase (phase j trains stage j from starts[j])."""
  n = len(config.chain.stages)
  budgets = tuple(config.chain.phase_steps) or tuple(
      config.total_steps // n + (1 if j < config.total_steps % n else 0) for j in range(n))
  starts, acc = [], 0
  for b in budgets:
    starts.append(acc)
    acc += b
  return tuple(starts)


def phase_at(starts: tuple[int, ...], step: int) -> int:
  """The phase that update `step` (0-based) belongs to."""
  return max(j for j, start in enumerate(starts) if start <= step)


def build_chain(config: ml_collections.ConfigDict, task, *, rngs: nnx.Rngs) -> Chain:
  """The chain of `config.chain.stages` for `task` (its input and per-stage labels)."""
  return Chain(config.chain.stages, task.input_shape, task.input_dtype, task.label_specs, rngs=rngs)


# --------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------


def _mean_over_label_axes(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).mean(axis=1) if x.ndim > 1 else x


def per_example_loss(kind: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Loss of each example [B], averaged over its label elements."""
  logits = logits.astype(jnp.float32)
  if kind == "softmax_ce":
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  elif kind == "sigmoid_bce":
    loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
  elif kind == "hinge":
    signs = 2.0 * labels.astype(jnp.float32) - 1.0
    loss = jnp.maximum(0.0, 1.0 - signs * logits)
  else:
    raise ValueError(f"unknown loss {kind!r}; allowed: softmax_ce, sigmoid_bce, hinge")
  return _mean_over_label_axes(loss)


def per_example_correct(spec: LabelSpec, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of each example's label elements predicted right [B]."""
  if spec.is_binary:
    right = (logits > 0) == (labels > 0.5)
  else:
    right = jnp.argmax(logits, axis=-1) == labels.astype(jnp.int32)
  return _mean_over_label_axes(right.astype(jnp.float32))


def _consistency(spec: LabelSpec, target_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """KL(p_target || p) per example [B], p from logits (softmax or per-element Bernoulli)."""
  target_logits, logits = target_logits.astype(jnp.float32), logits.astype(jnp.float32)
  if spec.is_binary:
    pairs = lambda z: jnp.stack([jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)], axis=-1)
    log_p, log_q = pairs(target_logits), pairs(logits)
  else:
    log_p, log_q = jax.nn.log_softmax(target_logits), jax.nn.log_softmax(logits)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return _mean_over_label_axes(kl)


@dataclasses.dataclass(frozen=True)
class ChainLoss:
  """The chain objective of one mode: which terms, their weights and loss kinds."""

  mode: str
  specs: tuple[LabelSpec, ...]
  losses: tuple[str, ...]  # loss kind per stage
  weights: tuple[float, ...]  # w_i per stage (0 where the stage has no head)
  consistency_weight: float = 0.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, specs: Sequence[LabelSpec]) -> "ChainLoss":
    stage_cfgs = config.chain.stages
    weights = tuple(config.chain.loss_weights) or (1.0,) * len(stage_cfgs)
    weights = tuple(float(w) if cfg.head.enabled else 0.0 for w, cfg in zip(weights, stage_cfgs))
    losses = tuple(cfg.loss or spec.default_loss for cfg, spec in zip(stage_cfgs, specs))
    return cls(config.chain.mode, tuple(specs), losses, weights, float(config.chain.consistency_weight))

  def active_weights(self, phase: int | None = None) -> tuple[float, ...]:
    """The weights of the terms this mode trains on (in `progressive`, those of `phase`)."""
    n = len(self.weights)
    if self.mode == "end_to_end":
      return tuple(self.weights[i] if i == n - 1 else 0.0 for i in range(n))
    if self.mode == "progressive":
      return tuple(self.weights[i] if i == phase else 0.0 for i in range(n))
    return self.weights

  def __call__(
      self,
      output: ChainOutput,
      labels: Sequence[jax.Array],
      mask: jax.Array,
      *,
      phase: int | None = None,
      denominator: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (L, metrics); masked means divide by `denominator` (default: sum of `mask`).

    `metrics` holds `stage_<i>/loss` and `stage_<i>/accuracy` for every stage with a head
    (1-based, as in the papers), `stage_<i>/auc_counts` for a head with one binary label
    (see `metrics.auc_counts`; not divided by `denominator`) and `consistency` when that
    term is on.
    """
    mask = mask.astype(jnp.float32)
    denominator = jnp.maximum(mask.sum(), 1.0) if denominator is None else denominator
    masked_mean = lambda v: jnp.sum(v * mask) / denominator
    weights = self.active_weights(phase)
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for i, (y, label, spec) in enumerate(zip(output.predictions, labels, self.specs)):
      if y is None:
        continue
      loss_i = masked_mean(per_example_loss(self.losses[i], y, label))
      metrics[f"stage_{i + 1}/loss"] = loss_i
      metrics[f"stage_{i + 1}/accuracy"] = masked_mean(per_example_correct(spec, y, label))
      if spec.is_binary and spec.shape == ():  # one binary label per example: ROC AUC is defined
        metrics[f"stage_{i + 1}/{metrics_lib.AUC_COUNTS}"] = metrics_lib.auc_counts(y, label, mask)
      if weights[i]:
        total = total + weights[i] * loss_i
    if self.consistency_weight and self.mode != "progressive":
      consistency = self._consistency_term(output, masked_mean)
      if consistency is not None:
        metrics["consistency"] = consistency
        total = total + self.consistency_weight * consistency
    return total, metrics

  def _consistency_term(self, output: ChainOutput, masked_mean) -> jax.Array | None:
    """Sum over consecutive heads with the same label space of KL(p_{i+1} || p_i)."""
    terms = []
    preds = output.predictions
    for i in range(len(preds) - 1):
      a, b = preds[i], preds[i + 1]
      if a is None or b is None or self.specs[i] != self.specs[i + 1]:
        continue
      if self.mode == "decoupled":  # stage i learns to agree; no gradient into stage i+1
        b = jax.lax.stop_gradient(b)
      terms.append(masked_mean(_consistency(self.specs[i], b, a)))
    return sum(terms) if terms else None


def stage_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(stage.name for stage in config.chain.stages)


def stage_of_path(path: tuple) -> str:
  """The stage name of a parameter path `('stages', <name>, ...)` (plain or jax key path)."""
  key = path[1]
  return str(getattr(key, "key", key))
