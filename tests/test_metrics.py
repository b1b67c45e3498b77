"""ROC AUC (exact and thresholded), Keras-like epoch lines, and the eval AUC of a training run."""

import itertools
import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from chainjax import metrics


def reference_auc(scores, labels):
  """P(positive scored above negative) + 1/2 P(tie), over all pairs: the definition, O(n^2)."""
  pos = [s for s, y in zip(scores, labels) if y]
  neg = [s for s, y in zip(scores, labels) if not y]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("levels", [3, 50, None])  # heavy ties, some ties, continuous
def test_exact_auc_matches_the_pairwise_definition(levels):
  rng = np.random.default_rng(levels or 0)
  labels = rng.integers(0, 2, 600)
  scores = rng.normal(size=600) + labels
  if levels:
    scores = np.round(scores * levels / 4) / levels
  assert metrics.roc_auc(scores, labels) == pytest.approx(reference_auc(scores, labels), abs=1e-12)


def test_exact_auc_known_values_mask_and_degenerate_cases():
  assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # the scikit-learn docs example
  assert metrics.roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # all tied
  assert metrics.roc_auc([3, 2, 1], [1, 1, 0]) == 1.0
  # masked-out (padding) examples do not count, whatever their score
  assert metrics.roc_auc([0.1, 0.9, 5.0, -5.0], [0, 1, 0, 1], mask=[1, 1, 0, 0]) == 1.0
  assert np.isnan(metrics.roc_auc([0.2, 0.3], [1, 1]))


def test_thresholded_auc_of_summed_batches_is_close_to_exact():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 4000).astype(np.float32)
  logits = (rng.normal(size=4000) + 1.5 * labels).astype(np.float32)
  mask = np.ones(4000, np.float32)
  counts = sum(np.asarray(metrics.auc_counts(jnp.asarray(logits[i:i + 500]), jnp.asarray(labels[i:i + 500]),
                                             jnp.asarray(mask[i:i + 500]))) for i in range(0, 4000, 500))
  assert metrics.auc_from_counts(counts) == pytest.approx(metrics.roc_auc(logits, labels), abs=5e-3)
  records = [{"stage_1/auc_counts": counts / 2, "loss": 1.0, "loss_scale": 8.0},
             {"stage_1/auc_counts": counts / 2, "loss": 3.0, "loss_scale": 4.0}]
  sums = {"stage_1/auc_counts": np.zeros_like(counts), "loss": 0.0, "loss_scale": 0.0, "steps": 0.0}
  for record in records:
    sums = metrics.add_to_sums(sums, record)
  summary = metrics.mean_of_sums(sums)
  assert sums["steps"] == 2.0 and summary["loss"] == 2.0 and "stage_1/auc_counts" not in summary
  assert summary["loss_scale"] == 4.0  # a state metric: its last value
  assert summary["stage_1/auc"] == pytest.approx(metrics.auc_from_counts(counts))


def test_epoch_line_is_keras_like():
  record = {"train/loss": 0.33, "train/auc": 0.85, "train/accuracy": 0.8, "eval/loss": 0.41, "eval/auc": 0.81}
  assert metrics.epoch_line(3, 20, 12.4, record) == (
      "Epoch 3/20 - 12s - loss: 0.3300 - auc: 0.8500 - val_loss: 0.4100 - val_auc: 0.8100")
  assert metrics.epoch_line(1, 5, 90, {"train/loss": 1.0, "train/accuracy": 0.5, "eval/loss": 2.0,
                                       "eval/accuracy": 0.25}) == (
      "Epoch 1/5 - 90s - loss: 1.0000 - accuracy: 0.5000 - val_loss: 2.0000 - val_accuracy: 0.2500")


def test_eval_auc_is_the_exact_auc_of_the_whole_padded_eval_set():
  """`Experiment.evaluate` on 8 devices, eval set not a multiple of the batch: AUC of the model's own logits."""
  import jax
  from flax import nnx

  from chainjax import experiment
  from chainjax.data import base
  from helpers import load_config

  config = load_config("default", "runlocal", seed=3, **{"data.eval_size": 300, "eval_batch_size": 64})
  exp = experiment.Experiment(config)
  task, state = exp.task, exp.init_state()
  with jax.set_mesh(exp.mesh):
    result = exp.evaluate(state, task.eval_iterator(64, base.Shard()))
  model = nnx.merge(exp.graphdef, state.params, state.rest)
  inputs, labels = task._eval  # the whole held-out set, unpadded
  logits = model(jnp.asarray(inputs)).predictions[-1]
  expected = metrics.roc_auc(np.asarray(logits), labels[-1])
  assert result["eval/auc"] == result["eval/stage_3/auc"] == pytest.approx(expected, abs=1e-9)
  assert "eval/stage_1/auc" not in result  # stage 1 predicts 4 bits per example: no single ROC
  # Loss and accuracy: the 300 real examples only (the last batch holds 20 padded rows), each counted once.
  _, by_hand = exp.loss_fn(model(jnp.asarray(inputs)), [jnp.asarray(y) for y in labels], jnp.ones(300))
  for key in ("stage_1/loss", "stage_1/accuracy", "stage_2/loss", "stage_2/accuracy", "stage_3/loss",
              "stage_3/accuracy"):
    assert result[f"eval/{key}"] == pytest.approx(float(by_hand[key]), rel=1e-5), key
  assert result["eval/loss"] == pytest.approx(sum(float(by_hand[f"stage_{i}/loss"]) * w for i, w in
                                                  zip((1, 2, 3), config.chain.loss_weights)), rel=1e-5)
  assert result["eval/accuracy"] == result["eval/stage_3/accuracy"]


# --------------------------------------------------------------------------------------------
# MetricWriter.resume: after a crash, kill or set-aside checkpoint each step is on record at most once.
# --------------------------------------------------------------------------------------------


def _launch(workdir, restored_step, steps, loss=0.0):
  """One training launch as train.py drives the writer: resume at the restored step, then an eval per step."""
  writer = metrics.MetricWriter(str(workdir))
  writer.resume(restored_step)
  for step in steps:
    writer.write(step, {"train/loss": loss + step / 1000, "eval/accuracy": 0.5})
  writer.close()  # a SIGKILL would skip this; the flushed event file is what a kill leaves at worst


def _steps(workdir):
  return [r["step"] for r in metrics.read_metrics(str(workdir))]


def _events(folder):
  """(tag, step, value, wall_time) of every scalar in the event files of `folder`, in TensorBoard's reading
  order (files by name, records in order). An independent reader: TFRecord framing, then the Event proto."""
  import struct

  from tensorboardX.proto import event_pb2

  out = []
  for name in sorted(n for n in os.listdir(folder) if "tfevents" in n):
    data, pos = open(os.path.join(folder, name), "rb").read(), 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 16 + length > len(data):
        break
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      out += [(v.tag, event.step, v.simple_value, event.wall_time) for v in event.summary.value]
      pos += 16 + length
  return out


def _tb_steps(workdir, tag="train/loss"):
  return [step for t, step, _, _ in _events(workdir / "tensorboard") if t == tag]


def test_fresh_start_rotates_the_old_run_aside_and_starts_empty(tmp_path):
  _launch(tmp_path, None, [500, 1000])
  old_jsonl = (tmp_path / "metrics.jsonl").read_bytes()
  _launch(tmp_path, None, [500], loss=7.0)  # no checkpoint restored: a new run in the same workdir
  assert _steps(tmp_path) == [500]
  assert metrics.read_metrics(str(tmp_path))[0]["train/loss"] == 7.5
  assert (tmp_path / "metrics.jsonl.1").read_bytes() == old_jsonl  # moved, byte for byte, never deleted
  assert _tb_steps(tmp_path) == [500] and _tb_steps(tmp_path, "eval/accuracy") == [500]
  # The old event file: hidden from TensorBoard (no "tfevents" in its name at any depth), its data intact.
  hidden = tmp_path / "tensorboard.old" / "1"
  (name,) = os.listdir(hidden)
  assert "tfevents" not in name and "superseded" in name
  os.rename(hidden / name, hidden / name.replace("superseded", "tfevents"))
  assert [step for tag, step, _, _ in _events(hidden) if tag == "train/loss"] == [500, 1000]
  # A third fresh start takes the next free number.
  _launch(tmp_path, 0, [100])
  assert _steps(tmp_path) == [100]
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl.2").read_text().splitlines()] == [500]
  assert len(os.listdir(tmp_path / "tensorboard.old" / "2")) == 1 and _tb_steps(tmp_path) == [100]


def test_resume_keeps_each_step_up_to_the_restored_one_exactly_once(tmp_path):
  # What the old writer left after a kill before the first checkpoint (no rotation): 500 and 1000 repeat.
  rows = [(500, 1.0), (500, 2.0), (1000, 2.0), (500, 3.0), (1000, 3.0), (1500, 3.0)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in rows))
  writer = metrics.MetricWriter(str(tmp_path))
  writer.resume(1000)
  # Steps > 1000 gone, each step <= 1000 once: its last row (the run whose state was checkpointed).
  assert [(r["step"], r["loss"]) for r in metrics.read_metrics(str(tmp_path))] == [(500, 3.0), (1000, 3.0)]
  writer.write(1500, {"loss": 4.0})
  writer.close()
  assert _steps(tmp_path) == [500, 1000, 1500]
  # A resume past every row changes nothing: not even the bytes.
  before = (tmp_path / "metrics.jsonl").read_bytes()
  metrics.MetricWriter(str(tmp_path)).resume(2000)
  assert (tmp_path / "metrics.jsonl").read_bytes() == before
  assert not (tmp_path / "metrics.jsonl.corrupt").exists()


def test_unparseable_lines_go_to_a_side_file_with_one_warning(tmp_path, caplog):
  good = [json.dumps({"step": s, "loss": 0.1}).encode() for s in (500, 1000)]
  bad = [b"\x00\xff garbage", b"[1, 2]", b'{"loss": 1.0}', b'{"step": "1e3"}']
  half = b'{"step": 1500, "eval/lo'  # a kill in the middle of a write: no newline
  (tmp_path / "metrics.jsonl").write_bytes(b"\n".join([good[0], bad[0], bad[1], good[1], bad[2], bad[3], half]))
  writer = metrics.MetricWriter(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    writer.resume(1500)  # the old writer: JSONDecodeError, on every relaunch
  assert _steps(tmp_path) == [500, 1000]
  assert (tmp_path / "metrics.jsonl.corrupt").read_bytes() == b"".join(line + b"\n" for line in [*bad, half])
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "moved 5 unparseable line(s)" in warnings[0].getMessage()
  writer.write(1500, {"loss": 0.2})  # appended on a clean line, not glued to the cut one
  writer.close()
  assert _steps(tmp_path) == [500, 1000, 1500]
  # The side file grows, never loses a line; a fresh start rotates it with its run.
  (tmp_path / "metrics.jsonl").write_bytes((tmp_path / "metrics.jsonl").read_bytes() + b"oops")
  metrics.MetricWriter(str(tmp_path)).truncate_after(1500)  # the old entry point: no crash either
  assert (tmp_path / "metrics.jsonl.corrupt").read_bytes().endswith(half + b"\noops\n")
  assert _steps(tmp_path) == [500, 1000, 1500]
  metrics.MetricWriter(str(tmp_path)).resume(None)
  assert (tmp_path / "metrics.jsonl.1.corrupt").exists() and not (tmp_path / "metrics.jsonl.corrupt").exists()


def test_crash_before_the_first_checkpoint_then_set_aside_checkpoints_repeat_no_step(tmp_path):
  """The probe's sequences: evals at 500 and 1000, killed before any checkpoint; relaunched (fresh), killed
  after the 1500 checkpoint; resumed at 1500 to 2500; then every checkpoint set aside: fresh again."""
  _launch(tmp_path, None, [500, 1000])
  _launch(tmp_path, None, [500, 1000, 1500, 2000])
  _launch(tmp_path, 1500, [2000, 2500])
  assert _steps(tmp_path) == [500, 1000, 1500, 2000, 2500]  # the old writer: [500, 1000, 500, 1000, 1500, ...]
  assert _tb_steps(tmp_path) == [500, 1000, 1500, 2000, 2500]
  assert _tb_steps(tmp_path, "eval/accuracy") == [500, 1000, 1500, 2000, 2500]
  _launch(tmp_path, None, [500, 1000])  # all checkpoints set aside as corrupt: nothing restored
  assert _steps(tmp_path) == [500, 1000] and _tb_steps(tmp_path) == [500, 1000]
  assert sorted(os.listdir(tmp_path / "tensorboard.old")) == ["1", "2", "resumed-at-1500"]


def test_tensorboard_after_resume_holds_each_step_once_with_its_original_time(tmp_path, caplog):
  _launch(tmp_path, None, [500, 1000, 1500, 2000], loss=1.0)
  before = {(tag, step): (value, wall) for tag, step, value, wall in _events(tmp_path / "tensorboard")}
  # The dead launch's event file was cut in the middle of a record.
  (name,) = os.listdir(tmp_path / "tensorboard")
  data = (tmp_path / "tensorboard" / name).read_bytes()
  (tmp_path / "tensorboard" / name).write_bytes(data[:-7])
  with caplog.at_level(logging.WARNING):
    _launch(tmp_path, 1000, [1500, 2000], loss=2.0)
  events = _events(tmp_path / "tensorboard")
  for tag in ("train/loss", "eval/accuracy"):
    assert [step for t, step, _, _ in events if t == tag] == [500, 1000, 1500, 2000]
  assert any("unreadable from byte" in r.getMessage() for r in caplog.records)  # the cut record: a warning
  by_key = {(tag, step): (value, wall) for tag, step, value, wall in events}
  assert by_key[("train/loss", 1000)] == before[("train/loss", 1000)]  # copied: same value, same wall time
  assert by_key[("train/loss", 1500)][0] == pytest.approx(3.5)  # the resumed run's value, not the dead one's
  assert by_key[("train/loss", 1500)][1] > before[("train/loss", 2000)][1]
  # The cut original is kept, renamed so TensorBoard skips it.
  assert [n.replace("tfevents", "superseded") for n in [name]] == os.listdir(
      tmp_path / "tensorboard.old" / "resumed-at-1000")


def test_a_resume_killed_midway_loses_nothing_and_the_next_one_finishes(tmp_path, monkeypatch):
  _launch(tmp_path, None, [500, 1000, 1500])
  (tmp_path / "metrics.jsonl.tmp").write_text("left by an earlier kill")
  real_hide = metrics._hide

  def killed(*args):
    raise KeyboardInterrupt("SIGKILL stand-in: after the new event file, before the old ones moved")

  monkeypatch.setattr(metrics, "_hide", killed)
  with pytest.raises(KeyboardInterrupt):
    metrics.MetricWriter(str(tmp_path)).resume(1000)
  assert _steps(tmp_path) == [500, 1000]
  monkeypatch.setattr(metrics, "_hide", real_hide)
  _launch(tmp_path, 1000, [1500])
  assert _steps(tmp_path) == [500, 1000, 1500]
  assert _tb_steps(tmp_path) == [500, 1000, 1500]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_disabled_writer_touches_nothing(tmp_path):
  _launch(tmp_path, None, [500, 1000])
  listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
  jsonl = (tmp_path / "metrics.jsonl").read_bytes()
  for step in (None, 500):  # not process 0: neither a fresh start nor a resume moves or cuts anything
    writer = metrics.MetricWriter(str(tmp_path), enabled=False)
    writer.resume(step)
    writer.write(1500, {"loss": 1.0})
    writer.close()
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == listing
  assert (tmp_path / "metrics.jsonl").read_bytes() == jsonl
