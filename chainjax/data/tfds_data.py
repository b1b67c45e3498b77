"""TFDS datasets as chain tasks: `tfds.data_source` (ArrayRecord, random access) read through Grain.

Any TFDS image-classification dataset prepared in ArrayRecord format works by
name (`config.data.name=fashion_mnist`, `cifar10`, ...): every stage's head
predicts the class label, images become float32 in [0, 1]. Nothing is
downloaded at run time (`download=False`): a dataset that is not prepared in
`config.data.data_dir` is an error that says how to prepare it.

Every failure to open a dataset is a `DataError` whose message is one line naming
the config field, what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from chainjax.errors import ConfigError, DataError
from chainjax.data import base
from chainjax.data import pipeline

SPLIT_FIELDS = ("split_train", "split_eval", "split_test")


def prepare_hint(name: str, data_dir: str | None) -> str:
  """The command that prepares `name` in `data_dir`."""
  flag = f" --data_dir={data_dir}" if data_dir else ""
  if name == "fashion_mnist":
    return f"python -m chainjax.data.prepare fashion_mnist{flag}"
  return f"tfds build {name}{flag} --file_format=array_record"


def open_builder(name: str, data_dir: str | None):
  """The prepared TFDS builder of `name` in `data_dir` (None: the TFDS default), or a `DataError`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = data_dir or "the TFDS default data dir"
  if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
    raise DataError("data_dir", f"{data_dir!r} does not exist; prepare {name} there with "
                    f"`{prepare_hint(name, data_dir)}` or point config.data.data_dir at the folder that holds it")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError("name", f"{name!r} is neither a TFDS dataset nor prepared in {where}") from None
  if not builder.is_prepared():
    raise DataError("data_dir", f"TFDS dataset {name!r} is not prepared in {where}; run "
                    f"`{prepare_hint(name, data_dir)}` (nothing is downloaded at run time)")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format != "array_record":
    raise DataError("data_dir", f"{name!r} in {builder.data_dir} is stored as {file_format}; chainjax reads "
                    f"ArrayRecord (random access): rebuild it with `{prepare_hint(name, data_dir)}`")
  return builder


def open_split(builder, split: str, field: str):
  """`builder.as_data_source(split)` with one-line errors for an unknown or empty split."""
  if not split:
    raise DataError(field, f"is empty; name a split of {builder.name}: {', '.join(builder.info.splits)}")
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    detail = str(e).splitlines()[0]
    raise DataError(field, f"{split!r} is not a split of {builder.name} ({detail}); available: "
                    f"{', '.join(builder.info.splits)}") from None
  if num_examples == 0:
    raise DataError(field, f"split {split!r} of {builder.name} has no examples")
  return builder.as_data_source(split=split)


@dataclasses.dataclass(frozen=True)
class ImageClassification:
  """Record {image: uint8 [H, W, C], label: int} -> inputs float32 in [0, 1], the label for every stage."""

  image_key: str
  label_key: str
  num_stages: int

  def __call__(self, record: dict[str, Any]) -> pipeline.Example:
    image = np.asarray(record[self.image_key], np.float32) * np.float32(1.0 / 255.0)
    label = np.int32(record[self.label_key])
    return {"inputs": image, "labels": (label,) * self.num_stages}


def image_classification_task(config) -> pipeline.GrainTask:
  """The task of a TFDS image-classification dataset named by `config.data.name`."""
  data = config.data
  builder = open_builder(data.name, data.data_dir or None)
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  features = builder.info.features
  if image_key not in features or label_key not in features:
    raise DataError("name", f"{data.name!r} has features {', '.join(features)}; chainjax reads image "
                    f"classification datasets with {image_key!r} and {label_key!r}")
  shape = tuple(features[image_key].shape)
  if None in shape or len(shape) != 3:
    raise DataError("name", f"{data.name!r} images have shape {shape}; chainjax needs fixed [H, W, C] images")
  num_classes = features[label_key].num_classes
  num_stages = len(config.chain.stages)
  specs = tuple(base.LabelSpec(name=label_key, num_classes=num_classes, default_loss="softmax_ce")
                for _ in range(num_stages))
  train = open_split(builder, data.split_train, "split_train")
  evaluation = open_split(builder, data.split_eval, "split_eval")
  if data.cache:
    train, evaluation = pipeline.CachedSource(train), pipeline.CachedSource(evaluation)
  transform = ImageClassification(image_key, label_key, num_stages)
  task = pipeline.GrainTask(name=data.name, train_source=train, eval_source=evaluation, transform=transform,
                            input_shape=shape, input_dtype=np.float32, label_specs=specs, seed=config.seed,
                            num_threads=data.num_threads, prefetch=data.prefetch)
  check_first_example(task, builder, data.split_train)
  if data.split_test:
    test = open_split(builder, data.split_test, "split_test")
    task.test_source = pipeline.CachedSource(test) if data.cache else test
  return task


def check_first_example(task: pipeline.GrainTask, builder, split: str) -> None:
  """Reads record 0 and checks it against the task's declared shapes and classes."""
  record = task.train_source[0]
  example = task.transform(record)
  inputs = np.asarray(example["inputs"])
  if inputs.shape != task.input_shape:
    raise DataError("name", f"record 0 of {builder.name} split {split!r} has inputs of shape {inputs.shape}, "
                    f"but the dataset declares {task.input_shape} (files in {builder.data_dir})")
  for spec, label in zip(task.label_specs, example["labels"]):
    label = np.asarray(label)
    if label.shape != spec.shape or (spec.num_classes and not 0 <= int(label.max()) < spec.num_classes):
      raise DataError("name", f"record 0 of {builder.name} split {split!r} has label {label.tolist()}, "
                      f"which does not fit {spec.num_classes} classes of shape {spec.shape}")
