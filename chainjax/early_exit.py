"""`--mode=early_exit_report`: what early exit through the chain's own heads buys, on the held-out set.

An example may leave the chain at the first stage whose head is confident enough (`config.inference`,
`chainjax.predict`): easy inputs cost one stage, hard ones the whole chain. For every threshold t of
`config.inference.report_thresholds`, each stage that may exit (a head that answers the last stage's task,
`predict.exit_capable`) gets t, and the report gives:

- the accuracy of the answers (each example answered by the head it exits at) and the mean number of
  stages computed per example, exactly, on the whole held-out set (the test split where the task has one):
  every head's probabilities are computed once and the exits follow from them;
- how many examples exit at each stage (they add up to the set's size);
- the measured latency, in ms per example, of `Predictor` at batch 256 and at batch 1, for the two ways
  it avoids the work of exited examples (`exit_impl`): "compact" (stage by stage, the exited examples
  taken out of the batch) and "mask" (one program that skips a stage once the whole batch has left),
  against the whole chain ("full", the first row of the table).

Written to `W/early_exit/curve.json` and `W/early_exit/curve.png` (accuracy against stages computed and
against latency) and printed as a table. The workdir's checkpoints are only read.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from chainjax import compression
from chainjax import metrics as metrics_lib
from chainjax import predict

REPORT_DIR = "early_exit"
CURVE = "curve.json"
PLOT = "curve.png"
LATENCY_BATCHES = (256, 1)
LATENCY_EXAMPLES = {256: 1024, 1: 128}  # examples timed per batch size (the first of the held-out set)
LATENCY_REPEATS = 3  # timed passes; the fastest counts


def held_out_set(predictor: predict.Predictor) -> tuple[str, np.ndarray, np.ndarray]:
  """(split, inputs, labels of the last stage) of this process's share of the held-out set, padding dropped."""
  split, batches = compression.held_out(predictor.experiment)
  inputs, labels = [], []
  for batch in batches():
    keep = np.asarray(batch["mask"]) > 0
    inputs.append(np.asarray(batch["inputs"])[keep])
    labels.append(np.asarray(batch["labels"][-1])[keep])
  return split, np.concatenate(inputs), np.concatenate(labels)


def exits(probabilities: dict[int, np.ndarray], capable: tuple[int, ...], threshold: float,
          binary: bool, last: int) -> np.ndarray:
  """[N] 1-based exit stage of every example when each stage in `capable` exits at `threshold`
  (`probabilities`: stage index -> that head's probabilities of the whole set)."""
  n = len(probabilities[last])
  stage = np.full(n, last + 1, np.int32)
  if threshold >= 1.0:
    return stage
  for i in sorted(capable, reverse=True):  # the first confident head wins
    stage = np.where(np.asarray(predict.confidence(probabilities[i], binary)) >= threshold, i + 1, stage)
  return stage


def _classes(p: np.ndarray, binary: bool) -> np.ndarray:
  return (p > 0.5).astype(np.int32) if binary else p.argmax(-1).astype(np.int32)


def _latency_ms(predictor: predict.Predictor, x: np.ndarray, batch: int, heartbeat: Callable[[], None]) -> float:
  """Milliseconds per example of `predictor` on the first examples of `x` in requests of `batch`."""
  x = x[:LATENCY_EXAMPLES[batch]]
  requests = [x[i:i + batch] for i in range(0, len(x), batch)]
  for request in requests:  # an untimed pass compiles every program the timed one runs (which stages run
    predictor(request)      # on which bucket sizes depends on the examples that exit)
  best = float("inf")
  for _ in range(LATENCY_REPEATS):  # the fastest pass: the least disturbed by other work on the machine
    start = time.perf_counter()
    for request in requests:
      predictor(request)
      heartbeat()
    best = min(best, time.perf_counter() - start)
  return 1e3 * best / len(x)


def curve(predictor: predict.Predictor, inputs: np.ndarray, labels: np.ndarray, thresholds,
          heartbeat: Callable[[], None] = lambda: None, latency: bool = True) -> list[dict]:
  """One row per threshold (see the module docstring), after a "full" row: the whole chain."""
  exp = predictor.experiment
  last, spec = exp.num_stages - 1, exp.task.label_specs[-1]
  capable = predictor.exit_capable
  predictor.exit_thresholds = {}
  whole = predictor(inputs)
  probabilities = {i: whole.stages[exp.stage_names[i]] for i in (*capable, last)}
  classes = {i: _classes(p, spec.is_binary) for i, p in probabilities.items()}
  predictors = {impl: predictor.with_exit_impl(impl) for impl in ("full", "compact", "mask")} if latency else {}
  rows = []
  for threshold in (None, *thresholds):
    stage = exits(probabilities, capable, 1.0 if threshold is None else threshold, spec.is_binary, last)
    chosen = classes[last]
    for i in capable:
      chosen = np.where((stage == i + 1).reshape((-1,) + (1,) * (chosen.ndim - 1)), classes[i], chosen)
    row = {"threshold": "full" if threshold is None else threshold,
           "accuracy": float(np.mean(chosen == labels)),
           "mean_stages": float(stage.mean()),
           "exits": [int(c) for c in np.bincount(stage, minlength=exp.num_stages + 1)[1:]]}
    for impl, p in predictors.items():
      if (impl == "full") != (threshold is None):
        continue
      p.exit_thresholds = {i: float(threshold) for i in capable if threshold is not None and threshold < 1.0}
      for batch in LATENCY_BATCHES:
        key = "full" if impl == "full" else impl
        row[f"{key}_ms_batch{batch}"] = _latency_ms(p, inputs, batch, heartbeat)
    rows.append(row)
    heartbeat()
  return rows


def report(config: ml_collections.ConfigDict, workdir: str, heartbeat: Callable[[], None] = lambda: None) -> dict:
  """Runs `--mode=early_exit_report` on `workdir` (see the module docstring); returns the report."""
  start = time.perf_counter()
  predictor = predict.Predictor.from_workdir(workdir, config=config, max_batch=max(LATENCY_BATCHES))
  split, inputs, labels = held_out_set(predictor)
  rows = curve(predictor, inputs, labels, tuple(config.inference.report_thresholds), heartbeat)
  exp = predictor.experiment
  result = {
      "workdir": workdir, "step": predictor.step, "split": split, "examples": int(len(inputs)),
      "stages": list(exp.stage_names),
      "exit_stages": [exp.stage_names[i] for i in predictor.exit_capable],
      "confidence": "max softmax probability (multi-class heads) or sigmoid margin |2p - 1| (binary heads)",
      "latency": f"ms per example on {jax.device_count()} {jax.devices()[0].platform} device(s), the first "
                 + ", ".join(f"{LATENCY_EXAMPLES[b]} examples at batch {b}" for b in LATENCY_BATCHES)
                 + f", the fastest of {LATENCY_REPEATS} passes after one untimed pass",
      "rows": rows,
  }
  if not predictor.exit_capable:
    result["note"] = ("no stage before the last has a head that answers the last stage's task, so every "
                      "example runs the whole chain")
  result["seconds"] = round(time.perf_counter() - start, 1)
  if jax.process_index() == 0:
    out = epath.Path(workdir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, exp.num_stages, out / PLOT)
    metrics_lib.write_atomically(out / CURVE, json.dumps(result, indent=2))
  print(summary(result), flush=True)
  return result


def summary(result: dict) -> str:
  """The table printed at the end: one line per threshold."""
  lines = [f"Early exit on {result['workdir']} at step {result['step']} ({result['split']} set, "
           f"{result['examples']} examples; exits at {', '.join(result['exit_stages']) or 'no stage'} "
           f"and {result['stages'][-1]}):",
           f"  {'threshold':>9} {'accuracy':>9} {'stages':>7} {'exits per stage':>22} "
           + " ".join(f"{k:>9}" for k in ("ms@256", "ms@1", "mask@256", "mask@1"))]
  for row in result["rows"]:
    impl = "full" if row["threshold"] == "full" else "compact"
    times = [row.get(f"{impl}_ms_batch256"), row.get(f"{impl}_ms_batch1"),
             row.get("mask_ms_batch256"), row.get("mask_ms_batch1")]
    threshold = row["threshold"] if isinstance(row["threshold"], str) else f"{row['threshold']:g}"
    lines.append(f"  {threshold:>9} {row['accuracy']:>9.4f} {row['mean_stages']:>7.3f} "
                 f"{'/'.join(map(str, row['exits'])):>22} "
                 + " ".join(f"{t:>9.3f}" if t is not None else f"{'':>9}" for t in times))
  if "note" in result:
    lines.append(f"  ({result['note']})")
  return "\n".join(lines)


def plot(rows: list[dict], num_stages: int, path: "str | epath.Path") -> None:
  """Accuracy against the mean stages computed, and against the latency per example (compact, mask)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  swept = [r for r in rows if r["threshold"] != "full"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
  ax = axes[0]
  ax.plot([r["mean_stages"] for r in swept], [r["accuracy"] for r in swept], "o-")
  for r in swept:
    ax.annotate(f"{r['threshold']:g}", (r["mean_stages"], r["accuracy"]), fontsize=6, textcoords="offset points",
                xytext=(3, 3))
  ax.set_xlabel("mean stages computed per example")
  ax.set_ylabel("accuracy")
  ax.set_xlim(0.9, num_stages + 0.1)
  ax = axes[1]
  full = rows[0]
  for key, style in (("compact_ms_batch256", "o-"), ("mask_ms_batch256", "s--"), ("compact_ms_batch1", "^-"),
                     ("mask_ms_batch1", "v--")):
    if key in swept[0]:
      ax.plot([r[key] for r in swept], [r["accuracy"] for r in swept], style, label=key.replace("_ms_batch", " @"))
  for batch, color in ((256, "gray"), (1, "black")):
    if f"full_ms_batch{batch}" in full:
      ax.axvline(full[f"full_ms_batch{batch}"], color=color, linestyle=":", label=f"whole chain @{batch}")
  ax.set_xscale("log")
  ax.set_xlabel("ms per example (log)")
  ax.set_ylabel("accuracy")
  ax.legend(fontsize="x-small")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  plt.close(fig)
  metrics_lib.write_atomically(path, png.getvalue())


__all__ = ["CURVE", "PLOT", "REPORT_DIR", "curve", "exits", "held_out_set", "plot", "report", "summary"]
