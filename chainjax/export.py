"""`--mode=export`: a trained chain as files that serve without the workdir, and `load()` to run them.

`export_workdir(config, W)` restores the parameters of W's newest good checkpoint (`predict.Predictor`)
and writes `W/export/` (built beside it, then renamed into place: a failed export leaves the old one):

- `model.stablehlo`: `jax.export` serialized StableHLO of `Predictor.serving_fn` (the parameters are
  constants) with a symbolic batch dimension; `jax.export.deserialize` loads it without TensorFlow, and
  `load()` runs it.
- `saved_model/`: a TensorFlow SavedModel (`jax2tf`, needs the `export` extra: `pip install
  'chainjax[export]'`) with a `serving_default` signature, what TF Serving loads. Text models take raw
  strings there, tokenized inside the graph as in training (lowercase, `<br />` as a space, words of
  letters and digits with inner apostrophes, the run's vocabulary, `max_len` with the run's padding and
  truncation). The graph's regular expressions are RE2's, whose letters and digits are Unicode's
  `\\p{L}` and `\\p{N}`; Python's `\\w` also counts a few marks (e.g. combining accents), so a text with
  such characters may tokenize differently: the `serving_ids` signature takes the word ids instead.
- `model_float.tflite`, `model_dynamic_int8.tflite` (int8 weights, float activations) and
  `model_int8.tflite` (int8 weights and activations, calibrated on 256 training inputs; float input and
  output; divisions, i.e. the softmax's normalization, stay float): TFLite models of the same function (word ids for text models). A model that cannot convert is
  not written; the manifest's `errors` says which stage cannot and why, in one line.
- `manifest.json` (`FORMAT_VERSION` 1):
    files:    {name: {"bytes", "sha256"}} of every file written;
    input:    {"name": "inputs", "shape": [null, ...], "dtype"} (the batch axis is null);
    outputs:  [{"name", "shape", "dtype"}]: `probabilities_<stage>` per head, `classes`, `exit_stage`
              (`chainjax.predict.Predictor.outputs`);
    stages:   [{"name", "type", "head": null | {"binary", "num_classes", "label", "shape"}}], in chain order;
    exit_thresholds: {stage: threshold} of early exit (`config.inference`; every stage runs in the
              exported function, early exit only chooses which head answers);
    preprocessing: {"image": {"scale": 1/255, "raw_dtype": "uint8"}} for images, or {"text": {"vocabulary":
              "vocab.json", "max_len", "padding", "truncating", "pad_id", "oov_id", "lowercase": true,
              "line_breaks", "word_regex"}} for text models, {} otherwise;
    errors:   {file: one line} of the artifacts that could not be written;
    step, weights, chainjax_version, chainjax_commit (null outside a git checkout), jax_version,
    tensorflow_version, platforms (of the StableHLO), config (the run's resolved config).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging
from etils import epath

from chainjax import data as data_lib
from chainjax import predict
from chainjax.data import tfds_data
from chainjax.exported import EXPORT_DIR, FORMAT_VERSION, MANIFEST, STABLEHLO, Exported, load  # noqa: F401

SAVED_MODEL = "saved_model"
VOCAB = "vocab.json"
TFLITE = {"float": "model_float.tflite", "dynamic_int8": "model_dynamic_int8.tflite", "int8": "model_int8.tflite"}
FLOAT_OPS_IN_INT8 = ("DIV",)  # TFLite ops that the full-integer model keeps in float (see `_tflite`)
REPRESENTATIVE_EXAMPLES = 256  # training inputs that calibrate the activations of the full-integer model
LINE_BREAK_RE2 = r"(?i)<br\s*/?>"
NOT_WORD_RE2 = r"[^\p{L}\p{N}']+"


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------


def export_workdir(config: ml_collections.ConfigDict, workdir: str, tflite: Sequence[str] = tuple(TFLITE)) -> dict:
  """Writes `workdir/export/` (see the module docstring) and returns its manifest.

  `tflite`: the TFLite kinds to convert (keys of `TFLITE`; all by default). The full-integer one
  calibrates on `REPRESENTATIVE_EXAMPLES` inputs and is the slowest to convert; a kind left out is
  neither written nor listed in the manifest.
  """
  unknown = [kind for kind in tflite if kind not in TFLITE]
  if unknown:
    raise ValueError(f"tflite: {', '.join(map(repr, unknown))} not among {', '.join(TFLITE)}")
  predictor = predict.Predictor.from_workdir(workdir, config=config)
  exp = predictor.experiment
  final = epath.Path(workdir) / EXPORT_DIR
  building = epath.Path(workdir) / f".{EXPORT_DIR}.{uuid.uuid4().hex[:8]}.tmp"
  building.mkdir(parents=True)
  try:
    manifest = _manifest(predictor, workdir)
    fn = predictor.serving_fn()
    text = exp.config.data.name in data_lib.TEXT
    if text:
      (building / VOCAB).write_text((epath.Path(workdir) / VOCAB).read_text())
    (building / STABLEHLO).write_bytes(_stablehlo(fn, exp, manifest))
    try:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError:
      tf = None
      manifest["errors"][SAVED_MODEL] = "skipped: TensorFlow is not installed (pip install 'chainjax[export]')"
    if tf is not None:
      manifest["tensorflow_version"] = tf.__version__
      with keeping_log_levels():
        module = _tf_module(tf, fn, exp, manifest, workdir)
        tf.saved_model.save(module, os.fspath(building / SAVED_MODEL), signatures=module.serving_signatures)
        for kind, name in ((k, n) for k, n in TFLITE.items() if k in tflite):
          try:
            (building / name).write_bytes(_tflite(tf, module, kind, exp))
          except Exception as e:  # pylint: disable=broad-except
            manifest["errors"][name] = _conversion_error(tf, predictor, kind, name, e)
            logging.warning("%s", manifest["errors"][name])
    manifest["files"] = _files(building)
    (building / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if final.exists():
      old = epath.Path(f"{final}.old.{uuid.uuid4().hex[:8]}")
      final.rename(old)
      building.rename(final)
      shutil.rmtree(os.fspath(old), ignore_errors=True)
    else:
      building.rename(final)
  finally:
    if building.exists():
      shutil.rmtree(os.fspath(building), ignore_errors=True)
  print(summary(manifest, os.fspath(final)), flush=True)
  return manifest


@contextlib.contextmanager
def keeping_log_levels():
  """Gives absl's verbosity and logger level back as they were after TensorFlow ran.

  Walking a module for a SavedModel or a TFLite conversion sets absl's verbosity to FATAL and then to
  TensorFlow's own level (WARNING), and leaves it there: without this, a process that exports and then
  trains (a notebook, the test suite) would lose every INFO line after the export.
  """
  absl_logger, root = absl_logging.get_absl_logger(), logging.getLogger()
  verbosity, absl_level, root_level = absl_logging.get_verbosity(), absl_logger.level, root.level
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)  # also sets the root level where absl's handler is installed
    absl_logger.setLevel(absl_level)
    root.setLevel(root_level)


def summary(manifest: dict, directory: str) -> str:
  lines = [f"Exported step {manifest['step']} to {directory}:"]
  lines += [f"  {name:<34} {info['bytes']:>12,} bytes" for name, info in manifest["files"].items()]
  lines += [f"  not written: {line}" for line in manifest["errors"].values()]
  return "\n".join(lines)


def _files(directory: epath.Path) -> dict:
  out = {}
  for root, _, files in os.walk(os.fspath(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, os.fspath(directory))] = {"bytes": os.path.getsize(path),
                                                            "sha256": hashlib.sha256(f.read()).hexdigest()}
  return dict(sorted(out.items()))


def _commit() -> str | None:
  try:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, timeout=10, check=False)
  except OSError:
    return None
  return proc.stdout.strip() or None if proc.returncode == 0 else None


def _manifest(predictor: predict.Predictor, workdir: str) -> dict:
  exp = predictor.experiment
  config, task = exp.config, exp.task
  fn = predictor.serving_fn()
  batch = jax.ShapeDtypeStruct((2,) + tuple(task.input_shape), task.input_dtype)
  outputs = jax.eval_shape(fn, batch)
  stages = []
  for i, (stage, spec) in enumerate(zip(config.chain.stages, task.label_specs)):
    head = None
    if stage.head.enabled:
      head = {"binary": spec.is_binary, "num_classes": spec.num_classes, "label": spec.name,
              "shape": list(spec.shape)}
    stages.append({"name": exp.stage_names[i], "type": stage.type, "head": head})
  preprocessing: dict[str, Any] = {}
  if config.data.name in data_lib.TEXT:
    tokenize = task.transform
    preprocessing["text"] = {"vocabulary": VOCAB, "max_len": tokenize.max_len, "padding": tokenize.padding,
                             "truncating": tokenize.truncating, "pad_id": 0, "oov_id": 1, "lowercase": True,
                             "line_breaks": LINE_BREAK_RE2, "word_regex": r"[^\W_]+(?:'[^\W_]+)*"}
  elif isinstance(getattr(task, "transform", None), tfds_data.ImageClassification):
    preprocessing["image"] = {"scale": 1.0 / 255.0, "raw_dtype": "uint8"}
  return {
      "format_version": FORMAT_VERSION,
      "step": predictor.step, "weights": predictor.weights,
      "input": {"name": "inputs", "shape": [None, *task.input_shape], "dtype": np.dtype(task.input_dtype).name},
      "outputs": [{"name": k, "shape": [None, *v.shape[1:]], "dtype": v.dtype.name} for k, v in outputs.items()],
      "stages": stages,
      "exit_thresholds": {exp.stage_names[i]: t for i, t in predictor.exit_thresholds.items()},
      "preprocessing": preprocessing,
      "errors": {},
      "chainjax_version": _version(), "chainjax_commit": _commit(), "jax_version": jax.__version__,
      "tensorflow_version": None,
      "config": json.loads(config.to_json_best_effort()),
  }


def _version() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("chainjax")
  except metadata.PackageNotFoundError:
    return "unknown"


def _stablehlo(fn, exp, manifest: dict) -> bytes:
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b,) + tuple(exp.task.input_shape), exp.task.input_dtype)
  exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda"))(spec)
  manifest["platforms"] = list(exported.platforms)
  return exported.serialize()


def _tf_module(tf, fn, exp, manifest: dict, workdir: str):
  """A tf.Module with the signatures: serving_default (strings for text models), serving_ids for text."""
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  shape, dtype = tuple(exp.task.input_shape), np.dtype(exp.task.input_dtype)
  module = tf.Module()
  module.model = tf.function(jax2tf.convert(fn, polymorphic_shapes=["(b, ...)"]), autograph=False,
                             input_signature=[tf.TensorSpec((None,) + shape, tf.as_dtype(dtype), name="inputs")])
  signatures = {"serving_default": module.model}
  text = manifest["preprocessing"].get("text")
  if text:
    vocab = json.loads((epath.Path(workdir) / VOCAB).read_text())
    words = vocab["words"]
    module.table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(words, tf.string),
                                            tf.constant(np.arange(2, len(words) + 2), tf.int64)),
        default_value=text["oov_id"])
    tokenize = make_tf_tokenizer(tf, module.table, text["max_len"], text["padding"], text["truncating"])

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name="inputs")])
    def from_text(texts):
      return module.model(tf.cast(tokenize(texts), tf.as_dtype(dtype)))

    module.from_text = from_text
    signatures = {"serving_default": from_text, "serving_ids": module.model}
  module.serving_signatures = signatures
  return module


def make_tf_tokenizer(tf, table, max_len: int, padding: str, truncating: str):
  """texts [N] tf.string -> word ids [N, max_len] int64, as `chainjax.data.text.Tokenize.ids` (see the
  module docstring for RE2's letters)."""

  def tokenize(texts):
    texts = tf.strings.lower(texts, encoding="utf-8")
    texts = tf.strings.regex_replace(texts, LINE_BREAK_RE2, " ")
    texts = tf.strings.regex_replace(texts, NOT_WORD_RE2, " ")
    texts = tf.strings.regex_replace(texts, "''+", " ")  # two apostrophes in a row end a word
    tokens = tf.strings.split(texts)
    tokens = tf.ragged.map_flat_values(tf.strings.regex_replace, tokens, "^'+|'+$", "")
    tokens = tf.ragged.boolean_mask(tokens, tf.strings.length(tokens) > 0)
    ids = tf.ragged.map_flat_values(table.lookup, tokens)
    ids = ids[:, -max_len:] if truncating == "pre" else ids[:, :max_len]
    dense = ids.to_tensor(default_value=0, shape=[None, max_len])  # post-padded
    if padding == "post":
      return dense
    lengths = tf.cast(ids.row_lengths(), tf.int32)[:, None]
    positions = tf.range(max_len)[None, :] - (max_len - lengths)  # pre-padding shifts each row right
    gathered = tf.gather(dense, tf.maximum(positions, 0), batch_dims=1)
    return tf.where(positions >= 0, gathered, tf.zeros_like(gathered))

  return tokenize


def _representative(exp, count: int) -> np.ndarray:
  """`count` inputs of the run's own train pipeline (the first batches of its stream)."""
  iterator = exp.task.train_iterator(exp.config.batch_size, data_lib.Shard.of_this_process())
  inputs, have = [], 0
  while have < count:
    batch = np.asarray(next(iterator)["inputs"])
    inputs.append(batch)
    have += len(batch)
  return np.concatenate(inputs)[:count]


def _converter(tf, module, kind: str, exp):
  ids = module.serving_signatures.get("serving_ids", module.serving_signatures["serving_default"])
  converter = tf.lite.TFLiteConverter.from_concrete_functions([ids.get_concrete_function()], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if kind == "dynamic_int8":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  elif kind == "int8":
    samples = _representative(exp, REPRESENTATIVE_EXAMPLES)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([sample[None]] for sample in samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  return converter


def _tflite(tf, module, kind: str, exp) -> bytes:
  converter = _converter(tf, module, kind, exp)
  if kind != "int8":
    return converter.convert()
  # Division stays float (the softmax's normalization): an int8 DIV fails at run time when its calibrated
  # denominator rounds to zero.
  options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS_IN_INT8))
  debugger = tf.lite.experimental.QuantizationDebugger(
      converter=converter, debug_dataset=converter.representative_dataset, debug_options=options)
  return debugger.get_nondebug_quantized_model()


def _conversion_error(tf, predictor, kind: str, name: str, error: Exception) -> str:
  """One line: the first stage that does not convert alone to this TFLite kind, and the converter's reason."""
  reason = _reason(error)
  exp = predictor.experiment
  params, rest = (jax.tree.map(np.asarray, jax.device_get(t)) for t in (predictor.params, predictor.rest))
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  h = jax.ShapeDtypeStruct((1,) + tuple(exp.task.input_shape), exp.task.input_dtype)
  for i, stage_name in enumerate(exp.stage_names):
    def stage(x, i=i):
      model = predictor._model(params, rest)  # pylint: disable=protected-access
      return predictor._stage_outputs(model, i, exp.policy.cast_to_compute(x) if i == 0 else x)  # pylint: disable=protected-access
    fn = tf.function(jax2tf.convert(stage, polymorphic_shapes=["(b, ...)"]), autograph=False,
                     input_signature=[tf.TensorSpec((None,) + h.shape[1:], tf.as_dtype(h.dtype))])
    module = tf.Module()
    module.f = fn
    module.serving_signatures = {"serving_default": fn}
    try:
      converter = _converter(tf, module, kind, exp)
      if kind == "int8":
        samples = np.asarray(_stage_inputs(predictor, params, rest, i))
        converter.representative_dataset = lambda samples=samples: ([s[None]] for s in samples)
      converter.convert()
    except Exception as e:  # pylint: disable=broad-except
      stage_type = exp.config.chain.stages[i].type
      return f"{name}: stage {stage_name} ({stage_type}) cannot be converted to {kind} TFLite: {_reason(e)}"
    h = jax.eval_shape(stage, h)[0]
  return f"{name}: the chain cannot be converted to {kind} TFLite (every stage converts alone): {reason}"


def _stage_inputs(predictor, params, rest, index: int) -> jax.Array:
  """What stage `index` receives for a few training inputs."""
  exp = predictor.experiment
  h = exp.policy.cast_to_compute(_representative(exp, 32))
  model = predictor._model(params, rest)  # pylint: disable=protected-access
  for i in range(index):
    h, _ = predictor._stage_outputs(model, i, h)  # pylint: disable=protected-access
  return h


def _reason(error: Exception) -> str:
  """The converter's own words, one line: its first `error:` line, else the exception's first line."""
  text = str(error)
  for line in text.splitlines():
    if "error:" in line:
      return line.split("error:", 1)[1].strip()[:300]
  return (text.strip().splitlines() or [type(error).__name__])[0][:300]


__all__ = ["EXPORT_DIR", "Exported", "FORMAT_VERSION", "MANIFEST", "STABLEHLO", "SAVED_MODEL", "TFLITE",
           "export_workdir", "load", "make_tf_tokenizer"]
