"""`--mode=compress`: post-training quantization of a trained workdir, its report, per-stage sensitivity.

`compress(config, workdir)` reads the newest good checkpoint of `workdir` (read-only; the run may be
float, QAT or pruned) and evaluates on the held-out set (the test split where the task has one,
else the eval split):

  * `float`: the trained parameters in float32, on the chain without fake quantization;
  * `qat`: for a QAT run (`config.compress.qat`), the chain as it was trained, fake quantization on;
  * `ptq_int<b>` for each `config.compress.ptq_bits`: every kernel and embedding table as b-bit
    integers with per-output-channel float32 scales (`compress.ptq`; int4 packed two per byte),
    dequantized on the device before the evaluation. The matmuls themselves run in float32: the
    activations of a PTQ chain are float, so there is no integer matmul to run (XLA's CPU and GPU
    backends do have int8 x int8 -> int32 dots; a chain trained with activation quantization could
    use them, which this mode does not do yet).

The integer parameters are written with Orbax to `W/compress/int<b>/` (values, scales, and the float
biases), tagged with the step and the `fingerprint` of the float parameters they come from; a later
`--mode=compress` on the same parameters reads them instead of quantizing again (other parameters, e.g.
after training on, replace them). `W/compress/report.json` holds, per stage and in
total, the parameter bytes in float32, int8, int4 and sparse form, the sparsity, and every variant's
metrics. With `config.compress.sensitivity`, each stage is also quantized alone (each of `ptq_bits`)
and pruned alone (one-shot, layer-wise, each of `sensitivity_sparsity`), and the drop of the headline
metric per stage and setting goes to the report and to `W/compress/sensitivity.png`.

Nothing is written before every check has passed: a bad field, a workdir without a checkpoint, or a
config whose QAT setting differs from the checkpoint's is one error naming what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from chainjax import chain as chain_lib
from chainjax import checkpoint as checkpoint_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import experiment as experiment_lib
from chainjax import metrics as metrics_lib
from chainjax.compress import prune as prune_lib
from chainjax.compress import ptq
from chainjax.compress import quant
from chainjax.errors import ConfigError, WorkdirError

COMPRESS_DIR = "compress"
REPORT = "report.json"
PLOT = "sensitivity.png"
METRIC_NAMES = ("auc", "accuracy")  # the headline metric: the first the task reports


# --------------------------------------------------------------------------------------------
# Checks (before anything is built or written).
# --------------------------------------------------------------------------------------------


def _qat_setting(compress: dict) -> tuple[tuple[str, ...], int]:
  qat = compress.get("qat", {}) if isinstance(compress, dict) else {}
  return tuple(qat.get("rules", ())), int(qat.get("boundary_bits", 0))


def has_qat(config: ml_collections.ConfigDict) -> bool:
  return bool(config.compress.qat.rules) or config.compress.qat.boundary_bits > 0


def validate(config: ml_collections.ConfigDict, workdir: str) -> tuple[int, dict]:
  """Checks the config's fields and the workdir; returns the newest checkpoint's `(step, metadata)`.

  Raises ConfigError naming the field, or WorkdirError for a workdir without a checkpoint.
  """
  config_lib.validate(config, jax.device_count())
  directory = os.path.join(workdir, "checkpoints")
  saved = None
  if epath.Path(directory).exists():
    checkpointer = checkpoint_lib.Checkpointer(directory, read_only=True)
    try:
      saved = checkpointer.latest_metadata()
    finally:
      checkpointer.close()
  if saved is None:
    raise WorkdirError(f"--workdir={workdir} has no checkpoint to compress: train it first "
                       f"(the same command without --mode=compress)")
  step, meta = saved
  trained = _qat_setting(meta.get("config", {}).get("compress", {}))
  wanted = (tuple(config.compress.qat.rules), int(config.compress.qat.boundary_bits))
  if trained != wanted:
    field = "compress.qat.rules" if trained[0] != wanted[0] else "compress.qat.boundary_bits"
    describe = lambda s: f"rules={list(s[0])}, boundary_bits={s[1]}" if s[0] or s[1] else "no QAT (float)"
    raise ConfigError(field, f"the checkpoint of {workdir} (step {step}) was trained with {describe(trained)}, "
                             f"this config has {describe(wanted)}: pass the run's own config "
                             f"(its fields are in {os.path.join(workdir, 'config.json')})")
  return step, meta


def _float_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` without QAT: the same chain and parameters, fake quantization off."""
  config = config.copy_and_resolve_references()
  config.compress.qat.rules = ()
  config.compress.qat.boundary_bits = 0
  config.compress.qat.start_step = 0
  config.compress.init_from = ""
  return config


# --------------------------------------------------------------------------------------------
# The job.
# --------------------------------------------------------------------------------------------


def held_out(exp: experiment_lib.Experiment) -> tuple[str, Callable[[], Any]]:
  """(split name, a function returning a fresh iterator over its padded batches): test if there is one."""
  shard = data_lib.Shard.of_this_process()
  size = exp.config.eval_batch_size
  if hasattr(exp.task, "test_iterator") and exp.task.test_iterator(size, shard) is not None:
    return "test", lambda: exp.task.test_iterator(size, shard)
  return "eval", lambda: exp.task.eval_iterator(size, shard)


def headline(metrics: dict[str, float], split: str) -> str:
  """The key of the metric a variant is judged by: `<split>/auc` if the task reports one, else accuracy."""
  for name in METRIC_NAMES:
    if f"{split}/{name}" in metrics:
      return f"{split}/{name}"
  return f"{split}/loss"


def fingerprint(host_params: Any) -> str:
  """SHA-256 of a parameter tree's paths, dtypes, shapes and bytes: which float model integers come from."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree.leaves_with_path(host_params):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def _quantized(exp: experiment_lib.Experiment, workdir: str, step: int, params, source: str, bits: int,
               axes: ptq.Axes):
  """The integer parameters of `params` (the checkpoint at `step`, whose `fingerprint` is `source`): read from
  `W/compress/int<bits>` when they were saved from exactly these parameters, else quantized and saved there
  (replacing the integers of an earlier model)."""
  directory = epath.Path(workdir) / COMPRESS_DIR / f"int{bits}"
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=exp.replicated),
                          ptq.abstract_quantized(params, bits, axes=axes))
  restored = None
  if directory.exists():
    reader = checkpoint_lib.Checkpointer(directory, read_only=True)
    try:
      restored = reader.restore_latest(abstract)
    except ValueError:  # another model's integers (other shapes)
      restored = None
    finally:
      reader.close()
  # Every process has decided from the same files before any of them writes.
  multihost_utils.sync_global_devices(f"chainjax-compress-int{bits}-read")
  if restored is not None and restored[2].get("source") == source and restored[2].get("bits") == bits:
    logging.info("Read the int%d parameters of step %d from %s.", bits, step, directory)
    return restored[1]
  if directory.exists():
    if jax.process_index() == 0:
      logging.info("Replacing %s: its integers come from other parameters.", directory)
      directory.rmtree()
    multihost_utils.sync_global_devices(f"chainjax-compress-int{bits}-cleared")
  qparams = jax.jit(lambda p: ptq.quantize_params(p, bits, axes=axes), out_shardings=exp.replicated)(params)
  writer = checkpoint_lib.Checkpointer(directory, max_to_keep=1)
  try:
    writer.save(step, qparams, {"bits": bits, "source_step": step, "source": source, "per_channel": True,
                                "packed_two_per_byte": bits <= ptq.PACKED_MAX_BITS}, force=True)
    writer.wait_until_finished()
  finally:
    writer.close()
  logging.info("Wrote the int%d parameters of step %d to %s.", bits, step, directory)
  return qparams


def _stage_select(stage: str) -> Callable[[tuple, Any], bool]:
  """Selects the weights (ndim >= 2) of one chain stage."""
  return lambda path, w: w.ndim >= 2 and chain_lib.stage_of_path(path) == stage


def _sensitivity(exp, state, evaluate, metric: str, reference: dict[str, float], axes: ptq.Axes) -> list[dict]:
  """One row per (stage, setting): the headline metric and the loss with only that stage quantized or pruned
  (the loss shows a stage's sensitivity also where the metric saturates, e.g. an accuracy of 1)."""
  config = exp.config
  loss = metric.split("/")[0] + "/loss"
  rows = []
  for stage in exp.stage_names:
    select = _stage_select(stage)
    settings = [(f"int{b}", jax.jit(lambda p, b=b: ptq.fake_quantize_params(p, b, select, axes=axes)))
                for b in config.compress.ptq_bits]
    settings += [(f"prune{round(s * 100)}", jax.jit(lambda p, s=s: prune_lib.prune_once(p, s, select)))
                 for s in config.compress.sensitivity_sparsity]
    for setting, transform in settings:
      metrics = evaluate(state._replace(params=transform(state.params)))
      rows.append({"stage": stage, "setting": setting, "metric": metrics[metric], "loss": metrics[loss],
                   "drop": _drop(metric, reference[metric], metrics[metric]),
                   "loss_increase": metrics[loss] - reference[loss]})
      logging.info("Sensitivity: %s %s: %s %.4f (drop %.4f), loss +%.4f.", stage, setting, metric,
                   rows[-1]["metric"], rows[-1]["drop"], rows[-1]["loss_increase"])
  return rows


def _drop(metric: str, reference: float, value: float) -> float:
  """How much worse `value` is than `reference` (a loss grows, an accuracy or AUC falls)."""
  return value - reference if metric.endswith("/loss") else reference - value


def plot_sensitivity(rows: list[dict], metric: str, path: "str | epath.Path") -> None:
  """Two panels of grouped bars, one group per stage and one bar per setting: the drop of `metric`, and
  the increase of the loss, with only that stage compressed."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  stages = list(dict.fromkeys(r["stage"] for r in rows))
  settings = list(dict.fromkeys(r["setting"] for r in rows))
  by_key = {(r["stage"], r["setting"]): r for r in rows}
  width = 0.8 / len(settings)
  panel = max(3.5, 1.4 * len(stages))
  fig, axes = plt.subplots(1, 2, figsize=(2 * panel + 1.4, 3.2), dpi=120)
  loss = metric.split("/")[0] + "/loss"
  for ax, key, label in ((axes[0], "drop", f"drop of {metric}"), (axes[1], "loss_increase", f"increase of {loss}")):
    for j, setting in enumerate(settings):
      xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(stages))]
      ax.bar(xs, [by_key[(s, setting)][key] for s in stages], width, label=setting)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_xlabel("stage compressed alone")
    ax.set_ylabel(label)
  axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), title="setting")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  plt.close(fig)
  metrics_lib.write_atomically(path, png.getvalue())


def compress(config: ml_collections.ConfigDict, workdir: str, heartbeat: Callable[[], None] = lambda: None) -> dict:
  """Runs `--mode=compress` on `workdir` (see the module docstring); returns the report."""
  start = time.perf_counter()
  step, _ = validate(config, workdir)
  float_exp = experiment_lib.Experiment(_float_config(config), workdir=workdir)
  restored = float_exp.restore(workdir, params_only=True)
  if restored is None:
    raise WorkdirError(f"--workdir={workdir}: no checkpoint restores (every step is incomplete or unreadable)")
  step, state, _ = restored
  split, batches = held_out(float_exp)
  axes = ptq.axes_of(quant.weight_channel_axes(nnx.merge(float_exp.graphdef, state.params, state.rest)))
  host_params = experiment_lib.host_arrays(state.params)
  source = fingerprint(host_params)

  def evaluate(state, exp=float_exp):
    return exp.evaluate(state, batches(), prefix=split, heartbeat=heartbeat)

  metrics = {"float": evaluate(state)}
  metric = headline(metrics["float"], split)
  if has_qat(config):
    qat_exp = experiment_lib.Experiment(config, workdir=workdir)
    metrics["qat"] = evaluate(qat_exp.restore(workdir, params_only=True)[1], qat_exp)
  for bits in config.compress.ptq_bits:
    qparams = _quantized(float_exp, workdir, step, state.params, source, bits, axes)
    params = jax.jit(lambda q, bits=bits: ptq.dequantize_params(q, state.params, bits),
                     out_shardings=float_exp.state_shardings.params)(qparams)
    metrics[f"ptq_int{bits}"] = evaluate(state._replace(params=params))
  stages = ptq.stage_bytes(host_params, axes)
  report = {
      "workdir": workdir if "://" in workdir else os.path.abspath(workdir), "step": step, "source": source, "split": split, "metric": metric,
      "weights": "integers with per-output-channel float32 scales, dequantized on the device before evaluation; "
                 "float32 matmuls (no integer matmul: PTQ activations are float); int4 packed two per byte",
      "stages": stages, "total": ptq.total_bytes(stages), "metrics": metrics,
  }
  if config.compress.sensitivity:
    report["sensitivity"] = _sensitivity(float_exp, state, evaluate, metric, metrics["float"], axes)
  report["seconds"] = round(time.perf_counter() - start, 1)
  if jax.process_index() == 0:
    out = epath.Path(workdir) / COMPRESS_DIR
    out.mkdir(parents=True, exist_ok=True)
    if "sensitivity" in report:
      plot_sensitivity(report["sensitivity"], metric, out / PLOT)
    metrics_lib.write_atomically(out / REPORT, json.dumps(report, indent=2, sort_keys=True))
  print(summary(report), flush=True)
  return report


def bytes_form(variant: str) -> str:
  """The `ptq.FORMS` entry a variant is stored in: float32, or int8 / int4 (widths <= 4 are packed)."""
  if not variant.startswith("ptq_int"):
    return "float32"
  return "int4" if int(variant[len("ptq_int"):]) <= ptq.PACKED_MAX_BITS else "int8"


def summary(report: dict) -> str:
  """The short table printed at the end: bytes per form and the headline metric of every variant."""
  total, metric, metrics = report["total"], report["metric"], report["metrics"]
  float_bytes = total["float32"]
  lines = [f"Compression of {report['workdir']} at step {report['step']} ({report['split']} set):",
           f"  {'variant':<10} {metric:>16} {'drop':>8} {'bytes':>12} {'x float32':>10}"]
  for name, values in metrics.items():
    nbytes = total[bytes_form(name)]
    drop = _drop(metric, metrics["float"][metric], values[metric])
    lines.append(f"  {name:<10} {values[metric]:>16.4f} {drop:>8.4f} {nbytes:>12,.0f} {nbytes / float_bytes:>10.3f}")
  lines.append(f"  sparse form: {total['sparse']:,} bytes ({total['sparse'] / float_bytes:.3f}x float32), "
               f"sparsity {total['sparsity']:.3f}")
  for row in report.get("sensitivity", ()):
    lines.append(f"  sensitivity {row['stage']:<12} {row['setting']:<9} {row['metric']:.4f} (drop {row['drop']:+.4f}), "
                 f"loss {row['loss']:.4f} ({row['loss_increase']:+.4f})")
  return "\n".join(lines)


__all__ = ["bytes_form", "compress", "fingerprint", "has_qat", "headline", "held_out", "plot_sensitivity", "summary",
           "validate"]
