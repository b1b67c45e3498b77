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
  """Mean of each key over a list of per-step metric dicts (fetched from device); last value of state metrics."""
  if not records:
    return {}
  return {k: float(records[-1][k] if k in STATE_METRICS else np.mean([r[k] for r in records]))
          for k in records[0]}
