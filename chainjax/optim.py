"""`config.optim` -> one optax `GradientTransformation`, built in one place.

The chain is `clip_by_global_norm` (when `grad_clip_norm > 0`) followed by the
optimizer, whose learning rate is a schedule indexed by optimizer updates.
"""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine")


def build_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule: its value at update n is the LR of update n."""
  lr = optim.learning_rate
  if optim.schedule == "constant":
    return optax.constant_schedule(lr)
  if optim.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=optim.warmup_steps,
        decay_steps=max(total_steps, optim.warmup_steps + 1), end_value=lr * optim.end_lr_factor)
  raise ValueError(f"config.optim.schedule: unknown {optim.schedule!r}; allowed: {', '.join(SCHEDULES)}")


def build_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of `config.optim` for a run of `total_steps` updates."""
  schedule = build_schedule(optim, total_steps)
  if optim.optimizer == "adam":
    tx = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  elif optim.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  elif optim.optimizer == "sgd":
    tx = optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov)
  else:
    raise ValueError(f"config.optim.optimizer: unknown {optim.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
  if optim.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
  return tx
