"""Data sources behind one interface (`base.Task`): synthetic chain tasks now, TFDS later."""

from __future__ import annotations

import ml_collections

from chainjax.data import base
from chainjax.data.base import Batch, LabelSpec, Task

TASKS = ("parity", "line_parity")


def get_task(config: ml_collections.ConfigDict) -> Task:
  """Builds the task named by `config.data.name` (the training stream also depends on `config.seed`)."""
  data = config.data
  if data.name == "parity":
    from chainjax.data import parity

    return parity.ParityTask(d=data.d, levels=data.levels, data_seed=data.seed, seed=config.seed,
                             eval_size=data.eval_size)
  if data.name == "line_parity":
    from chainjax.data import line_parity

    return line_parity.LineParityTask(num_images=data.num_images, data_seed=data.seed, seed=config.seed,
                                      eval_size=data.eval_size)
  raise ValueError(f"config.data.name: unknown task {data.name!r}; allowed: {', '.join(TASKS)}")


__all__ = ["Batch", "LabelSpec", "Task", "TASKS", "base", "get_task"]
