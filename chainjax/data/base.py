"""What a chain task is: an input, one label per stage, and batches for this process.

Every data source (synthetic chain tasks, TFDS datasets through Grain) is a
`Task`. The chain asks a task only for its `input_shape`/`input_dtype`, its
per-stage `label_specs`, an iterator of training batches and a fixed held-out
set. Both come as *process-local* batches: process p of P gets rows
[p * B/P, (p+1) * B/P) of every global batch of B rows, so the processes together
feed exactly the global batch a single process would see.

The training iterator has a `get_state()`/`set_state()` pair (Grain's iterator
protocol); the state goes into every checkpoint, so a resumed run continues with
the very next batch.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np

Batch = dict  # {"inputs": np.ndarray [B, ...], "labels": tuple[np.ndarray, ...], "mask": np.ndarray [B]}


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


@dataclasses.dataclass(frozen=True)
class Shard:
  """Which slice of every global batch this process reads: rows [index * B/count, (index+1) * B/count)."""

  index: int = 0
  count: int = 1

  @classmethod
  def of_this_process(cls) -> "Shard":
    import jax  # pylint: disable=g-import-not-at-top

    return cls(jax.process_index(), jax.process_count())

  def local_size(self, global_batch_size: int, what: str = "batch_size") -> int:
    if global_batch_size % self.count:
      raise ValueError(f"config.{what}: {global_batch_size} is not divisible by the {self.count} processes")
    return global_batch_size // self.count

  def rows(self, global_batch_size: int) -> slice:
    size = self.local_size(global_batch_size)
    return slice(self.index * size, (self.index + 1) * size)


class InputIterator(Protocol):
  """Process-local training batches, one per call, with a JSON-able position (Grain's protocol)."""

  def __next__(self) -> Batch:
    ...

  def get_state(self) -> dict:
    ...

  def set_state(self, state: dict) -> None:
    ...


class Task(Protocol):
  """A chain task: deterministic, resumable training batches and a fixed held-out set."""

  name: str
  input_shape: tuple[int, ...]  # per-example, without batch
  input_dtype: np.dtype
  label_specs: tuple[LabelSpec, ...]  # one per stage, in chain order
  eval_size: int
  train_size: int  # examples per epoch; 0 for an endless stream (synthetic tasks)

  def train_iterator(self, batch_size: int, shard: Shard) -> InputIterator:
    """This process's rows of the global training batches, from the first one on."""

  def eval_iterator(self, batch_size: int, shard: Shard) -> Iterator[Batch]:
    """This process's rows of the held-out set's global batches, in fixed order.

    The global batches cover every held-out example exactly once; the last one is
    padded, and `mask` is 0 on padding.
    """

  def save(self, workdir: str) -> None:
    """Writes into `workdir` what the task derived from its data and later runs must reuse
    (a text vocabulary); called on process 0 once the config and data are validated."""


class StepTask:
  """Base of synthetic tasks whose global batch is a pure function of the step.

  Subclasses define `train_batch(step, batch_size)` (the global batch of `step`)
  and `eval_batches(batch_size)` (the padded held-out set); this class turns them
  into the `Task` iterators by slicing this process's rows.
  """

  train_size = 0

  def train_batch(self, step: int, batch_size: int) -> Batch:
    raise NotImplementedError

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    raise NotImplementedError

  def save(self, workdir: str) -> None:
    del workdir  # generated from (seed, step): nothing to keep

  def train_iterator(self, batch_size: int, shard: Shard) -> "StepIterator":
    return StepIterator(self, batch_size, shard)

  def eval_iterator(self, batch_size: int, shard: Shard) -> Iterator[Batch]:
    rows = shard.rows(batch_size)
    for batch in self.eval_batches(batch_size):
      yield take_rows(batch, rows)


class StepIterator:
  """`InputIterator` over a `StepTask`: its state is the next step."""

  def __init__(self, task: StepTask, batch_size: int, shard: Shard):
    self._task, self._batch_size, self._rows = task, batch_size, shard.rows(batch_size)
    self._step = 0

  def __iter__(self) -> "StepIterator":
    return self

  def __next__(self) -> Batch:
    batch = take_rows(self._task.train_batch(self._step, self._batch_size), self._rows)
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {"next_step": self._step}

  def set_state(self, state: dict) -> None:
    self._step = int(state["next_step"])


def iterator_state_at(iterator: InputIterator, step: int) -> dict:
  """The state `iterator` has after `step` batches (for a checkpoint saved without one).

  Both kinds of iterator here are positions in a sequence whose element n is batch n:
  a `StepIterator`, and Grain's iterator over a batched `MapDataset`.
  """
  if isinstance(iterator, StepIterator):
    return {"next_step": step}
  return {"next_index": step}


def take_rows(batch: Batch, rows: slice) -> Batch:
  """The rows `rows` of every array of a batch."""
  return {"inputs": batch["inputs"][rows], "labels": tuple(l[rows] for l in batch["labels"]),
          "mask": batch["mask"][rows]}


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
