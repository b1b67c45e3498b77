"""Metrics and where they go: JSONL and TensorBoard in the workdir, a progress bar, Keras-like lines.

Only process 0 writes (the multi-host issue relies on it): other processes get
writers that do nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

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
  """Appends one JSON object per call to `<workdir>/metrics.jsonl` and writes TensorBoard scalars."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"  # local or gs://
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow

      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"), flush_secs=30)

  def truncate_after(self, step: int) -> None:
    """Drops records newer than `step` (written by a run that died before its next checkpoint)."""
    if not self.enabled or not self.path.exists():
      return
    records = [line + "\n" for line in self.path.read_text().splitlines()
               if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = self.path.with_name(self.path.name + ".tmp")
    tmp.write_text("".join(records))
    tmp.replace(self.path)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in metrics.items():
      self._tb.add_scalar(key, float(value), global_step=int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


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


def mean_metrics(records: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
  """Mean of each key over a list of per-step metric dicts (fetched from device); last value of state metrics.

  `<stage>/auc_counts` (per-step threshold counts, see `auc_counts`) become `<stage>/auc` of the whole interval.
  """
  if not records:
    return {}
  out = {}
  for k in records[0]:
    if k.endswith(AUC_COUNTS):
      out[k[: -len(AUC_COUNTS)] + "auc"] = auc_from_counts(np.sum([r[k] for r in records], axis=0))
    else:
      out[k] = float(records[-1][k] if k in STATE_METRICS else np.mean([r[k] for r in records]))
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
