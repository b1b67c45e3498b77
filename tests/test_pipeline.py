"""Grain pipelines over TFDS: order, per-host sharding, eval coverage, iterator state, bad data."""

import numpy as np
import pytest

import tiny_tfds
from chainjax import config as config_lib
from chainjax import experiment
from chainjax.data import base
from chainjax.data import pipeline
from chainjax.data import tfds_data
from helpers import load_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tiny_tfds.build(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, arg="runlocal", **overrides):
  return load_config("fashion_mnist_cnn", arg, **{"data.name": tiny_tfds.NAME, "data.data_dir": data_dir,
                                                  **overrides})


def tiny_task(data_dir, **overrides):
  return tfds_data.image_classification_task(tiny_config(data_dir, **overrides))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def image_ids(batch):
  """Identifies each example by its pixels (all 50 training images differ)."""
  return [x.tobytes() for x in batch["inputs"]]


def test_task_reads_shapes_and_classes_from_tfds(data_dir):
  task = tiny_task(data_dir)
  assert task.input_shape == (8, 8, 1) and task.input_dtype == np.float32
  assert [s.num_classes for s in task.label_specs] == [3, 3, 3]
  assert (task.train_size, task.eval_size) == (50, 13)
  batch = next(task.train_iterator(8, base.Shard()))
  assert batch["inputs"].shape == (8, 8, 8, 1) and batch["inputs"].dtype == np.float32
  assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
  assert [l.shape for l in batch["labels"]] == [(8,)] * 3
  np.testing.assert_array_equal(batch["mask"], np.ones(8))


def test_epochs_drop_the_remainder_and_reshuffle(data_dir):
  task = tiny_task(data_dir)
  batches = take(task.train_iterator(8, base.Shard()), 12)  # 6 batches (48 of 50 examples) per epoch
  epoch_0 = [i for b in batches[:6] for i in image_ids(b)]
  epoch_1 = [i for b in batches[6:] for i in image_ids(b)]
  assert len(set(epoch_0)) == len(set(epoch_1)) == 48
  assert epoch_0 != epoch_1
  again = take(task.train_iterator(8, base.Shard()), 12)
  assert [image_ids(b) for b in again] == [image_ids(b) for b in batches]
  other_seed = take(tiny_task(data_dir, seed=1).train_iterator(8, base.Shard()), 6)
  assert [image_ids(b) for b in other_seed] != [image_ids(b) for b in batches[:6]]


def test_two_processes_read_disjoint_halves_whose_union_is_the_global_batch(data_dir):
  task = tiny_task(data_dir)
  single = take(task.train_iterator(8, base.Shard(0, 1)), 9)
  halves = [take(task.train_iterator(8, base.Shard(p, 2)), 9) for p in range(2)]
  for step in range(9):
    first, second = halves[0][step], halves[1][step]
    assert first["inputs"].shape[0] == second["inputs"].shape[0] == 4
    assert not set(image_ids(first)) & set(image_ids(second))
    np.testing.assert_array_equal(np.concatenate([first["inputs"], second["inputs"]]), single[step]["inputs"])
    for a, b, whole in zip(first["labels"], second["labels"], single[step]["labels"]):
      np.testing.assert_array_equal(np.concatenate([a, b]), whole)


@pytest.mark.parametrize("count", [1, 2])
def test_eval_covers_every_example_once_with_padding(data_dir, count):
  task = tiny_task(data_dir)
  per_process = [list(task.eval_iterator(8, base.Shard(p, count))) for p in range(count)]
  assert all(len(batches) == 2 for batches in per_process)  # 13 examples in 2 global batches of 8
  merged = [np.concatenate([per_process[p][i]["inputs"] for p in range(count)]) for i in range(2)]
  masks = [np.concatenate([per_process[p][i]["mask"] for p in range(count)]) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(masks), [1] * 13 + [0] * 3)
  inputs = np.concatenate(merged)[:13]
  expected = np.stack([np.asarray(task.eval_source[i]["image"], np.float32) / 255 for i in range(13)])
  np.testing.assert_allclose(inputs, expected, rtol=1e-6)
  assert not np.concatenate(merged)[13:].any()


def test_iterator_state_continues_with_the_next_batch(data_dir):
  task = tiny_task(data_dir)
  iterator = task.train_iterator(8, base.Shard())
  take(iterator, 7)
  state = iterator.get_state()
  assert state == base.iterator_state_at(iterator, 7)
  expected = take(iterator, 3)
  resumed = task.train_iterator(8, base.Shard())
  resumed.set_state(state)
  assert [image_ids(b) for b in take(resumed, 3)] == [image_ids(b) for b in expected]


def test_step_task_iterator_slices_its_rows_and_keeps_its_position():
  task = load_config("default", "runlocal")
  from chainjax import data as data_lib
  parity = data_lib.get_task(task)
  whole = parity.train_batch(3, 16)
  iterator = parity.train_iterator(16, base.Shard(1, 2))
  iterator.set_state(base.iterator_state_at(iterator, 3))
  np.testing.assert_array_equal(next(iterator)["inputs"], whole["inputs"][8:])
  assert iterator.get_state() == {"next_step": 4}


def test_in_memory_source_through_the_same_pipeline():
  source = pipeline.ArraySource(x=np.arange(10, dtype=np.float32), y=np.arange(10) % 2)
  task = pipeline.GrainTask(name="toy", train_source=source, eval_source=source,
                            transform=lambda r: {"inputs": r["x"][None], "labels": (np.float32(r["y"]),)},
                            input_shape=(1,), input_dtype=np.float32, label_specs=(base.LabelSpec("y"),), seed=0)
  epoch = np.concatenate([b["inputs"][:, 0] for b in take(task.train_iterator(5, base.Shard()), 2)])
  assert sorted(epoch.tolist()) == list(range(10))


# --- bad data: one line naming the field and the fix, before anything trains --------------------


def _error(config) -> str:
  with pytest.raises(config_lib.ConfigError) as info:
    experiment.validate(config, num_devices=8)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_missing_dataset_names_the_prepare_command(data_dir, tmp_path):
  message = _error(tiny_config(str(tmp_path), **{"data.name": "fashion_mnist"}))
  assert message.startswith(f"config.data.data_dir: TFDS dataset 'fashion_mnist' is not prepared in {tmp_path}")
  assert f"python -m chainjax.data.prepare fashion_mnist --data_dir={tmp_path}" in message
  assert not list(tmp_path.iterdir())  # looking did not create anything


def test_wrong_data_dir_unknown_name_bad_split_empty_split(data_dir, tmp_path):
  missing = str(tmp_path / "nope")
  assert _error(tiny_config(missing)).startswith(f"config.data.data_dir: '{missing}' does not exist")
  assert _error(tiny_config(data_dir, **{"data.name": "no_such_set"})).startswith(
      "config.data.name: 'no_such_set' is neither a TFDS dataset nor prepared in")
  message = _error(tiny_config(data_dir, **{"data.split_eval": "validation"}))
  assert message.startswith("config.data.split_eval: 'validation' is not a split of chainjax_tiny_images")
  assert message.endswith("available: train, test")
  assert _error(tiny_config(data_dir, **{"data.split_train": "train[:0]"})) == (
      "config.data.split_train: split 'train[:0]' of chainjax_tiny_images has no examples")


def test_stages_that_do_not_fit_the_images_are_named(data_dir):
  from chainjax import stages
  config = tiny_config(data_dir)
  config.chain.stages[0] = stages.stage_config("lstm", name="conv1", features=8)
  message = _error(config)
  assert message.startswith("config.chain.stages"), message
  assert "(8, 8, 1)" in message or "rank" in message, message


def test_batch_larger_than_the_split(data_dir):
  message = _error(tiny_config(data_dir, batch_size=64, **{"optim.warmup_steps": 0}))
  assert "batch_size" in message, message


# --- epoch-based runs ---------------------------------------------------------------------------


def test_epoch_run_evaluates_each_epoch_and_total_steps_caps_it(data_dir, tmp_path, caplog):
  import logging

  from chainjax import metrics
  from chainjax import train

  caplog.set_level(logging.INFO)
  final = train.train_and_evaluate(tiny_config(data_dir, "runlocal,epochs=3"), str(tmp_path / "epochs"))
  assert final["step"] == 18  # 3 epochs of 50 // 8 = 6 updates
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path / "epochs"))] == [6, 12, 18]
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
  assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
  assert " - val_accuracy: " in lines[-1]

  capped = train.train_and_evaluate(tiny_config(data_dir, "runlocal,epochs=3", total_steps=8),
                                    str(tmp_path / "capped"))
  assert capped["step"] == 8
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path / "capped"))] == [6, 8]


def test_split_test_is_evaluated_once_at_the_end(data_dir, tmp_path):
  from chainjax import metrics
  from chainjax import train

  config = tiny_config(data_dir, "runlocal,epochs=2", **{"data.split_eval": "train[:20]",
                                                         "data.split_test": "test"})
  final = train.train_and_evaluate(config, str(tmp_path))
  records = metrics.read_metrics(str(tmp_path))
  assert "test/accuracy" not in records[0] and "test/accuracy" in records[-1]
  assert final["test/accuracy"] == records[-1]["test/accuracy"]


def test_bad_data_from_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path):
  import subprocess
  import sys

  from helpers import REPO

  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "chainjax.main", "--config=configs/fashion_mnist_cnn.py",
                         f"--config.data.data_dir={tmp_path}", f"--workdir={workdir}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("chainjax: error:")]
  assert errors == [f"chainjax: error: config.data.data_dir: TFDS dataset 'fashion_mnist' is not prepared in "
                    f"{tmp_path}; run `python -m chainjax.data.prepare fashion_mnist --data_dir={tmp_path}` "
                    "(nothing is downloaded at run time)"]
  assert not workdir.exists()


def test_progressive_phase_steps_are_checked_against_the_updates_of_an_epoch_run(data_dir):
  """3 epochs of 6 updates: phase budgets must add up to those 18 updates, not to the raw total_steps."""
  config = tiny_config(data_dir, "runlocal,epochs=3", **{"chain.mode": "progressive", "total_steps": 0})
  config.chain.loss_weights = ()
  config.chain.phase_steps = (6, 6, 6)
  experiment.validate(config, num_devices=8)
  config.chain.phase_steps = (5, 5, 5)
  with pytest.raises(config_lib.ConfigError, match=r"^config.chain.phase_steps: needs one budget per stage \(3\) "
                     r"summing to the run's 18 updates \(num_epochs=3, total_steps=0\), got \(5, 5, 5\)"):
    experiment.validate(config, num_devices=8)
