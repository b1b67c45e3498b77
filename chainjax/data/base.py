"""What a chain task is: an input, one label per stage, and batches drawn by step.

Every data source (synthetic tasks now, TFDS/Grain pipelines later) is a `Task`.
The chain asks a task only for its `input_shape`/`input_dtype`, its per-stage
`label_specs`, a training batch for a given step, and a fixed held-out set.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np

Batch = dict  # {"inputs": np.ndarray [B, ...], "labels": tuple[np.ndarray, ...], "mask": np.ndarray [B]}

LOSSES = ("softmax_ce", "sigmoid_bce", "hinge")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """The label a stage's head predicts.

  Attributes:
    name: the label space, e.g. "level_1" or "class". Heads of consecutive stages
      with the same `name` predict the same thing (the consistency term uses it).
    shape: per-example label shape, without the batch axis (`()` for one label).
    num_classes: 0 for binary labels in {0, 1} (one logit per label element);
      >= 2 for integer class labels (one logit per class, on a trailing axis).
    item_axes: how many leading axes of `shape` index separate items (e.g. the k
      images of `line_parity`): the head is applied to each item on its own.
    default_loss: the loss used when the stage config leaves `loss` empty.
  """

  name: str
  shape: tuple[int, ...] = ()
  num_classes: int = 0
  item_axes: int = 0
  default_loss: str = "sigmoid_bce"

  @property
  def is_binary(self) -> bool:
    return self.num_classes == 0

  @property
  def logits_shape(self) -> tuple[int, ...]:
    """Shape of the head's output for one example."""
    return self.shape if self.is_binary else self.shape + (self.num_classes,)

  def allowed_losses(self) -> tuple[str, ...]:
    return ("sigmoid_bce", "hinge") if self.is_binary else ("softmax_ce",)


class Task(Protocol):
  """A chain task: deterministic batches and a fixed held-out set."""

  name: str
  input_shape: tuple[int, ...]  # per-example, without batch
  input_dtype: np.dtype
  label_specs: tuple[LabelSpec, ...]  # one per stage, in chain order
  eval_size: int

  def train_batch(self, step: int, batch_size: int) -> Batch:
    """The global training batch of `step`: a pure function of (seed, step)."""

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """The held-out set in fixed order; the last batch is padded, `mask` marks real examples."""


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads a (possibly short) batch to `batch_size` examples; padding has mask 0."""
  n = batch["inputs"].shape[0]
  if n == batch_size:
    return batch
  pad = lambda a: np.concatenate([a, np.zeros((batch_size - n,) + a.shape[1:], a.dtype)])
  return {
      "inputs": pad(batch["inputs"]),
      "labels": tuple(pad(l) for l in batch["labels"]),
      "mask": pad(batch["mask"]),
  }


def iterate_padded(inputs: np.ndarray, labels: tuple[np.ndarray, ...], batch_size: int) -> Iterator[Batch]:
  """Yields fixed-order batches of an in-memory set, the last one padded."""
  n = inputs.shape[0]
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    yield pad_batch(
        {
            "inputs": inputs[start:stop],
            "labels": tuple(l[start:stop] for l in labels),
            "mask": np.ones((stop - start,), np.float32),
        },
        batch_size,
    )
