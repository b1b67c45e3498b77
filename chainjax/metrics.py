"""Metrics and where they go: JSONL and TensorBoard in the workdir, a progress bar, Keras-like lines.

Only process 0 writes (the multi-host issue relies on it): other processes get
writers that do nothing.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

import numpy as np
from absl import logging
from etils import epath


def keras_line(step: int, metrics: Mapping[str, float], prefix: str | None = None) -> str:
  """`step 1000 - loss: 0.2100 - accuracy: 0.9400 - eval_loss: ... - eval_accuracy: ...`."""
  keys = ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy")
  parts = [prefix or f"step {step}"]
  for key in keys:
    if key in metrics:
      name = key.split("/", 1)[1] if key.startswith("train/") else key.replace("/", "_")
      parts.append(f"{name}: {metrics[key]:.4f}")
  return " - ".join(parts)


def epoch_line(epoch: int, num_epochs: int, seconds: float, metrics: Mapping[str, float]) -> str:
  """Keras' per-epoch line: `Epoch 3/20 - 12s - loss: 0.3300 - auc: 0.8500 - val_loss: ... - val_auc: ...`.

  Shows AUC when the run has one (binary last stage), accuracy otherwise.
  """
  metric = "auc" if "eval/auc" in metrics or "train/auc" in metrics else "accuracy"
  parts = [f"Epoch {epoch}/{num_epochs}", f"{seconds:.0f}s"]
  for prefix, name in (("train/", ""), ("eval/", "val_")):
    for key in ("loss", metric):
      if prefix + key in metrics:
        parts.append(f"{name}{key}: {metrics[prefix + key]:.4f}")
  return " - ".join(parts)


class MetricWriter:
  """Appends one JSON object per eval to `<workdir>/metrics.jsonl` and writes the same scalars to TensorBoard.

  Call `resume(step)` once before the first `write`, with the restored checkpoint's step (None or 0 for a
  fresh start), so that the files hold each step at most once and only the history of the restored state:

  * fresh start: the previous run's `metrics.jsonl` becomes `metrics.jsonl.<n>` (n = 1, 2, ...: the first
    free number, so a larger n is a later rotation) and its TensorBoard event files move to
    `tensorboard.old/<n>/`. Nothing is deleted.
  * resume at step S: rows of steps > S (written by a run that died before its next checkpoint, or after a
    checkpoint that was later set aside) are dropped, a step written twice keeps its last row, and lines that
    do not parse (garbage, a row cut by a kill) go to `metrics.jsonl.corrupt` with one warning. The event
    files are rewritten the same way: their events of steps <= S go, once each and in step order, into one
    new event file, and the old files move to `tensorboard.old/resumed-at-<S>/`.

  Old event files are renamed `...superseded...` instead of `...tfevents...`: TensorBoard loads only files
  whose names contain "tfevents" (at any depth under its logdir), so a moved-aside run does not show up as
  an extra run or as duplicate points. Rename them back to look at them.

  Rewrites are atomic (a temporary file, then a rename), so a kill during `resume` loses no row: the next
  `resume` finishes the job. Paths go through etils.epath (the workdir may be gs://). With `enabled=False`
  (every process but the first) every method does nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"  # local or gs://
    self.corrupt_path = self.workdir / "metrics.jsonl.corrupt"
    self.tb_dir = self.workdir / "tensorboard"
    self._logdir = os.path.join(workdir, "tensorboard")
    self._tb = None  # created at the first write: after `resume` has moved old event files aside

  def resume(self, step: int | None) -> None:
    """Makes the files match the restored state: rotate them aside (`step` None or 0) or cut them at `step`."""
    if not self.enabled:
      return
    if not step:
      self._rotate()
    else:
      self._cut_jsonl(int(step))
      self._cut_events(int(step))

  def truncate_after(self, step: int) -> None:
    """Drops records newer than `step`: `resume(step)` for a restored step (kept for older callers)."""
    if not self.enabled:
      return
    self._cut_jsonl(int(step))
    self._cut_events(int(step))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is None:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow

      self._tb = SummaryWriter(logdir=self._logdir, flush_secs=30)
    for key, value in metrics.items():
      self._tb.add_scalar(key, float(value), global_step=int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()

  # ------------------------------------------------------------------------------------------
  # Fresh start.

  def _rotate(self) -> None:
    """Moves the previous run's metrics.jsonl (and its .corrupt side file) and event files aside."""
    events = _event_files(self.tb_dir)
    if not (self.path.exists() or self.corrupt_path.exists() or events):
      return
    n = 1
    while any(p.exists() for p in (self.workdir / f"metrics.jsonl.{n}", self.workdir / f"metrics.jsonl.{n}.corrupt",
                                   self.workdir / "tensorboard.old" / str(n))):
      n += 1
    moved = []
    if self.path.exists():
      self.path.rename(self.workdir / f"metrics.jsonl.{n}")
      moved.append(f"metrics.jsonl -> metrics.jsonl.{n}")
    if self.corrupt_path.exists():
      self.corrupt_path.rename(self.workdir / f"metrics.jsonl.{n}.corrupt")
      moved.append(f"metrics.jsonl.corrupt -> metrics.jsonl.{n}.corrupt")
    if events:
      _hide(events, self.workdir / "tensorboard.old" / str(n))
      moved.append(f"{len(events)} TensorBoard event file(s) -> tensorboard.old/{n}/")
    logging.info("Fresh start in %s: moved the previous run's files aside: %s.", self.workdir, "; ".join(moved))

  # ------------------------------------------------------------------------------------------
  # Resume at a step.

  def _cut_jsonl(self, step: int) -> None:
    """Keeps the last row of each step <= `step`, in step order; unparseable lines go to the side file."""
    if not self.path.exists():
      return
    data = self.path.read_bytes()
    rows: dict[int, bytes] = {}
    bad: list[tuple[int, bytes]] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
      if not line.strip():
        continue
      try:
        row_step = json.loads(line)["step"]
        if not isinstance(row_step, int) or isinstance(row_step, bool):
          raise TypeError(f"step {row_step!r}")
      except (ValueError, TypeError, KeyError, IndexError):  # bad JSON or UTF-8, not an object, no int step
        bad.append((number, line))
        continue
      if row_step <= step:
        rows.pop(row_step, None)
        rows[row_step] = line  # a step written twice: the later row wins
    text = b"".join(rows[s] + b"\n" for s in sorted(rows))
    if not bad and text == data:
      return
    if bad:  # first the side file: a kill before the rewrite then leaves the lines in both, none lost
      old = self.corrupt_path.read_bytes() if self.corrupt_path.exists() else b""
      write_atomically(self.corrupt_path, old + b"".join(line + b"\n" for _, line in bad))
      logging.warning("%s: moved %d unparseable line(s) (line %s: %r) to %s.", self.path, len(bad),
                      ", ".join(str(n) for n, _ in bad), bad[0][1][:80], self.corrupt_path)
    write_atomically(self.path, text)

  def _cut_events(self, step: int) -> None:
    """Copies the events of steps <= `step` (once each, in step order) to a new file; hides the old ones."""
    files = _event_files(self.tb_dir)
    if not files:
      return
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

    kept: dict[tuple, Any] = {}
    for path in files:  # tensorboardX names files by their creation time: oldest first
      for event in _read_events(path):
        if event.WhichOneof("what") == "file_version" or event.step > step:
          continue
        key = (event.step, event.WhichOneof("what"), tuple(v.tag for v in event.summary.value))
        kept.pop(key, None)
        kept[key] = event  # the same tag written twice at one step: the later one wins
    events = sorted(kept.values(), key=lambda e: e.step)  # TensorBoard drops data after a step that goes back
    name = None
    if events:
      # Named a second before the first kept event: sorts (TensorBoard reads files in name order) before the
      # file of the new writes, `events.out.tfevents.<now>.<host>`, even when both fall in the same second.
      wall_time = min(e.wall_time for e in events)
      name = f"events.out.tfevents.{int(wall_time) - 1:010d}.{socket.gethostname()}.upto-{step}"
      header = event_pb2.Event(wall_time=wall_time, file_version="brain.Event:2")
      write_atomically(self.tb_dir / name, b"".join(_record(e.SerializeToString()) for e in [header, *events]))
    stale = [p for p in files if p.name != name]
    if stale:
      _hide(stale, self.workdir / "tensorboard.old" / f"resumed-at-{step}")
    logging.info("Resumed at step %d: kept %d TensorBoard event(s) of steps <= %d; moved %d old event file(s) "
                 "to %s.", step, len(events), step, len(stale), self.workdir / "tensorboard.old")


def _event_files(tb_dir: epath.Path) -> list[epath.Path]:
  """The event files directly in `tb_dir` (where the writer puts them), by name: by creation time."""
  if not tb_dir.exists():
    return []
  return sorted((p for p in tb_dir.iterdir() if "tfevents" in p.name), key=lambda p: p.name)


def _hide(files: list[epath.Path], folder: epath.Path) -> None:
  """Moves event files to `folder`, renamed so that TensorBoard does not load them ("tfevents" -> "superseded")."""
  folder.mkdir(parents=True, exist_ok=True)
  for path in files:
    target = folder / path.name.replace("tfevents", "superseded")
    n = 1
    while target.exists():
      target = folder / (path.name.replace("tfevents", "superseded") + f".{n}")
      n += 1
    path.rename(target)


def write_atomically(path: str | epath.Path, data: bytes | str) -> None:
  """Writes a temporary file next to `path`, then renames it over `path`: readers (and a run killed
  meanwhile) see the old file or the new one, never half of one; also on gs://."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data.encode() if isinstance(data, str) else data)
  tmp.replace(path)


def _record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C (the event-file framing)."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top

  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _read_events(path: epath.Path) -> list:
  """The events of one event file, up to its first damaged or cut record (a kill during a write)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top

  data = path.read_bytes()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    ok = len(header) == 8 and data[pos + 8:pos + 12] == struct.pack("<I", masked_crc32c(header))
    if ok:
      (length,) = struct.unpack("<Q", header)
      payload = data[pos + 12:pos + 12 + length]
      ok = len(payload) == length and data[pos + 12 + length:pos + 16 + length] == struct.pack(
          "<I", masked_crc32c(payload))
    if ok:
      try:
        events.append(event_pb2.Event.FromString(payload))
      except Exception:  # pylint: disable=broad-except  # a valid checksum over bytes that are not an Event
        ok = False
    if not ok:
      logging.warning("%s: unreadable from byte %d of %d (a cut or damaged record); kept the %d events before it.",
                      path, pos, len(data), len(events))
      break
    pos += 16 + length
  return events


def read_metrics(workdir: str) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl`."""
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


class ProgressBar:
  """`[=====>    ] 1200/3000 ETA 0:01:12 - loss: 0.2100` on a terminal; a plain log line elsewhere."""

  def __init__(self, total: int, start: int = 0, *, enabled: bool = True, width: int = 30):
    self.total, self.start, self.width, self.enabled = total, start, width, enabled
    self.t0 = time.perf_counter()
    self.tty = sys.stderr.isatty()

  def update(self, step: int, loss: float) -> None:
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.t0
    done = max(step - self.start, 1)
    eta = elapsed / done * (self.total - step)
    frac = step / self.total
    filled = int(self.width * frac)
    bar = "=" * max(filled - 1, 0) + (">" if filled else "") + " " * (self.width - filled)
    text = f"[{bar}] {step}/{self.total} ETA {_hms(eta)} - loss: {loss:.4f}"
    if self.tty:
      sys.stderr.write("\r" + text + ("\n" if step >= self.total else ""))
      sys.stderr.flush()
    else:
      logging.info(text)

  def clear(self) -> None:
    if self.enabled and self.tty:
      sys.stderr.write("\r" + " " * (self.width + 60) + "\r")


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


STATE_METRICS = ("loss_scale", "skipped_steps")  # values of the train state: summarised by the last one


def add_to_sums(sums: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Running sums of per-step metrics (jnp or numpy; the train step calls it inside its program).

  Sums every metric and counts the steps in `"steps"`; state metrics keep their last value;
  `<stage>/auc_counts` (threshold counts, see `auc_counts`) add up like the rest.
  """
  out = {k: (v if k in STATE_METRICS else sums[k] + v) for k, v in metrics.items()}
  out["steps"] = sums["steps"] + 1.0
  return out


def mean_of_sums(sums: Mapping[str, Any]) -> dict[str, float]:
  """The interval's metrics from `add_to_sums` sums (fetched to the host): means, last state values,
  and `<stage>/auc` of the whole interval from its summed threshold counts."""
  steps = max(float(sums.get("steps", 0.0)), 1.0)
  out = {}
  for k, v in sums.items():
    if k == "steps":
      continue
    if k.endswith(AUC_COUNTS):
      out[k[: -len(AUC_COUNTS)] + "auc"] = auc_from_counts(np.asarray(v))
    else:
      out[k] = float(v) if k in STATE_METRICS else float(v) / steps
  return out


# --------------------------------------------------------------------------------------------
# ROC AUC.
# --------------------------------------------------------------------------------------------

AUC_COUNTS = "auc_counts"  # metric-name suffix of threshold counts
AUC_THRESHOLDS = 200  # as Keras' `AUC()` default


def roc_auc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Exact ROC AUC over every example with `mask` > 0: the Mann-Whitney U statistic.

  AUC = P(score of a random positive > score of a random negative) + 0.5 P(tie),
  computed from average ranks (ties share their mean rank), in O(n log n). NaN when
  one class is absent. `scores` may be logits or probabilities (only ranks count).
  """
  scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0.5
  if mask is not None:
    keep = np.asarray(mask).ravel() > 0
    scores, labels = scores[keep], labels[keep]
  num_pos, num_neg = int(labels.sum()), int((~labels).sum())
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average rank (1-based) of each run of equal scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], len(scores)]
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  u = ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0
  return float(u / (num_pos * num_neg))


def auc_counts(logits, labels, mask):
  """Per-batch counts for a thresholded ROC AUC (jnp; summed over steps): [2, AUC_THRESHOLDS + 1].

  Row 0 counts true positives, row 1 false positives, at probability thresholds
  evenly spaced in [0, 1] (the last column holds the positive and negative totals).
  Used for the training AUC of a Keras-like log line, which Keras also computes with
  200 thresholds; the eval AUC is exact (`roc_auc`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  probs = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(-1)
  positive = (labels.reshape(-1) > 0.5).astype(jnp.float32) * mask
  negative = (labels.reshape(-1) <= 0.5).astype(jnp.float32) * mask
  eps = 1e-7
  thresholds = jnp.concatenate([jnp.array([-eps]), jnp.linspace(0.0, 1.0, AUC_THRESHOLDS)[1:-1],
                                jnp.array([1.0 + eps])])
  above = (probs[None, :] > thresholds[:, None]).astype(jnp.float32)
  tp = jnp.append(above @ positive, positive.sum())
  fp = jnp.append(above @ negative, negative.sum())
  return jnp.stack([tp, fp])


def auc_from_counts(counts: np.ndarray) -> float:
  """ROC AUC (trapezoid rule) of summed `auc_counts`; NaN when one class is absent."""
  counts = np.asarray(counts, np.float64)
  tp, fp, num_pos, num_neg = counts[0, :-1], counts[1, :-1], counts[0, -1], counts[1, -1]
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  tpr, fpr = tp / num_pos, fp / num_neg
  return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0))
