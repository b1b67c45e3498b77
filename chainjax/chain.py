"""A chain of stages with sub-task heads, the chain modes, and the chain loss.

    h_1 = M_1(x),  h_i = M_i(h_{i-1}),  y_i = head_i(h_i),  L = sum_i w_i * l_i(y_i, label_i)

The mode (`config.chain.mode`) is a `ChainMode` from `MODES`: a sequence of phases,
each saying which loss terms enter `L`, where the gradient stops, and which stages
update. The chain, the loss, the train step and validation ask the mode; nothing
else compares mode names.

| mode                   | phases                    | loss terms          | gradient stops          |
|------------------------|---------------------------|---------------------|-------------------------|
| `end_to_end`           | 1                         | the last stage's    | nowhere                 |
| `deep_supervision`     | 1                         | every head's        | nowhere                 |
| `decoupled`            | 1                         | every head's        | before every stage      |
| `progressive`          | one per stage; phase j    | stage j's           | before stage j; only j  |
|                        | trains stage j            |                     | updates                 |
| `progressive_finetune` | the progressive phases,   | then the last       | then nowhere; every     |
|                        | then one fine-tuning phase| stage's             | stage updates           |

Parameters live under `stages/<stage name>/{body,head}/...`, so the stage name
is the second element of every parameter path (per-stage optimizers use it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from chainjax import metrics as metrics_lib
from chainjax import stages as stages_lib
from chainjax.compress import quant
from chainjax.errors import ConfigError
from chainjax.data.base import LabelSpec


# --------------------------------------------------------------------------------------------
# Chain modes.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhaseRule:
  """What the phase of a chain mode trains. `"own"` is the phase's stage (a stage-wise phase).

  `terms`: which loss terms count ("last" | "all" | "own"); `cut`: where `stop_gradient` cuts
  the chain ("none" | "every": before every stage but the first | "own": before the phase's
  stage); `trains`: which stages update their parameters and BatchNorm statistics ("all" | "own").
  `per_stage`: the rule is repeated once per stage (phase j: stage j), as greedy training does.
  """

  terms: str
  cut: str = "none"
  trains: str = "all"
  per_stage: bool = False


@dataclasses.dataclass(frozen=True)
class ModePhase:
  """One phase of a mode on a chain of `num_stages` stages (`stage`: the phase's stage, or None)."""

  rule: PhaseRule
  num_stages: int
  stage: int | None = None

  def counts(self, i: int) -> bool:
    """Whether the loss term of stage i (0-based) enters the objective."""
    return {"all": True, "last": i == self.num_stages - 1, "own": i == self.stage}[self.rule.terms]

  def cuts_before(self, i: int) -> bool:
    """Whether the gradient stops between stage i-1 and stage i."""
    return i > 0 and {"none": False, "every": True, "own": i == self.stage}[self.rule.cut]

  def trains(self, i: int) -> bool:
    """Whether stage i updates in this phase (parameters and BatchNorm statistics)."""
    return self.rule.trains == "all" or i == self.stage

  @property
  def trains_every_stage(self) -> bool:
    return all(self.trains(i) for i in range(self.num_stages))


@dataclasses.dataclass(frozen=True)
class ChainMode:
  """A chain mode: its phases, and what it asks of the config.

  `consistency`: how the KL term between consecutive heads trains ("joint": both heads,
  "fixed_target": the later head is a fixed target, "off": never added). `every_head`:
  why every stage needs a head (empty: it need not). `early_stopping`: whether an eval
  metric keeps its meaning across the phases. `finetune`: whether the last phase's budget
  is `chain.finetune_steps`.
  """

  name: str
  rules: tuple[PhaseRule, ...]
  consistency: str = "joint"
  every_head: str = ""
  early_stopping: bool = True
  finetune: bool = False

  def phases(self, num_stages: int) -> tuple[ModePhase, ...]:
    """Every phase of this mode on a chain of `num_stages` stages, in training order."""
    out = []
    for rule in self.rules:
      stages = range(num_stages) if rule.per_stage else (None,)
      out += [ModePhase(rule, num_stages, stage) for stage in stages]
    return tuple(out)

  def phase(self, num_stages: int, index: int = 0) -> ModePhase:
    return self.phases(num_stages)[index]

  @property
  def stagewise(self) -> bool:
    """Whether some phase trains one stage at a time (phase budgets apply)."""
    return any(rule.per_stage for rule in self.rules)

  def budgets(self, num_stages: int, total: int, phase_steps=(), finetune_steps: int = 0) -> tuple[int, ...]:
    """Updates per phase: `phase_steps` for the stage-wise phases (empty: the rest of `total` split
    evenly, the first phases getting one more), then `finetune_steps` for a fine-tuning phase."""
    if len(self.phases(num_stages)) == 1:
      return (total,)
    greedy = total - (finetune_steps if self.finetune else 0)
    budgets = tuple(phase_steps) or tuple(greedy // num_stages + (1 if j < greedy % num_stages else 0)
                                          for j in range(num_stages))
    return budgets + ((finetune_steps,) if self.finetune else ())


_END_TO_END = PhaseRule(terms="last")
_GREEDY = PhaseRule(terms="own", cut="own", trains="own", per_stage=True)
_GREEDY_HEADS = "trains every stage on its own head: enable it"

MODES: dict[str, ChainMode] = {
    mode.name: mode for mode in (
        ChainMode("end_to_end", (_END_TO_END,)),
        ChainMode("deep_supervision", (PhaseRule(terms="all"),)),
        ChainMode("decoupled", (PhaseRule(terms="all", cut="every"),), consistency="fixed_target",
                  every_head="cuts every gradient between stages, so a stage without a head never learns: enable "
                  "its head, or use deep_supervision"),
        ChainMode("progressive", (_GREEDY,), consistency="off", every_head=_GREEDY_HEADS, early_stopping=False),
        ChainMode("progressive_finetune", (_GREEDY, _END_TO_END), consistency="off", every_head=_GREEDY_HEADS,
                  early_stopping=False, finetune=True),
    )
}


def get_mode(mode: "str | ChainMode") -> ChainMode:
  """The `ChainMode` of a name in `MODES` (a `ChainMode` is returned as is)."""
  if isinstance(mode, ChainMode):
    return mode
  if mode not in MODES:
    raise ConfigError("chain.mode", f"{mode!r} is not one of: {', '.join(MODES)}")
  return MODES[mode]



class Link(nnx.Module):
  """One stage of the chain: its body `M_i`, optional head, and optional quantizer of its output
  (`out_quant`, a `quant.BoundaryQuantizer`; see `build_chain`)."""

  def __init__(self, body: nnx.Module, head: nnx.Module | None, pass_to_next: str):
    self.body = body
    self.head = head
    self.pass_to_next = pass_to_next
    self.out_quant = nnx.data(None)


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

  def __call__(
      self,
      x: jax.Array,
      *,
      mode: str | ChainMode = "deep_supervision",
      train: bool = False,
      key: jax.Array | None = None,
      phase: int | None = None,
  ) -> ChainOutput:
    """Runs every stage; `phase` (0 when None) is the phase of `mode` that trains.

    A stage with an output quantizer (`Link.out_quant`) quantizes its output h_i after the body:
    its head, the next stage and `ChainOutput.hiddens` see the quantized h_i.
    """
    rule = get_mode(mode).phase(len(self.names), phase or 0)
    hiddens, predictions = [], []
    h = x
    for i, name in enumerate(self.names):
      link = self.stages[name]
      if rule.cuts_before(i):
        h = jax.lax.stop_gradient(h)
      stage_train = train and rule.trains(i)  # a stage that does not train keeps its BatchNorm statistics
      stage_key = None if key is None else jax.random.fold_in(key, i)
      with quant.training(stage_train):  # and its quantization observers
        hidden, y = _apply_link(link, h, stage_train, stage_key)
      hiddens.append(hidden)
      predictions.append(y)
      h = y if link.pass_to_next == "prediction" else hidden
    return ChainOutput(tuple(hiddens), tuple(predictions))

  def stage(self, index: int, h: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Stage `index` alone at inference (`train=False`): (what it passes to the next stage, its head's
    prediction or None). Running the stages one after another gives `__call__(x, train=False)`'s predictions;
    early exit (`chainjax.predict`) runs only the stages an example needs."""
    link = self.stages[self.names[index]]
    with quant.training(False):
      hidden, y = _apply_link(link, h, False, None)
    return (y if link.pass_to_next == "prediction" else hidden), y


def _apply_link(link: Link, h: jax.Array, train: bool, key: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """One stage: its body, the quantizer of its output h_i (if any), then its head on h_i."""
  h = link.body(h, train=train, key=key)
  if link.out_quant is not None:
    h = link.out_quant(h)
  return h, (None if link.head is None else link.head(h, train=train, key=key))


def phase_budgets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Updates per phase of `config.chain.mode` over `config.total_steps` updates."""
  chain = config.chain
  return get_mode(chain.mode).budgets(len(chain.stages), config.total_steps, tuple(chain.phase_steps),
                                      chain.finetune_steps)


def phase_starts(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The first update of every phase of `config.chain.mode` (phase j runs from starts[j])."""
  starts, acc = [], 0
  for budget in phase_budgets(config):
    starts.append(acc)
    acc += budget
  return tuple(starts)


def phase_at(starts: tuple[int, ...], step: int) -> int:
  """The phase that update `step` (0-based) belongs to."""
  return max(j for j, start in enumerate(starts) if start <= step)


def check_config(config: ml_collections.ConfigDict, specs: Sequence[LabelSpec], num_updates: int,
                 task_name: str) -> None:
  """`config.chain` against the task's stage labels `specs` and the run's resolved `num_updates`.

  Raises `ConfigError` naming the field: the mode, the stage list (each stage's schema,
  unique names, one stage per label, losses that fit the labels, heads the mode needs),
  the loss weights, the phase budgets, and the early-stopping metric (one of this chain's).
  """
  chain = config.chain
  mode = get_mode(chain.mode)
  stages = list(chain.stages)
  if not stages:
    raise ConfigError("chain.stages", "is empty; give one stage config per task label")
  for i, stage in enumerate(stages):
    stages_lib.validate_stage_config(stage, f"chain.stages[{i}]")
  names = [s.name for s in stages]
  if len(set(names)) != len(names):
    raise ConfigError("chain.stages", f"stage names must be unique, got {names}")
  if len(stages) != len(specs):
    raise ConfigError("chain.stages", f"the {task_name} task has {len(specs)} stage labels "
                      f"({', '.join(s.name for s in specs)}); got {len(stages)} stages")
  for i, (stage, spec) in enumerate(zip(stages, specs)):
    if stage.loss and stage.loss not in LOSSES:
      raise ConfigError(f"chain.stages[{i}].loss", f"{stage.loss!r} is not allowed; allowed: "
                        f"{', '.join(repr(k) for k in ('',) + tuple(LOSSES))}")
    if stage.loss and stage.loss not in spec.allowed_losses():
      raise ConfigError(f"chain.stages[{i}].loss", f"{stage.loss!r} does not fit label {spec.name!r}; "
                        f"allowed: {', '.join(spec.allowed_losses())}")
  if not stages[-1].head.enabled:
    raise ConfigError(f"chain.stages[{len(stages) - 1}].head.enabled", "the last stage needs a head")
  weights = tuple(chain.loss_weights)
  if weights and len(weights) != len(stages):
    raise ConfigError("chain.loss_weights", f"has {len(weights)} entries for {len(stages)} stages")
  if any(not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights):
    raise ConfigError("chain.loss_weights", f"must be finite numbers >= 0, got {weights}")
  _check_budgets(config, mode, num_updates)
  _check_qat(config, num_updates)
  metric = config.early_stopping.metric
  auc = [s.head.enabled and spec.is_binary and spec.shape == () for s, spec in zip(stages, specs)]
  known = ["eval/loss", "eval/accuracy"] + (["eval/auc"] if auc[-1] else [])
  for i, stage in enumerate(stages):
    if stage.head.enabled:
      known += [f"eval/stage_{i + 1}/{m}" for m in ("loss", "accuracy") + (("auc",) if auc[i] else ())]
  if metric and metric not in known:
    raise ConfigError("early_stopping.metric", f"{metric!r} is not an eval metric of this chain; "
                      f"allowed: {', '.join(known)}")
  if mode.every_head:
    for i, stage in enumerate(stages):
      if not stage.head.enabled:
        raise ConfigError(f"chain.stages[{i}].head.enabled", f"{mode.name} mode {mode.every_head}")
  if metric and not mode.early_stopping:
    raise ConfigError("early_stopping.metric", f"{mode.name} mode trains one stage per phase, so the eval metric "
                      "changes meaning at every phase boundary: early stopping is not supported there (set it to '')")


def _check_budgets(config: ml_collections.ConfigDict, mode: ChainMode, num_updates: int) -> None:
  """`chain.phase_steps` and `chain.finetune_steps` against the mode and the run's `num_updates`."""
  chain, n = config.chain, len(config.chain.stages)
  phases = tuple(chain.phase_steps)
  if mode.finetune and not 0 < chain.finetune_steps < num_updates:
    raise ConfigError("chain.finetune_steps", f"{mode.name} needs a final phase of 1 to {num_updates - 1} updates "
                      f"(the run has {num_updates}), got {chain.finetune_steps}")
  if mode.stagewise and not phases and num_updates - (chain.finetune_steps if mode.finetune else 0) < n:
    raise ConfigError("total_steps", f"{mode.name} needs at least one update per stage ({n}), got {num_updates}")
  if not phases:
    return
  if any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in phases):
    raise ConfigError("chain.phase_steps", f"must be positive ints, got {phases}")
  greedy = num_updates - (chain.finetune_steps if mode.finetune else 0)
  if len(phases) != n or sum(phases) != greedy:
    what = f"total_steps={config.total_steps}" if config.num_epochs <= 0 else (
        f"the run's {num_updates} updates (num_epochs={config.num_epochs}, total_steps={config.total_steps})")
    if mode.finetune:
      what += f" minus finetune_steps={chain.finetune_steps}"
    raise ConfigError("chain.phase_steps", f"needs one budget per stage ({n}) summing to {what}, got {phases}")


def _check_qat(config: ml_collections.ConfigDict, num_updates: int) -> None:
  """`compress.qat.start_step` against the rules and the run (the rules are checked by `build_chain`, the bits
  by `config.validate`)."""
  qat = config.compress.qat
  if qat.start_step and not qat.rules and not qat.boundary_bits:
    raise ConfigError("compress.qat.start_step", f"{qat.start_step} delays quantization-aware training, but there "
                      "is none: set compress.qat.rules or compress.qat.boundary_bits, or start_step=0")
  if qat.start_step >= num_updates:
    raise ConfigError("compress.qat.start_step", f"must be below the run's {num_updates} updates (QAT would never "
                      f"start), got {qat.start_step}")


def build_chain(config: ml_collections.ConfigDict, task, *, rngs: nnx.Rngs) -> Chain:
  """The chain of `config.chain.stages` for `task` (its input and per-stage labels), with the layers that
  `config.compress.qat.rules` name quantized for training (`compress.quant.quantize`) and, with
  `config.compress.qat.boundary_bits`, every stage's output quantized before its head and the next stage
  (EMA range; the asymmetric grid spends every level on the observed range, also for one-signed post-ReLU
  outputs, where a symmetric grid would waste half of them)."""
  chain = Chain(config.chain.stages, task.input_shape, task.input_dtype, task.label_specs, rngs=rngs)
  rules = []
  for i, text in enumerate(config.compress.qat.rules):
    try:
      rules.append(quant.Rule.parse(text))
    except (ValueError, TypeError) as e:
      raise ConfigError("compress.qat.rules", f"rule {i}, {text!r}: {e}") from None
  if rules:
    try:
      quant.quantize(chain, rules)
    except ValueError as e:
      raise ConfigError("compress.qat.rules", str(e).splitlines()[0]) from None
  if config.compress.qat.boundary_bits:
    quant.attach_boundary_quantizers(chain, config.compress.qat.boundary_bits)
  return chain


# --------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------


def _mean_over_label_axes(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).mean(axis=1) if x.ndim > 1 else x


def _softmax_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def _sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))


def _hinge(logits: jax.Array, labels: jax.Array) -> jax.Array:
  signs = 2.0 * labels.astype(jnp.float32) - 1.0
  return jnp.maximum(0.0, 1.0 - signs * logits)


# Per-stage losses (`chain.stages[i].loss`): float32 logits and labels -> loss per label element.
# Which of them fit a stage's label is the label's to say (`LabelSpec.allowed_losses`).
LOSSES = {"softmax_ce": _softmax_ce, "sigmoid_bce": _sigmoid_bce, "hinge": _hinge}


def per_example_loss(kind: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Loss of each example [B], averaged over its label elements."""
  if kind not in LOSSES:
    raise ValueError(f"unknown loss {kind!r}; allowed: {', '.join(LOSSES)}")
  return _mean_over_label_axes(LOSSES[kind](logits.astype(jnp.float32), labels))


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

  mode: ChainMode
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
    return cls(get_mode(config.chain.mode), tuple(specs), losses, weights, float(config.chain.consistency_weight))

  def __post_init__(self):
    object.__setattr__(self, "mode", get_mode(self.mode))  # a mode name is accepted too

  def active_weights(self, phase: int | None = None) -> tuple[float, ...]:
    """The weights of the terms that count in `phase` (0 when None) of the mode."""
    rule = self.mode.phase(len(self.weights), phase or 0)
    return tuple(w if rule.counts(i) else 0.0 for i, w in enumerate(self.weights))

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
    if self.consistency_weight and self.mode.consistency != "off":
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
      if self.mode.consistency == "fixed_target":  # stage i learns to agree; no gradient into stage i+1
        b = jax.lax.stop_gradient(b)
      terms.append(masked_mean(_consistency(self.specs[i], b, a)))
    return sum(terms) if terms else None


def stage_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(stage.name for stage in config.chain.stages)


def stage_of_path(path: tuple) -> str:
  """The stage name of a parameter path `('stages', <name>, ...)` (plain or jax key path)."""
  key = path[1]
  return str(getattr(key, "key", key))
