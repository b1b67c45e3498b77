"""Inference on a trained workdir: `Predictor.from_workdir(W)(inputs)` -> every head's probabilities.

What: `Predictor.from_workdir(W, step=None, weights="float")` rebuilds the run from its own resolved
config (`W/config.json`, validated by `experiment.Experiment`) and restores only the parameters (and
BatchNorm statistics, QAT observers) of the newest good checkpoint, or of `step`. `weights="int8"`
(any `int<b>` that `--mode=compress` wrote) uses the post-training quantized integers of
`W/compress/int<b>/`, dequantized on the device, on the float chain, as `--mode=compress` evaluates them.
Calling the predictor on a batch (a numpy array shaped like the task's inputs; for text models a list
of strings, encoded with the run's vocabulary `W/vocab.json`, `max_len`, padding and truncation; for
image datasets also raw uint8 images, scaled as the run's pipeline does) returns a `Prediction`: each
head's probabilities (softmax for a multi-class head, sigmoid for a binary one) and the last head's
classes. The workdir is only read: nothing is created, written or moved in it.

Why this shape: serving sees requests of any size, and `jax.jit` compiles once per input shape. A
request is padded to one of a few bucket sizes (the data-axis size of the run's mesh times a power of
two, up to `max_batch`; larger requests go in chunks of `max_batch`), and each bucket's program is
compiled ahead of time once (`compiled_sizes`), so no request size recompiles after its bucket has
been seen. The probabilities come from the same chain, mode, precision policy and quantization switch
as the run's evaluation (`experiment.make_eval_step`), so the classes reproduce `eval/accuracy`.

    predictor = predict.Predictor.from_workdir("runs/default")
    out = predictor(inputs)                  # inputs: float32 [N, 64]
    out.classes, out.probabilities, out.stages["level1"]

The command line answers a file of examples:

    python -m chainjax.predict --workdir=W | --export_dir=W/export --input=FILE [--output=OUT.jsonl]

FILE is a text file (one example per line, text models), a `.npy` / `.npz` array, or a folder of images;
one line per example (its name, the prediction, its probability, and the stage that answered when the
chain has several heads), or one JSON object per example with `--output`. Bad input: one line, exit 2.

Bad input is one `ValueError` naming what is wrong (a `ConfigError`, also a ValueError, for a config
that no longer validates): a workdir without a config or checkpoint, integer weights that
`--mode=compress` has not written (or wrote for other parameters), a batch of the wrong shape or
dtype, an empty batch.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from chainjax import checkpoint as checkpoint_lib
from chainjax import compression
from chainjax import data as data_lib
from chainjax import experiment as experiment_lib
from chainjax import metrics as metrics_lib
from chainjax.compress import ptq
from chainjax.compress import quant
from chainjax.data import tfds_data
from chainjax.errors import ConfigError

CONFIG_FILE = "config.json"
EXIT_IMPLS = ("compact", "mask", "full")  # how early exit avoids work: see `Predictor`
OUTPUT_PREFIX = "probabilities_"  # `probabilities_<stage>`: one output per head (`Predictor.outputs`)


def confidence(probabilities: jax.Array, binary: bool) -> jax.Array:
  """[N] in [0, 1]: a head's confidence in its answer, which early exit compares with the stage's threshold.

  The max softmax probability of a multi-class head (class axis last), the sigmoid margin |2p - 1| of a
  binary one; a head with several labels per example is as confident as its least confident label.
  """
  c = jnp.abs(2.0 * probabilities - 1.0) if binary else jnp.max(probabilities, axis=-1)
  return jnp.min(c.reshape(c.shape[0], -1), axis=1) if c.ndim > 1 else c


def exit_thresholds(config: ml_collections.ConfigDict, specs) -> dict[int, float]:
  """{stage index: threshold} of the stages an example may exit at (`config.inference`; the last stage is
  where every other example ends): those with a threshold below 1.0. Such a stage needs a head that answers
  the last stage's task (the same label shape and classes); otherwise one `ConfigError` names the field."""
  stages, n = config.chain.stages, len(config.chain.stages)
  capable = exit_capable(config, specs)
  per_stage = tuple(config.inference.stage_exit_threshold) or (config.inference.exit_threshold,) * (n - 1)
  field = ("inference.stage_exit_threshold" if config.inference.stage_exit_threshold
           else "inference.exit_threshold")
  out = {}
  for i, threshold in enumerate(per_stage):
    if threshold >= 1.0:
      continue
    if i not in capable:
      if config.inference.stage_exit_threshold:
        why = ("has no head" if not stages[i].head.enabled else
               f"predicts {specs[i].name!r}, not the last stage's {specs[-1].name!r} (another task)")
        raise ConfigError(field, f"stage {stages[i].name} {why}; its threshold must be 1.0 (no exit)")
      continue  # one threshold for the chain: the stages that answer the last task
    out[i] = float(threshold)
  return out


def exit_capable(config: ml_collections.ConfigDict, specs) -> tuple[int, ...]:
  """The stages (indices, the last excluded) an example may exit at: those whose head answers the last
  stage's task (the same label space, shape and classes)."""
  stages = config.chain.stages
  return tuple(i for i in range(len(stages) - 1) if stages[i].head.enabled and specs[i] == specs[-1])


def first_argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, axis=-1)` (the first of equal maxima) with two plain reductions: argmax lowers to a
  reduction over (value, index) pairs, which the TFLite converter cannot legalize."""
  n = x.shape[-1]
  index = jnp.arange(n, dtype=jnp.int32)
  return jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), index, n), axis=-1)


def _expand(mask: jax.Array, ndim: int) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to `W/config.json`, as the ConfigDict it was (not validated here).

  JSON has no tuples and no ConfigDicts inside lists: a list of objects (`chain.stages`) becomes a list
  of ConfigDicts, every other list a tuple, as the config files write them.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise ValueError(f"{path} does not exist: {workdir} is not the workdir of a chainjax run")
  try:
    data = json.loads(path.read_text())
  except (ValueError, OSError) as e:
    raise ValueError(f"{path} is not a readable JSON config: {str(e).splitlines()[0]}") from None

  def convert(value):
    if isinstance(value, dict):
      return ml_collections.ConfigDict({k: convert(v) for k, v in value.items()})
    if isinstance(value, list):
      items = [convert(v) for v in value]
      return items if any(isinstance(v, ml_collections.ConfigDict) for v in items) else tuple(items)
    return value

  return convert(data)


class Prediction(NamedTuple):
  """What a `Predictor` returns for N inputs, as numpy arrays.

  `stages`: stage name -> that head's probabilities [N, *logits shape], in chain order: softmax over the
  class axis (last) of a multi-class head, the sigmoid of each logit of a binary head; a stage without a
  head is absent. `classes` [N, *label shape] int32: the prediction of the head the example exits at (the
  last head without early exit): the most probable class, or 1 where the logit is > 0 (probability > 0.5),
  as `eval/accuracy` counts it.
  `probabilities`: the last head's probabilities (`stages[<last stage>]`). `exit_stages` [N] int32: the
  stage (1-based) whose head gave `classes` (`config.inference.exit_threshold`; the last without early exit).
  """

  stages: dict[str, np.ndarray]
  classes: np.ndarray
  probabilities: np.ndarray
  exit_stages: np.ndarray


class _OneStep:
  """An Orbax CheckpointManager that lists only `step`: `Experiment.restore` through it restores that step
  (with every check of a restore) or nothing."""

  def __init__(self, manager, step: int):
    self._manager, self._step = manager, step

  def all_steps(self, *args, **kwargs):
    return [s for s in self._manager.all_steps(*args, **kwargs) if s == self._step]

  def __getattr__(self, name):
    return getattr(self._manager, name)


def _steps(workdir: str) -> list[int]:
  directory = epath.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _bits(weights: str) -> int:
  """0 for "float", b for "int<b>" (b in 2..8, the widths `--mode=compress` writes)."""
  if weights == "float":
    return 0
  match = re.fullmatch(r"int(\d)", weights)
  if not match or not quant.MIN_BITS <= int(match.group(1)) <= quant.MAX_BITS:
    raise ValueError(f"weights={weights!r}: use 'float' or the integers of --mode=compress, 'int8' or 'int4' "
                     f"(int{quant.MIN_BITS}..int{quant.MAX_BITS})")
  return int(match.group(1))


class Predictor:
  """A trained chain, restored for inference; `predictor(inputs)` -> `Prediction` (see the module docstring).

  `Predictor(exp, state)` serves any state of an `Experiment` (e.g. the one a loop just trained);
  `from_workdir` restores one. `max_batch` (default `config.eval_batch_size`, which the run validated
  against the memory) is rounded up to a multiple of the mesh's data axis.

  Early exit (`config.inference`): an example's answer comes from the first head that is confident
  enough. `exit_impl` says how the later stages' work is avoided for it: "compact" (the default) runs the
  chain stage by stage and takes the exited examples out of the batch before the next stage, which runs
  on the rest, padded to their bucket; "mask" runs one program that skips a stage when every example of
  the batch has exited (`lax.cond`: a saving at batch 1, rarely at batch 256); "full" runs every stage on
  every example and only chooses the head (what the exported artifacts do). All three give the same
  classes and exit stages; the probabilities of a head an example never reached are NaN with "compact"
  (and with "mask" when the whole batch skipped it).
  """

  def __init__(self, exp: experiment_lib.Experiment, state: experiment_lib.TrainState, *, step: int | None = None,
               weights: str = "float", max_batch: int | None = None, exit_impl: str = "compact"):
    self.experiment, self.step, self.weights = exp, step, weights
    self.params, self.rest = state.params, state.rest
    self._state = state
    self._data = exp.mesh.shape["data"]
    max_batch = max_batch or exp.config.eval_batch_size
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    self.max_batch = -(-max_batch // self._data) * self._data
    sizes, size = [], self._data
    while size < self.max_batch:
      sizes.append(size)
      size *= 2
    self.bucket_sizes: tuple[int, ...] = tuple(sizes) + (self.max_batch,)
    self._compiled: dict[int, Any] = {}
    self._heads = tuple((i, name) for i, name in enumerate(exp.stage_names) if exp.config.chain.stages[i].head.enabled)
    self.exit_capable = exit_capable(exp.config, exp.task.label_specs)
    self.exit_thresholds = exit_thresholds(exp.config, exp.task.label_specs)  # may be changed between calls
    if exit_impl not in EXIT_IMPLS:
      raise ValueError(f"exit_impl={exit_impl!r}: use one of {', '.join(EXIT_IMPLS)}")
    self.exit_impl = exit_impl
    self._head_names = dict(self._heads)
    self._stage_programs: dict[int, Any] = {}

  def with_exit_impl(self, exit_impl: str) -> "Predictor":
    """The same parameters and thresholds with another `exit_impl` (its programs compile anew)."""
    other = Predictor(self.experiment, self._state, step=self.step, weights=self.weights, max_batch=self.max_batch,
                      exit_impl=exit_impl)
    other.exit_thresholds = dict(self.exit_thresholds)
    return other

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, weights: str = "float",
                   max_batch: int | None = None, config: ml_collections.ConfigDict | None = None,
                   exit_impl: str = "compact") -> "Predictor":
    """The run in `workdir` (its `config.json`, vocabulary and checkpoints), read-only.

    `step`: that checkpoint instead of the newest good one. `weights`: "float" (the parameters as trained,
    with fake quantization where the run trained with QAT), or "int8" / "int4": the integers that
    `--mode=compress` saved in `W/compress/int<b>/` from exactly these parameters, dequantized, on the
    float chain (the `ptq_int<b>` rows of the compression report). `config`: the run's config as given on
    the command line (e.g. with other `inference.*` thresholds) instead of `W/config.json`.
    """
    bits = _bits(weights)
    if not epath.Path(workdir).is_dir():
      raise ValueError(f"workdir {workdir} does not exist")
    config = load_config(workdir) if config is None else config
    steps = _steps(workdir)
    if not steps:
      raise ValueError(f"{workdir} has no checkpoint (no {os.path.join(workdir, 'checkpoints')}/<step> folder): "
                       "train it first")
    if step is not None and step not in steps:
      raise ValueError(f"{workdir} has no checkpoint at step {step}; its steps: {steps}")
    int_dir = epath.Path(workdir) / compression.COMPRESS_DIR / f"int{bits}"
    if bits and not int_dir.is_dir():
      raise ValueError(f"weights={weights!r}: {int_dir} does not exist; run `python -m chainjax.main "
                       f"--config=... --workdir={workdir} --mode=compress` first "
                       f"(with {bits} in --config.compress.ptq_bits)")
    if bits:  # the chain the integers were evaluated on by --mode=compress
      config = compression._float_config(config)  # pylint: disable=protected-access
    if config.data.name in data_lib.TEXT and not (epath.Path(workdir) / "vocab.json").is_file():
      raise ValueError(f"{workdir}/vocab.json does not exist: without the run's vocabulary, word ids would differ")
    exp = experiment_lib.Experiment(config, workdir=workdir)
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
      if step is not None:
        checkpointer._manager = _OneStep(checkpointer._manager, step)  # pylint: disable=protected-access
      restored = exp.restore(checkpointer, params_only=True)
    finally:
      checkpointer.close()
    if restored is None:
      which = f"the checkpoint at step {step} does not" if step is not None else "no checkpoint"
      raise ValueError(f"{which} of {workdir} restores (incomplete or unreadable)")
    step, state, _ = restored
    if bits:
      state = state._replace(params=_integer_params(exp, state, workdir, int_dir, step, bits))
    return cls(exp, state, step=step, weights=weights, max_batch=max_batch, exit_impl=exit_impl)

  # Buckets and compiled programs.

  @property
  def compiled_sizes(self) -> tuple[int, ...]:
    """The batch sizes compiled so far (each a bucket size, compiled once)."""
    return tuple(sorted(self._compiled))

  def bucket(self, n: int) -> int:
    """The padded size of a chunk of `n <= max_batch` examples: the smallest bucket that holds it."""
    return next(size for size in self.bucket_sizes if size >= n)

  def _program(self, size: int):
    """The compiled forward pass for batches of `size` (compiled on first use, ahead of time: a compiled
    program takes exactly these shapes and never recompiles)."""
    if size not in self._compiled:
      exp = self.experiment
      inputs = jax.ShapeDtypeStruct((size,) + tuple(exp.task.input_shape), exp.task.input_dtype,
                                    sharding=exp.batch_sharding)
      abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
      thresholds = jax.ShapeDtypeStruct((exp.num_stages,), jnp.float32, sharding=exp.replicated)
      forward = functools.partial(self.outputs, skip_exited=self.exit_impl == "mask")
      self._compiled[size] = jax.jit(forward, out_shardings=exp.batch_sharding).lower(
          abstract(self.params), abstract(self.rest), inputs, thresholds).compile()
    return self._compiled[size]

  def threshold_array(self) -> np.ndarray:
    """`exit_thresholds` as one float32 per stage, +inf where a stage never exits (a program's argument, so
    other thresholds do not recompile)."""
    out = np.full(self.experiment.num_stages, np.inf, np.float32)
    for i, threshold in self.exit_thresholds.items():
      out[i] = threshold
    return out

  def outputs(self, params, rest, inputs, thresholds, skip_exited: bool = False) -> dict[str, jax.Array]:
    """The named outputs of a batch (traceable; what `__call__`, `serving_fn` and the exports compute).

    `probabilities_<stage>` for every stage with a head, in chain order (softmax over the class axis of a
    multi-class head, the sigmoid of each logit of a binary one); `classes` [N, *label shape] int32: the
    prediction of the head the example exits at (the last head, without early exit): the most probable
    class, or 1 where the logit is > 0, as `eval/accuracy` counts it; `exit_stage` [N] int32: that stage's
    number, 1-based. `thresholds`: `threshold_array()`, one per stage.

    Every stage runs on the whole batch, except with `skip_exited` (`exit_impl="mask"`): a stage after an
    exit is skipped (`lax.cond`) when every example of the batch has exited, and the probabilities it would
    have given are NaN.
    """
    model = self._model(params, rest)
    h = self.experiment.policy.cast_to_compute(inputs)
    outputs, classes, confident = {}, {}, {}
    done = jnp.zeros(inputs.shape[:1], bool)
    for i in range(self.experiment.num_stages):
      run = functools.partial(self._stage_outputs, model, i)
      if skip_exited and confident:
        shapes = jax.eval_shape(run, h)
        skipped = lambda h, shapes=shapes: jax.tree.map(
            lambda s: jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else 0, s.dtype), shapes)
        h, out = jax.lax.cond(jnp.all(done), skipped, run, h)
      else:
        h, out = run(h)
      if i in self._head_names:
        outputs[f"{OUTPUT_PREFIX}{self._head_names[i]}"] = out["probabilities"]
        classes[i] = out["classes"]
      # A stage that never exits compares nothing where the thresholds are constants (`serving_fn`): in a
      # full-int8 TFLite model the +inf threshold would be quantized to a finite value that every example clears.
      never = isinstance(thresholds, np.ndarray) and not thresholds[i] <= 1.0
      if "confidence" in out and not never:
        confident[i] = out["confidence"] >= thresholds[i]
        done = done | confident[i]
    last = self.experiment.num_stages - 1  # the last stage always has a head (`chain.check_config`)
    chosen, exit_stage = classes[last], jnp.full(inputs.shape[:1], last + 1, jnp.int32)
    for i in sorted(confident, reverse=True):  # the first confident head wins
      chosen = jnp.where(_expand(confident[i], chosen.ndim), classes[i], chosen)
      exit_stage = jnp.where(confident[i], i + 1, exit_stage)
    return {**outputs, "classes": chosen, "exit_stage": exit_stage}

  def _model(self, params, rest):
    return nnx.merge(self.experiment.graphdef, self.experiment.policy.cast_to_compute(params), rest)

  def _stage_outputs(self, model, index: int, h) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage `index` on `h`: (what it passes on, {"probabilities", "classes", "confidence"} of its head,
    "confidence" only where the stage may exit)."""
    exp = self.experiment
    with quant.enabled(exp.phases[-1].quantized):
      h, y = model.stage(index, h)
    if y is None:
      return h, {}
    spec = exp.task.label_specs[index]
    logits = exp.policy.cast_to_output(y).astype(jnp.float32)
    # The sigmoid as tanh: its usual lowering, 1 / (1 + exp(-x)), divides by a denominator that a full-int8
    # TFLite model can quantize to zero (exp(-x) spans many orders of magnitude); tanh is one int8 op.
    probabilities = (0.5 * jnp.tanh(0.5 * logits) + 0.5) if spec.is_binary else jax.nn.softmax(logits, axis=-1)
    out = {"probabilities": probabilities,
           "classes": ((logits > 0) if spec.is_binary else first_argmax(logits)).astype(jnp.int32)}
    if index in self.exit_capable:
      out["confidence"] = confidence(probabilities, spec.is_binary)
    return h, out

  def serving_fn(self):
    """`f(inputs) -> outputs(...)` with the parameters as constants: a function of the inputs alone, on one
    device, for `jax.export` and `jax2tf` (every stage runs; early exit only chooses the answering head)."""
    params, rest = experiment_lib.host_arrays(self.params), experiment_lib.host_arrays(self.rest)
    thresholds = self.threshold_array()
    return lambda inputs: self.outputs(params, rest, inputs, thresholds)

  # Requests.

  def __call__(self, inputs) -> Prediction:
    """The `Prediction` for a batch of N >= 1 inputs (see the module docstring for what inputs may be)."""
    x = self.preprocess(inputs)
    run = self._compact_chunk if self.exit_thresholds and self.exit_impl == "compact" else self._whole_chunk
    host = [run(x[start:start + self.max_batch]) for start in range(0, len(x), self.max_batch)]
    out = jax.tree.map(lambda *parts: np.concatenate(parts), *host)
    stages = {name: out[f"{OUTPUT_PREFIX}{name}"] for _, name in self._heads}
    return Prediction(stages, out["classes"], stages[self._heads[-1][1]], out["exit_stage"])

  def _padded(self, x: np.ndarray):
    """`x` padded with zeros to its bucket, as a global array sharded along the mesh's data axis."""
    size = self.bucket(len(x))
    padded = np.zeros((size,) + x.shape[1:], x.dtype)
    padded[:len(x)] = x
    return self.experiment.put_batch(padded, size)

  def _whole_chunk(self, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every stage on every example of `x` (<= max_batch), one compiled program per bucket."""
    batch = self._padded(x)
    thresholds = jax.device_put(self.threshold_array(), self.experiment.replicated)
    out = self._program(batch.shape[0])(self.params, self.rest, batch, thresholds)
    return jax.tree.map(lambda a: a[:len(x)], experiment_lib.host_arrays(out))

  def _compact_chunk(self, x: np.ndarray) -> dict[str, np.ndarray]:
    """Early exit by compaction: stage by stage, the examples that exited are taken out of the batch, and
    the next stage runs on the others only, padded to their (smaller) bucket. A head's probabilities are
    NaN for the examples that exited before it."""
    exp, n = self.experiment, len(x)
    specs = exp.task.label_specs
    out = {f"{OUTPUT_PREFIX}{name}": np.full((n,) + tuple(specs[i].logits_shape), np.nan, np.float32)
           for i, name in self._heads}
    out["classes"] = np.zeros((n,) + tuple(specs[-1].shape), np.int32)
    out["exit_stage"] = np.full(n, exp.num_stages, np.int32)
    remaining, h = np.arange(n), self._padded(x)
    for i in range(exp.num_stages):
      passed, stage_out = self._stage_program(i)(self.params, self.rest, h)
      m = len(remaining)
      stage_out = jax.tree.map(lambda a: a[:m], experiment_lib.host_arrays(stage_out))
      if i in self._head_names:
        out[f"{OUTPUT_PREFIX}{self._head_names[i]}"][remaining] = stage_out["probabilities"]
      if i == exp.num_stages - 1:
        out["classes"][remaining] = stage_out["classes"]
        break
      exited = stage_out["confidence"] >= self.exit_thresholds[i] if i in self.exit_thresholds else None
      if exited is None or not exited.any():
        h = passed  # nobody exits here: the next stage takes the batch as it is
        continue
      out["classes"][remaining[exited]] = stage_out["classes"][exited]
      out["exit_stage"][remaining[exited]] = i + 1
      remaining = remaining[~exited]
      if not len(remaining):
        break
      h = self._padded(experiment_lib.host_arrays(passed)[:m][~exited])
    return out

  def _stage_program(self, index: int):
    """Stage `index` alone, jitted: (params, rest, h) -> (what it passes on, its head's outputs)."""
    if index not in self._stage_programs:
      exp = self.experiment

      def run(params, rest, h):
        h = exp.policy.cast_to_compute(h) if index == 0 else h
        return self._stage_outputs(self._model(params, rest), index, h)

      self._stage_programs[index] = jax.jit(run, out_shardings=exp.batch_sharding)
    return self._stage_programs[index]

  def preprocess(self, inputs) -> np.ndarray:
    """`inputs` as the model's input array [N, *input shape] of the task's dtype, or one ValueError."""
    task = self.experiment.task
    shape, dtype = tuple(task.input_shape), np.dtype(task.input_dtype)
    text = self.experiment.config.data.name in data_lib.TEXT
    if isinstance(inputs, (str, bytes)):
      raise ValueError(f"inputs: got one {type(inputs).__name__}; pass a batch, e.g. a list of strings"
                       + ("" if text else f" (the {task.name} model takes {dtype.name} arrays, not text)"))
    if ((isinstance(inputs, (list, tuple)) and any(isinstance(v, (str, bytes)) for v in inputs))
        or (isinstance(inputs, np.ndarray) and inputs.dtype.kind in "OSU")):
      return self._encode_texts(inputs)
    try:
      x = np.asarray(inputs)
    except ValueError as e:  # ragged nested lists
      raise ValueError(f"inputs: not an array ({str(e).splitlines()[0]})") from None
    expected = f"[N, {', '.join(map(str, shape))}] {dtype.name}" if shape else f"[N] {dtype.name}"
    if x.ndim and not x.shape[0]:
      raise ValueError(f"inputs: empty batch (shape {x.shape}); the {task.name} model takes {expected}")
    if x.shape[1:] != shape:
      hint = " (one example: add a batch axis, inputs[None])" if x.shape == shape else ""
      raise ValueError(f"inputs: shape {x.shape}; the {task.name} model takes {expected}{hint}")
    raw = getattr(task, "transform", None)
    if x.dtype == np.uint8 and isinstance(raw, tfds_data.ImageClassification):
      return np.stack([raw({raw.image_key: image, raw.label_key: 0})["inputs"] for image in x])  # the run's scaling
    if x.dtype.kind not in "biuf" or not np.can_cast(x.dtype, dtype, "same_kind"):
      raise ValueError(f"inputs: dtype {x.dtype}; the {task.name} model takes {expected}"
                       + (" (or a list of strings)" if text else ""))
    x = x.astype(dtype)
    if text and (x.min() < 0 or x.max() >= self.experiment.config.data.vocab_size):
      raise ValueError(f"inputs: word ids must be in [0, {self.experiment.config.data.vocab_size}), got "
                       f"[{x.min()}, {x.max()}]")
    return x

  def _encode_texts(self, texts: Sequence) -> np.ndarray:
    """Strings -> word ids with the run's vocabulary and `max_len`, padding and truncation (`text.Tokenize`)."""
    task = self.experiment.task
    if self.experiment.config.data.name not in data_lib.TEXT:
      raise ValueError(f"inputs: strings, but the {task.name} model takes {np.dtype(task.input_dtype).name} "
                       f"arrays of shape [N, {', '.join(map(str, task.input_shape))}]")
    texts = list(np.asarray(texts, object).reshape(-1)) if isinstance(texts, np.ndarray) else list(texts)
    if not texts:
      raise ValueError("inputs: empty batch (no strings)")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, (str, bytes, np.str_, np.bytes_))), None)
    if bad is not None:
      raise ValueError(f"inputs[{bad}]: {type(texts[bad]).__name__}, not a string; a text batch is a list of strings")
    from chainjax.data import text  # pylint: disable=import-outside-toplevel
    return np.stack([task.transform.ids(text.as_text(t)) for t in texts])


def _integer_params(exp: experiment_lib.Experiment, state: experiment_lib.TrainState, workdir: str,
                    int_dir: epath.Path, step: int, bits: int) -> Any:
  """The float parameters of the integers `--mode=compress` saved in `int_dir` from exactly `state.params`
  (checked by their fingerprint), dequantized on the device with the parameters' shardings."""
  axes = ptq.axes_of(quant.weight_channel_axes(nnx.merge(exp.graphdef, state.params, state.rest)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=exp.replicated),
                          ptq.abstract_quantized(state.params, bits, axes=axes))
  rerun = f"run `python -m chainjax.main --config=... --workdir={workdir} --mode=compress` again"
  reader = checkpoint_lib.Checkpointer(int_dir, read_only=True)
  try:
    restored = reader.restore_latest(abstract)
  except ValueError:
    restored = None
  finally:
    reader.close()
  if restored is None:
    raise ValueError(f"weights='int{bits}': {int_dir} holds no integers of this model's shapes; {rerun}")
  source = compression.fingerprint(experiment_lib.host_arrays(state.params))
  if restored[2].get("source") != source or restored[2].get("bits") != bits:
    raise ValueError(f"weights='int{bits}': the integers in {int_dir} come from the parameters of step "
                     f"{restored[2].get('source_step')}, not those of the checkpoint at step {step}; {rerun}")
  return jax.jit(functools.partial(ptq.dequantize_params, like=state.params, bits=bits),
                 out_shardings=exp.state_shardings.params)(restored[1])


# The command line: `python -m chainjax.predict`.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_input(path: str, text_model: bool, input_shape: tuple[int, ...]) -> tuple[list[str], Any]:
  """(example names, the examples) of `--input`: a text file (one example per line, text models), a `.npy`
  array or `.npz` archive (one array, or the one named `inputs`), or a folder of images (sorted by file name,
  kept as uint8: the model scales them as in training). One ValueError for what cannot be read."""
  p = epath.Path(path)
  if not p.exists():
    raise ValueError(f"--input={path} does not exist")
  if p.is_dir():
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
      raise ValueError(f"--input={path}: a folder with no image ({', '.join(IMAGE_SUFFIXES)})")
    from PIL import Image  # pylint: disable=import-outside-toplevel
    images = []
    for f in files:
      try:
        with Image.open(f) as image:
          channels = input_shape[-1] if len(input_shape) == 3 else 1
          array = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.uint8)
      except (OSError, ValueError) as e:
        raise ValueError(f"--input: {f} is not a readable image ({str(e).splitlines()[0]})") from None
      array = array.reshape(array.shape[:2] + ((1,) if len(input_shape) == 3 and channels == 1 else ()))
      if array.shape != tuple(input_shape):
        raise ValueError(f"--input: {f} is {array.shape[1]}x{array.shape[0]} pixels (shape {array.shape}); the "
                         f"model takes images of shape {tuple(input_shape)}")
      images.append(array)
    return [f.name for f in files], np.stack(images)
  if p.suffix in (".npy", ".npz"):
    try:
      with p.open("rb") as f:
        loaded = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"--input={path} is not a readable {p.suffix} file ({str(e).splitlines()[0]})") from None
    if p.suffix == ".npz":
      keys = list(loaded.keys())
      if len(keys) != 1 and "inputs" not in keys:
        raise ValueError(f"--input={path} holds arrays {keys}: name the model inputs `inputs`")
      loaded = loaded["inputs" if "inputs" in keys else keys[0]]
    return [str(i) for i in range(len(loaded))] if loaded.ndim else [], loaded
  if not text_model:
    raise ValueError(f"--input={path}: use a .npy or .npz array or a folder of images (a text file is for text models)")
  lines = p.read_text().splitlines()
  return [str(i + 1) for i in range(len(lines))], lines


def answers(outputs: dict[str, np.ndarray], stage_names: Sequence[str], head_stages: Sequence[str],
            binary: bool) -> list[dict]:
  """One dict per example from named outputs (`Predictor.outputs`'s names): its prediction, the probability
  of that prediction by the head that gave it, the exit stage, and every head's probabilities."""
  rows = []
  for k, (cls, stage) in enumerate(zip(outputs["classes"], outputs["exit_stage"])):
    p = np.asarray(outputs[f"{OUTPUT_PREFIX}{stage_names[stage - 1]}"][k])
    probability = np.where(cls == 1, p, 1 - p) if binary else np.take_along_axis(p, np.asarray(cls)[..., None], -1)[..., 0]
    rows.append({"prediction": np.asarray(cls).tolist(), "probability": np.round(probability, 6).tolist(),
                 "exit_stage": int(stage), "stage": stage_names[stage - 1],
                 "probabilities": {name: np.round(outputs[f"{OUTPUT_PREFIX}{name}"][k], 6).tolist()
                                   for name in head_stages}})
  return rows


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "A trained run's workdir (its newest good checkpoint).")
  flags.DEFINE_string("export_dir", None, "Or an export folder written by --mode=export (no workdir needed).")
  flags.DEFINE_string("input", None, "A text file (one example per line), a .npy / .npz array, or a folder of "
                      "images.")
  flags.DEFINE_string("output", None, "Write one JSON object per example (JSONL) here instead of printing lines.")
  flags.DEFINE_integer("step", None, "With --workdir: the checkpoint of this step instead of the newest.")
  flags.DEFINE_string("weights", "float", "With --workdir: float, or int8 / int4 (the integers of --mode=compress).")
  flags.DEFINE_float("exit_threshold", None, "Early exit: this threshold for every stage that may exit "
                     "(default: the run's config.inference).")
  flags.mark_flags_as_mutual_exclusive(["workdir", "export_dir"], required=True)
  flags.mark_flag_as_required("input")
  return flags.FLAGS


def predict_main(flag_values) -> int:
  """`python -m chainjax.predict`: prints (or writes as JSONL) one answer per example; 0, or 2 with one line."""
  try:
    if flag_values.export_dir:
      from chainjax import exported  # pylint: disable=import-outside-toplevel
      model = exported.load(flag_values.export_dir)
      manifest = model.manifest
      stage_names = [s["name"] for s in manifest["stages"]]
      heads = [s["name"] for s in manifest["stages"] if s.get("head")]
      binary = manifest["stages"][-1]["head"]["binary"]
      text_model = "text" in manifest.get("preprocessing", {})
      if flag_values.exit_threshold is not None:
        raise ValueError("--exit_threshold applies to --workdir; an export's thresholds are fixed at export "
                         "(config.inference)")
      names, examples = read_input(flag_values.input, text_model, tuple(model.input_shape))
      if not names:
        raise ValueError(f"--input={flag_values.input} holds no example")
      outputs = model(examples)
    else:
      config = load_config(flag_values.workdir) if epath.Path(flag_values.workdir).is_dir() else None
      if config is not None and flag_values.exit_threshold is not None:
        config.inference.exit_threshold, config.inference.stage_exit_threshold = flag_values.exit_threshold, ()
      predictor = Predictor.from_workdir(flag_values.workdir, step=flag_values.step, weights=flag_values.weights,
                                         config=config)
      exp = predictor.experiment
      stage_names, heads = exp.stage_names, [name for _, name in predictor._heads]  # pylint: disable=protected-access
      binary = exp.task.label_specs[-1].is_binary
      names, examples = read_input(flag_values.input, exp.config.data.name in data_lib.TEXT,
                                   tuple(exp.task.input_shape))
      if not names:
        raise ValueError(f"--input={flag_values.input} holds no example")
      prediction = predictor(examples)
      outputs = {f"{OUTPUT_PREFIX}{name}": p for name, p in prediction.stages.items()}
      outputs.update(classes=prediction.classes, exit_stage=prediction.exit_stages)
  except ValueError as e:
    print(f"chainjax.predict: error: {e}", file=sys.stderr)
    return 2
  rows = answers(outputs, stage_names, heads, binary)
  if flag_values.output:
    lines = "".join(json.dumps({"example": name, **row}) + "\n" for name, row in zip(names, rows))
    metrics_lib.write_atomically(flag_values.output, lines)
    print(f"{len(rows)} predictions written to {flag_values.output}")
  else:
    early = any(row["exit_stage"] != len(stage_names) for row in rows) or len(heads) > 1
    for name, row in zip(names, rows):
      line = f"{name}\t{row['prediction']}\t{row['probability']}"
      print(line + (f"\tstage {row['exit_stage']} ({row['stage']})" if early else ""))
  return 0


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  sys.exit(predict_main(flags.FLAGS))


__all__ = ["CONFIG_FILE", "Prediction", "Predictor", "load_config"]


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main)
