"""Data sources behind one interface (`base.Task`): synthetic chain tasks and TFDS datasets via Grain."""

from __future__ import annotations

import ml_collections

from chainjax.data import base
from chainjax.data.base import Batch, InputIterator, LabelSpec, Shard, Task
from chainjax.errors import DataError

SYNTHETIC = ("parity", "line_parity")  # generated in memory from (seed, step)
TEXT = ("imdb_reviews", "glue/sst2", "synthetic_sentiment")  # text classification (`data/text.py`)
TASKS = SYNTHETIC + TEXT  # any other name is a TFDS image-classification dataset (`data/tfds_data.py`)


def get_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> Task:
  """Builds the task named by `config.data.name` (the training stream also depends on `config.seed`).

  `workdir` holds what a pipeline derives from its data and must keep (a text
  vocabulary); tasks that need none ignore it. A name that is no task is a `DataError`.
  """
  data = config.data
  if not data.name:
    raise DataError("name", f"is empty; name a synthetic task ({', '.join(SYNTHETIC + ('synthetic_sentiment',))}) "
                    "or a TFDS dataset")
  if data.name == "parity":
    from chainjax.data import parity

    return parity.ParityTask(d=data.d, levels=data.levels, data_seed=data.seed, seed=config.seed,
                             eval_size=data.eval_size)
  if data.name == "line_parity":
    from chainjax.data import line_parity

    return line_parity.LineParityTask(num_images=data.num_images, data_seed=data.seed, seed=config.seed,
                                      eval_size=data.eval_size)
  if data.name in TEXT:
    from chainjax.data import text

    return text.text_task(config, workdir)
  from chainjax.data import tfds_data

  return tfds_data.image_classification_task(config)


__all__ = ["Batch", "InputIterator", "LabelSpec", "Shard", "Task", "TASKS", "base", "get_task"]
