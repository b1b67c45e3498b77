"""The config schema every experiment starts from, the parsing of config arguments, and field checks.

Config files under `configs/` call `base_config()` and change what they need;
`validate(config)` then checks every field against this schema (unknown field,
wrong type, value out of range) and raises one `ConfigError` naming the field and
the allowed values. This module imports nothing of JAX: what needs the task, the
chain or the optimizer is checked by `experiment.validate`, which calls this first.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import types
from collections.abc import Callable

import ml_collections

from chainjax.errors import ConfigError  # re-exported: `config.ConfigError` is where users catch it



def load_file(path: str) -> types.ModuleType:
  """The module of a config file, loaded by its path (`configs/line_parity.py`).

  Config files are not a package: `--config` names a file, and a config may build on another
  (`experiments/<paper>/config.py` on `configs/<task>.py`). Errors of the file propagate as raised.
  """
  name = "chainjax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ImportError(f"{path} is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str, **defaults) -> dict:
  """`get_config` variants: `"mode=decoupled,runlocal"` -> {"mode": "decoupled", "runlocal": True}.

  Each key must be one of `defaults`; its value is converted to the default's type,
  and a bare key sets a flag. A flag takes only true/false, 1/0, yes/no (any case) or
  nothing: `runlocal=maybe` is refused rather than read as False (which starts a full run).
  """
  out = dict(defaults)
  for item in filter(None, (a.strip() for a in (arg or "").split(","))):
    key, _, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed: {', '.join(defaults)}")
    if isinstance(defaults[key], bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f"config argument {key!r} must be true or false (also 1/0, yes/no, or {key} alone), "
                         f"got {value!r}")
      out[key] = value.lower() in _TRUE
    else:
      try:
        out[key] = type(defaults[key])(value)
      except ValueError:
        raise ValueError(f"config argument {key!r} must be {type(defaults[key]).__name__}, got {value!r}") from None
  return out


_TRUE, _FALSE = ("", "1", "true", "yes"), ("0", "false", "no")


def base_config() -> ml_collections.ConfigDict:
  """Every field chainjax reads, typed, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, dropout and the training stream
  c.batch_size = 256  # global, across all devices and hosts
  c.eval_batch_size = 1024
  c.total_steps = 1000  # optimizer updates; with num_epochs > 0 a cap (0 = no cap)
  c.num_epochs = 0  # > 0: train for this many epochs of the training split (eval + Keras line per epoch)
  c.eval_every = 200
  c.checkpoint_every = 500
  c.log_every = 50
  c.max_to_keep = 3
  # Stop (exit 3) when the train loss exceeds this many times its first logged value; 0 = off.
  c.divergence_factor = 1000.0
  # "START:END": a jax.profiler trace of updates START..END-1 (numbered as the logs and checkpoints number them,
  # from 1), written by process 0 to <workdir>/tensorboard/plugins/profile/ for TensorBoard's Profile tab; "" = off.
  c.profile_steps = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = "parity"
  c.data.seed = 0  # fixes the task itself (parity subset) and the held-out set
  c.data.eval_size = 4096
  c.data.d = 32  # parity: number of input bits
  c.data.levels = 3  # parity: XOR-tree depth; subset size 2**levels; one stage per level
  c.data.num_images = 3  # line_parity: images per example
  # TFDS datasets (any other name): read with tfds.data_source from data_dir, through Grain.
  c.data.data_dir = ""  # "" = the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR); gs:// works
  c.data.split_train = "train"
  c.data.split_eval = "test"  # evaluated every eval_every updates (or every epoch)
  c.data.split_test = ""  # evaluated once at the end, logged as test/...; "" = none
  c.data.num_threads = 4  # Grain read threads per process
  c.data.prefetch = 8  # Grain prefetch buffer (batches)
  c.data.cache = False  # keep decoded records in host memory after the first read (small datasets)
  # Text datasets (imdb_reviews, glue/sst2, synthetic_sentiment).
  c.data.vocab_size = 20000  # top-N words of the training split, plus padding (0) and OOV (1)
  c.data.max_len = 256  # tokens per example, padded or truncated
  c.data.padding = "pre"  # where short texts get their padding ids: "pre" (as Keras) | "post"
  c.data.truncating = "pre"  # which end of a long text is cut: "pre" keeps the end (as Keras) | "post"
  c.data.train_size = 20000  # synthetic_sentiment: training sentences (the eval set has data.eval_size)

  c.chain = ml_collections.ConfigDict()
  c.chain.mode = "deep_supervision"
  c.chain.stages = []  # list of stage configs: chainjax.stages.stage_config(type, name, ...)
  c.chain.loss_weights = ()  # w_i per stage; empty = all 1.0
  c.chain.consistency_weight = 0.0  # KL between consecutive heads of the same label space
  c.chain.phase_steps = ()  # progressive*: updates per stage-wise phase; empty = the updates split evenly
  c.chain.finetune_steps = 0  # progressive_finetune: updates of the final end-to-end phase

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "adam"  # adam | adamw | sgd | lamb | adafactor | lion
  c.optim.learning_rate = 1e-3  # peak LR; schedules are indexed by optimizer updates
  # constant | warmup_cosine | warmup_linear | exponential_per_epoch | piecewise_constant | reduce_on_plateau
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0  # warmup_cosine, warmup_linear: linear warmup from 0
  c.optim.end_lr_factor = 0.0  # warmup_cosine, warmup_linear: final LR = learning_rate * end_lr_factor
  c.optim.decay_rate = 0.1  # exponential_per_epoch: LR = learning_rate * decay_rate**epoch (staircase)
  c.optim.steps_per_epoch = 0  # exponential_per_epoch: updates per epoch; 0 = from the data
  c.optim.boundaries = ()  # piecewise_constant: updates at which the LR is multiplied by ...
  c.optim.scales = ()  # ... these factors (cumulative, as optax.piecewise_constant_schedule)
  c.optim.plateau_metric = "eval/loss"  # reduce_on_plateau: the eval metric that drives it
  c.optim.plateau_mode = "min"  # min | max: whether a lower or a higher metric is better
  c.optim.plateau_factor = 0.5  # LR scale *= factor after `plateau_patience` evals without improvement
  c.optim.plateau_patience = 3
  c.optim.plateau_min_scale = 0.0  # the scale never drops below this
  c.optim.plateau_min_delta = 0.0  # an improvement must beat the best value by more than this
  c.optim.b1 = 0.9  # adam, adamw, lamb, lion
  c.optim.b2 = 0.999  # adam, adamw, lamb, lion
  c.optim.eps = 1e-8  # adam, adamw, lamb
  c.optim.mu_dtype = ""  # first-moment (momentum) dtype: "" = the parameters' dtype, or "bfloat16"
  c.optim.momentum = 0.9  # sgd; 0 = plain SGD
  c.optim.nesterov = False  # sgd
  # Decoupled, on kernels/embeddings only (ndim >= 2): adamw, lamb, lion, sgd (SGDW), adafactor; not adam.
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 0.0  # global-norm clipping of the (accumulated) gradient; 0 = no clipping
  c.optim.accum_steps = 1  # micro-batches per optimizer update (gradient accumulation in the train step)
  c.optim.accum_impl = "scan"  # scan | optax: accumulate with lax.scan in one step, or optax.MultiSteps
  c.optim.lr_decay_per_stage = 1.0  # stage i of n gets learning_rate * decay**(n-1-i); 1.0 = off
  c.optim.per_stage = ml_collections.ConfigDict()  # {stage name: stage_optim(...)}; absent = the default

  c.early_stopping = ml_collections.ConfigDict()
  c.early_stopping.metric = ""  # e.g. "eval/accuracy"; "" = off
  c.early_stopping.mode = "max"
  c.early_stopping.patience = 3  # evals without improvement before stopping
  c.early_stopping.min_delta = 0.0

  # Magnitude pruning of every stage's kernels (chainjax.compress.prune): gradual, from initial_sparsity at
  # begin_step to the target at end_step, masks recomputed every `frequency` updates; biases are never pruned.
  c.compress = ml_collections.ConfigDict()
  # Quantization-aware training (chainjax.compress.quant): rule strings "<regex on module paths> w=<bits> a=<bits>
  # [per_channel=true] [act_symmetric=false] [act_range=ema|lsq]", first match wins, e.g. "stages/level1/.* w=8 a=8".
  c.compress.qat = ml_collections.ConfigDict()
  c.compress.qat.rules = ()  # empty = float training
  c.compress.qat.start_step = 0  # updates of float training before the rules take effect (0 = QAT from the start)
  c.compress.qat.boundary_bits = 0  # quantize every stage's output (the activation passed down the chain); 0 = float
  # A workdir whose newest checkpoint gives the initial parameters (and BatchNorm statistics), e.g. a float run to
  # fine-tune with QAT or pruning; "" = initialize from `seed`. Its optimizer state and step are not used.
  c.compress.init_from = ""
  # --mode=compress (post-training quantization of a trained workdir, chainjax.compression):
  c.compress.ptq_bits = (8, 4)  # the integer widths of the weights to evaluate (4 is stored packed, two per byte)
  c.compress.sensitivity = False  # also quantize / prune one stage at a time and report each stage's metric drop
  c.compress.sensitivity_sparsity = (0.5, 0.8, 0.9)  # the one-shot sparsities of the sensitivity scan
  c.compress.prune = ml_collections.ConfigDict()
  c.compress.prune.sparsity = 0.0  # final fraction of zeros in each pruned kernel; 0 = no pruning
  c.compress.prune.stage_sparsity = ()  # one target per stage (0 = that stage is not pruned); empty = `sparsity`
  c.compress.prune.initial_sparsity = 0.0
  c.compress.prune.begin_step = 0  # updates, 0-based; begin_step == end_step is one-shot pruning
  c.compress.prune.end_step = -1  # -1 = the run's last update
  c.compress.prune.frequency = 100  # updates between mask updates
  c.compress.prune.power = 3.0  # the polynomial schedule's exponent (Zhu & Gupta 2017)
  c.compress.prune.scope = "layerwise"  # layerwise: each kernel reaches the target | global: a stage's kernels together
  c.compress.prune.n_m = ""  # e.g. "2:4": keep N of every M weights along the input axis (N:M structured)

  # Inference (chainjax.predict, chainjax.export): early exit through the chain's own heads. An example leaves
  # the chain at the first stage whose head's confidence (the max softmax probability, or the sigmoid margin
  # |2p - 1| of a binary head, the smallest over its labels) is >= that stage's threshold; 1.0 = that stage
  # never exits. Only heads that answer the last stage's task (the same label shape and classes) can exit.
  c.inference = ml_collections.ConfigDict()
  c.inference.exit_threshold = 1.0  # every stage before the last; 1.0 = no early exit
  c.inference.stage_exit_threshold = ()  # one threshold per stage before the last; empty = `exit_threshold`
  # --mode=early_exit_report (chainjax.early_exit): the thresholds swept, each for every stage that may exit.
  c.inference.report_thresholds = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)

  # --mode=diagnose (chainjax.diagnostics): the signal-to-noise ratio of every stage's gradient under each chain
  # mode, on the same parameters and training batches (Shalev-Shwartz et al. 2017, fig. 5).
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.modes = ()  # chain mode names (or one comma-separated string); empty = every mode the heads allow
  c.diagnostics.num_batches = 32  # N >= 2 training batches: their mean gradient and its spread
  c.diagnostics.batch_size = 0  # examples per batch; 0 = the run's batch_size
  c.diagnostics.step = -1  # -1 = the newest good checkpoint (none: initialization), 0 = initialization, k = step k

  c.mesh = ml_collections.ConfigDict()
  c.mesh.model = 1  # devices per model replica (the `model` mesh axis); data axis = devices / model

  c.precision = ml_collections.ConfigDict()
  c.precision.policy = "float32"  # jmp-style: "params=float32,compute=bfloat16,output=float32"
  c.precision.loss_scale = "none"  # "none" | "static:<value>" | "dynamic[:initial_scale=..,period=..,min_scale=..]"
  return c


def stage_optim(optimizer: str = "", learning_rate: float = -1.0, schedule: str = "",
                weight_decay: float = -1.0, frozen: bool = False) -> ml_collections.ConfigDict:
  """One `config.optim.per_stage.<stage>` entry; "" and -1.0 inherit the default `config.optim` value.

  `learning_rate` given here is used as is (`lr_decay_per_stage` does not apply to it);
  the schedule's shape (warmup, boundaries, plateau rule, ...) is the default's.
  `frozen=True` wins over everything else: the stage's parameters never change.
  """
  return ml_collections.ConfigDict(dict(optimizer=optimizer, learning_rate=float(learning_rate),
                                        schedule=schedule, weight_decay=float(weight_decay), frozen=frozen))


def per_stage_optim(stage_names) -> ml_collections.ConfigDict:
  """`config.optim.per_stage` with an all-inherit entry per stage, so that the command line can
  override any of them (`--config.optim.per_stage.<stage>.frozen=True`)."""
  return ml_collections.ConfigDict({name: stage_optim() for name in stage_names})


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------

# Fields whose allowed values are the config's own; the names a module owns (chain.mode, optim.optimizer,
# optim.schedule, data.name) are checked by that module (see `experiment.validate`).
_CHOICES = {
    "optim.mu_dtype": ("", "float32", "bfloat16"),
    "optim.plateau_mode": ("min", "max"),
    "early_stopping.mode": ("max", "min"),
    "optim.accum_impl": ("scan", "optax"),
    "data.padding": ("pre", "post"),
    "data.truncating": ("pre", "post"),
}
_POSITIVE = ("batch_size", "eval_batch_size", "total_steps", "eval_every", "checkpoint_every",
             "log_every", "max_to_keep", "optim.accum_steps", "mesh.model", "data.eval_size", "data.d", "data.levels", "data.num_images",
             "data.vocab_size", "data.max_len", "data.train_size",
             "optim.learning_rate", "optim.eps", "optim.plateau_patience", "compress.prune.frequency")
_NON_NEGATIVE = ("seed", "divergence_factor", "data.seed", "data.num_threads", "data.prefetch", "chain.consistency_weight", "optim.warmup_steps",
                 "optim.end_lr_factor", "optim.momentum", "optim.weight_decay", "optim.grad_clip_norm",
                 "optim.steps_per_epoch", "chain.finetune_steps", "optim.plateau_min_scale", "optim.plateau_min_delta",
                 "early_stopping.patience", "early_stopping.min_delta", "compress.prune.begin_step",
                 "compress.qat.start_step", "compress.qat.boundary_bits")


_SEEDS = ("seed", "data.seed")
MAX_SEED = 2**32 - 1
_NUMBER_TUPLES = ("chain.loss_weights", "chain.phase_steps", "optim.boundaries", "optim.scales",
                  "compress.prune.stage_sparsity", "compress.ptq_bits", "compress.sensitivity_sparsity",
                  "inference.stage_exit_threshold", "inference.report_thresholds")
MIN_BITS, MAX_BITS = 2, 8  # the integer widths of chainjax.compress (quant.MIN_BITS, quant.MAX_BITS)


def num_updates(config: ml_collections.ConfigDict, train_size: int = 0) -> int:
  """Optimizer updates of a run: `total_steps`, or `num_epochs` epochs capped at `total_steps` (0 = no cap)."""
  if config.num_epochs <= 0:
    return config.total_steps
  total = config.num_epochs * (train_size // config.batch_size)
  return min(total, config.total_steps) if config.total_steps > 0 else total


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """`config.profile_steps`: `"3:6"` -> (3, 6), the updates 3, 4 and 5 (END is exclusive); `""` -> None.

  Raises `ConfigError` naming the field unless the text is two integers with 1 <= START < END.
  """
  if not text:
    return None
  start, sep, end = text.partition(":")
  try:
    window = (int(start), int(end)) if sep else None
  except ValueError:
    window = None
  if window is None or not 1 <= window[0] < window[1]:
    raise ConfigError("profile_steps", f"{text!r} is not START:END with 1 <= START < END (update numbers, END "
                      "exclusive), e.g. '3:6'; '' = no profiling")
  return window


def type_name(value) -> str:
  """How a schema names the type of `value` (a default) in its messages."""
  return "tuple" if isinstance(value, (tuple, list)) else type(value).__name__


def has_type(value, default) -> bool:
  """Whether `value` fits the type of `default`: an int fits a float, a bool fits only a bool, a
  list fits a tuple, and the entries of a non-empty tuple default fix the type of the entries."""
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, numbers.Real)
  if isinstance(default, int):
    return isinstance(value, numbers.Integral)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list)) and (not default or all(has_type(v, default[0]) for v in value))
  return isinstance(value, type(default))


def check_schema(config, schema, prefix: str = "", *, complete: bool = False,
                 skip: Callable[[str], bool] = lambda field: False) -> None:
  """Raises `ConfigError` for an unknown field or a wrong type in `config`, recursively; the one schema
  checker of chainjax (the config, `optim.per_stage` entries and stage configs use it).

  `schema` is a ConfigDict or dict of typed defaults; `complete`: a field of `schema` missing from
  `config` is an error too; `skip(field)`: fields checked elsewhere (their values are not looked at).
  """
  for key in config.keys():
    field = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(field, f"unknown field; known fields here: {', '.join(sorted(schema.keys()))}")
  for key in schema.keys():
    field = f"{prefix}{key}"
    if key not in config:
      if complete:
        raise ConfigError(field, "missing field")
      continue
    value, default = config[key], schema[key]
    if skip(field):
      continue
    if isinstance(default, (dict, ml_collections.ConfigDict)):
      if not hasattr(value, "keys"):
        raise ConfigError(field, f"must be a ConfigDict with fields {', '.join(sorted(default.keys()))}, got "
                          f"{value!r} ({type_name(value)})")
      check_schema(value, default, field + ".", complete=complete, skip=skip)
    elif not has_type(value, default):
      if isinstance(default, (tuple, list)) and default and isinstance(value, (tuple, list)):
        raise ConfigError(field, f"entries must be of type {type_name(default[0])}, got {value!r}")
      raise ConfigError(field, f"must be of type {type_name(default)}, got {value!r} ({type_name(value)})")
    elif isinstance(default, float) and not math.isfinite(value):  # nan compares False, inf passes lower bounds
      raise ConfigError(field, f"must be a finite number, got {value!r}")


def _check_schema(config, schema, prefix: str = "") -> None:
  """Unknown fields and wrong types of the config (stage lists and `optim.per_stage` are checked by their owners)."""
  check_schema(config, schema, prefix, skip=lambda field: field in ("chain.stages", "optim.per_stage"))


def _get(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def _check_compress(compress: ml_collections.ConfigDict) -> None:
  """The integer widths and the sensitivity sparsities of `config.compress`."""
  bits = compress.qat.boundary_bits
  if bits and not MIN_BITS <= bits <= MAX_BITS:
    raise ConfigError("compress.qat.boundary_bits", f"must be 0 (float) or in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
  widths = tuple(compress.ptq_bits)
  if not widths:
    raise ConfigError("compress.ptq_bits", "is empty: name the integer widths to evaluate, e.g. (8, 4)")
  for bits in widths:
    if not MIN_BITS <= bits <= MAX_BITS:
      raise ConfigError("compress.ptq_bits", f"widths must be in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
  if len(set(widths)) != len(widths):
    raise ConfigError("compress.ptq_bits", f"names a width twice: {widths}")
  for sparsity in compress.sensitivity_sparsity:
    if not 0.0 <= sparsity < 1.0:
      raise ConfigError("compress.sensitivity_sparsity", f"sparsities must be in [0, 1), got {sparsity!r}")


def _check_inference(config: ml_collections.ConfigDict) -> None:
  """The early-exit thresholds: in [0, 1], one per stage before the last."""
  inference, n = config.inference, len(config.chain.stages)
  if not 0.0 <= inference.exit_threshold <= 1.0:
    raise ConfigError("inference.exit_threshold", f"must be in [0, 1] (1.0 = no early exit), got "
                      f"{inference.exit_threshold!r}")
  thresholds = tuple(inference.stage_exit_threshold)
  if thresholds and len(thresholds) != n - 1:
    raise ConfigError("inference.stage_exit_threshold", f"has {len(thresholds)} entries: give one per stage before "
                      f"the last ({n - 1}), or none")
  if any(not 0.0 <= t <= 1.0 for t in thresholds):
    raise ConfigError("inference.stage_exit_threshold", f"thresholds must be in [0, 1], got {thresholds}")
  sweep = tuple(inference.report_thresholds)
  if not sweep or any(not 0.0 <= t <= 1.0 for t in sweep):
    raise ConfigError("inference.report_thresholds", f"must be thresholds in [0, 1], at least one, got {sweep}")


def _check_diagnostics(diagnostics: ml_collections.ConfigDict, num_devices: int) -> None:
  """`config.diagnostics` on its own (the mode names belong to `chain.MODES`: `diagnostics.resolve_modes`)."""
  modes = tuple(diagnostics.modes)
  if any(not isinstance(m, str) for m in modes):
    raise ConfigError("diagnostics.modes", f"entries must be chain mode names (str), got {modes!r}")
  if len(set(modes)) != len(modes):
    raise ConfigError("diagnostics.modes", f"names a mode twice: {modes}")
  if diagnostics.num_batches < 2:
    raise ConfigError("diagnostics.num_batches", f"must be >= 2 (the spread of the per-batch gradients needs two "
                      f"batches), got {diagnostics.num_batches!r}")
  if diagnostics.batch_size < 0:
    raise ConfigError("diagnostics.batch_size", f"must be >= 0 (0 = the run's batch_size), got "
                      f"{diagnostics.batch_size!r}")
  if diagnostics.batch_size % num_devices:
    raise ConfigError("diagnostics.batch_size", f"{diagnostics.batch_size} is not divisible by the {num_devices} "
                      f"devices; use a multiple of {num_devices}")
  if diagnostics.step < -1:
    raise ConfigError("diagnostics.step", f"must be >= 0, or -1 (the newest checkpoint), got {diagnostics.step!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises `ConfigError` for the first field that is unknown, mistyped or out of its range.

  The fields on their own, against this schema and `num_devices`: nothing is imported or
  built. What needs the task, the chain or the optimizer (the mode and optimizer names
  their modules own, shapes, phase budgets, memory) is checked by `experiment.validate`.
  """
  _check_schema(config, base_config())
  for field in _NUMBER_TUPLES:
    # `--config.x='(1.0,nan,1.0)'`: what ml_collections cannot read as a literal tuple arrives as
    # the 1-tuple of that string, which would otherwise read as "has 1 entries".
    texts = [v for v in _get(config, field) if isinstance(v, str)]
    if texts:
      raise ConfigError(field, f"could not parse {texts[0]!r} as a tuple of numbers")
  for field, allowed in _CHOICES.items():
    if _get(config, field) not in allowed:
      raise ConfigError(field, f"{_get(config, field)!r} is not one of: {', '.join(allowed)}")
  if config.num_epochs < 0:
    raise ConfigError("num_epochs", f"must be >= 0, got {config.num_epochs!r}")
  for field in _POSITIVE:
    if field == "total_steps" and config.num_epochs > 0:  # a cap, 0 = none
      if config.total_steps < 0:
        raise ConfigError(field, f"must be >= 0 (0 = no cap on num_epochs), got {config.total_steps!r}")
      continue
    if not _get(config, field) > 0:
      raise ConfigError(field, f"must be > 0, got {_get(config, field)!r}")
  for field in _NON_NEGATIVE:
    if not _get(config, field) >= 0:
      raise ConfigError(field, f"must be >= 0, got {_get(config, field)!r}")
  for field in _SEEDS:  # jax.random.key takes an int64; the data streams (numpy, Grain) are kept to uint32
    if _get(config, field) > MAX_SEED:
      raise ConfigError(field, f"must be in [0, {MAX_SEED}], got {_get(config, field)!r}")
  _check_compress(config.compress)
  _check_inference(config)
  _check_diagnostics(config.diagnostics, num_devices)
  parse_profile_steps(config.profile_steps)
  if 0 < config.divergence_factor <= 1:
    raise ConfigError("divergence_factor", f"must be > 1 (or 0 = off), got {config.divergence_factor!r}")
  if config.batch_size % num_devices:
    raise ConfigError("batch_size", f"{config.batch_size} is not divisible by the {num_devices} devices; "
                      f"use a multiple of {num_devices}")
  if num_devices % config.mesh.model:
    raise ConfigError("mesh.model", f"{config.mesh.model} does not divide the {num_devices} devices")
  micro_batch, rest = divmod(config.batch_size, config.optim.accum_steps)
  if rest or micro_batch % num_devices:
    raise ConfigError("optim.accum_steps", f"batch_size={config.batch_size} must split into accum_steps="
                      f"{config.optim.accum_steps} micro-batches whose size is a multiple of the {num_devices} devices")
  if config.eval_batch_size % num_devices:
    raise ConfigError("eval_batch_size", f"{config.eval_batch_size} is not divisible by the {num_devices} "
                      f"devices; use a multiple of {num_devices}")
  metric = config.early_stopping.metric
  if metric and not metric.startswith("eval/"):
    raise ConfigError("early_stopping.metric", f"{metric!r} must name an eval metric, e.g. 'eval/accuracy'")
