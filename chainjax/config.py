"""The config schema every experiment starts from, and its validation.

Config files under `configs/` call `base_config()` and change what they need;
`validate(config)` then checks every field against this schema (unknown field,
wrong type, value out of range, stages that do not fit the task) before anything
compiles, and raises one `ConfigError` naming the field and the allowed values.
"""

from __future__ import annotations

import math
import os

import ml_collections

OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "adafactor", "lion")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "exponential_per_epoch", "piecewise_constant",
             "reduce_on_plateau")
STAGE_OPTIM_FIELDS = ("optimizer", "learning_rate", "schedule", "weight_decay", "frozen")


class ConfigError(ValueError):
  """A bad config value; `str(err)` is one line that names the field."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"config.{field}: {message}")


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
  c.chain.phase_steps = ()  # progressive: updates per phase; empty = total_steps split evenly

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

_CHOICES = {
    "chain.mode": ("end_to_end", "deep_supervision", "decoupled", "progressive"),
    "optim.optimizer": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
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
             "optim.learning_rate", "optim.eps", "optim.plateau_patience")
_NON_NEGATIVE = ("seed", "divergence_factor", "data.seed", "data.num_threads", "data.prefetch", "chain.consistency_weight", "optim.warmup_steps",
                 "optim.end_lr_factor", "optim.momentum", "optim.weight_decay", "optim.grad_clip_norm",
                 "optim.steps_per_epoch", "optim.plateau_min_scale", "optim.plateau_min_delta",
                 "early_stopping.patience", "early_stopping.min_delta")


_SEEDS = ("seed", "data.seed")
MAX_SEED = 2**32 - 1
_NUMBER_TUPLES = ("chain.loss_weights", "chain.phase_steps", "optim.boundaries", "optim.scales")


def num_updates(config: ml_collections.ConfigDict, train_size: int = 0) -> int:
  """Optimizer updates of a run: `total_steps`, or `num_epochs` epochs capped at `total_steps` (0 = no cap)."""
  if config.num_epochs <= 0:
    return config.total_steps
  total = config.num_epochs * (train_size // config.batch_size)
  return min(total, config.total_steps) if config.total_steps > 0 else total


def _type_name(value) -> str:
  return type(value).__name__


def _same_type(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _check_schema(config, schema, prefix: str = "") -> None:
  """Unknown fields and wrong types, recursively (stage lists and `optim.per_stage` are checked later)."""
  for key in config.keys():
    field = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(field, f"unknown field; known fields here: {', '.join(sorted(schema.keys()))}")
    value, default = config[key], schema[key]
    if field == "chain.stages":  # checked by _validate_chain
      continue
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(field, f"must be a ConfigDict, got {_type_name(value)}")
      if field != "optim.per_stage":  # keyed by stage names: checked by _validate_optim
        _check_schema(value, default, field + ".")
    elif not _same_type(value, default):
      raise ConfigError(field, f"must be of type {_type_name(default)}, got {value!r} ({_type_name(value)})")
    elif isinstance(default, float) and not math.isfinite(value):  # nan compares False, inf passes lower bounds
      raise ConfigError(field, f"must be a finite number, got {value!r}")


def _get(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int = 1, workdir: str | None = None):
  """Raises `ConfigError` for the first bad field; builds nothing that compiles.

  Opens the data (a TFDS dataset is opened, not read through) and returns the task,
  so that data errors surface here, before training starts. `workdir` is passed to
  the task (a text vocabulary lives there).
  """
  from chainjax import chain as chain_lib
  from chainjax import data as data_lib
  from chainjax import stages as stages_lib

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
  from chainjax import precision

  for field, parse in (("precision.policy", precision.get_policy),
                       ("precision.loss_scale", precision.parse_loss_scale)):
    try:
      parse(_get(config, field))
    except ValueError as e:
      raise ConfigError(field, str(e)) from None
  metric = config.early_stopping.metric
  if metric and not metric.startswith("eval/"):
    raise ConfigError("early_stopping.metric", f"{metric!r} must name an eval metric, e.g. 'eval/accuracy'")
  memory = available_memory()
  example = _synthetic_example(config)  # known before the task exists, which would allocate its held-out set
  if example is not None:
    _check_data_memory(config, num_devices, example, memory)
  if not config.data.name:
    raise ConfigError("data.name", f"is empty; name a synthetic task ({', '.join(data_lib.TASKS)}) or a "
                      "TFDS dataset")
  try:
    task = data_lib.get_task(config, workdir)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError("data", str(e)) from None
  train_size = getattr(task, "train_size", 0)
  if train_size and config.batch_size > train_size:
    raise ConfigError("batch_size", f"{config.batch_size} is larger than the {train_size} training examples of "
                      f"{task.name} (split {config.data.split_train!r})")
  if config.num_epochs and not getattr(task, "train_size", 0):
    raise ConfigError("num_epochs", f"the {task.name} task is an endless stream with no epochs; set "
                      "total_steps instead")
  if example is None:
    _check_data_memory(config, num_devices, _task_example(config, task), memory)
  model = _validate_chain(config, task, stages_lib, chain_lib)
  _validate_optim(config, task)
  _check_state_memory(config, task, num_devices, model, chain_lib, memory)
  return task


# --------------------------------------------------------------------------------------------
# Memory: what one batch and the train state need, against what the machine has.
# --------------------------------------------------------------------------------------------


def available_memory() -> tuple[int, int | None]:
  """(host bytes, bytes of one accelerator or None where devices share host memory, e.g. CPU).

  Host: physical memory, or a smaller cgroup limit (a container). Device: the allocator's
  `bytes_limit` of the first local device, where JAX reports one.
  """
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(limit_file) as f:
        limit = f.read().strip()
    except OSError:
      continue
    if limit.isdigit() and 0 < int(limit) < host:
      host = int(limit)
  device = None
  try:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if stats and stats.get("bytes_limit"):
      device = int(stats["bytes_limit"])
  except Exception:  # a backend without memory statistics: its devices use host memory
    device = None
  return host, device


class _Example:
  """One example's bytes (inputs + labels + mask), how it is described, and the field that sets its size."""

  def __init__(self, input_shape, input_dtype, label_values: int, size_field: str = "", size_value=None):
    import numpy as np

    input_dtype = np.dtype(input_dtype)
    self.bytes = math.prod(input_shape) * input_dtype.itemsize + 4 * label_values + 4  # float32/int32, mask
    self.describe = f"inputs {tuple(input_shape)} {input_dtype.name} + labels + mask"
    self.size_field, self.size_value = size_field, size_value


def _synthetic_example(config) -> _Example | None:
  """The example of a synthetic task, from the config alone (None for other tasks and bad sizes)."""
  data = config.data
  if data.name == "parity" and data.levels >= 1 and data.d >= 1 and data.levels < 64 and 2**data.levels <= data.d:
    return _Example((data.d,), "float32", 2**data.levels - 1, "data.d", data.d)  # XOR levels 2**(L-1) + .. + 1
  if data.name == "line_parity" and data.num_images >= 1:
    from chainjax.data import line_parity

    size = line_parity.IMAGE_SIZE
    return _Example((data.num_images, size, size, 1), "float32", data.num_images + 1, "data.num_images",
                    data.num_images)
  return None


def _task_example(config, task) -> _Example:
  from chainjax import data as data_lib

  labels = sum(math.prod(spec.shape) for spec in task.label_specs)
  size_field = "data.max_len" if config.data.name in data_lib.TEXT else ""
  return _Example(tuple(task.input_shape), task.input_dtype, labels, size_field,
                  config.data.max_len if size_field else None)


def _bytes(n: int) -> str:
  return f"{n} bytes ({n / 1e9:.1f} GB)"


def _need(per_device: int, num_devices: int, memory) -> tuple[int, int, str] | None:
  """(needed, available, description) when `per_device` bytes on every device do not fit, else None."""
  host, device = memory
  if device is not None:
    return (per_device, device, " per device") if per_device > device else None
  total = per_device * num_devices  # devices without memory of their own (CPU) all use host memory
  return (total, host, "") if total > host else None


def _where(memory) -> str:
  return "host memory" if memory[1] is None else "device memory"


def _check_data_memory(config, num_devices: int, example: _Example, memory) -> None:
  """A batch of each kind, per device and on the host, and a synthetic task's held-out set (host)."""
  host = memory[0]
  size_note = f"; the example size is set by {example.size_field}={example.size_value}" if example.size_field else ""
  if example.size_field:  # not even one example per device fits: the example is the problem, not a count
    short = _need(example.bytes, num_devices, memory)
    if short:
      need, available, per = short
      raise ConfigError(example.size_field, f"one example ({example.describe}, {example.size_field}="
                        f"{example.size_value}) is {_bytes(example.bytes)}; one per device needs {_bytes(need)}"
                        f"{per}, more than the {_bytes(available)} of {_where(memory)}")
  for field, kind in (("batch_size", "train"), ("eval_batch_size", "eval")):
    size = config[field]
    head = f"one {kind} batch ({size} examples of {example.bytes} bytes: {example.describe}) needs"
    short = _need(-(-size // num_devices) * example.bytes, num_devices, memory)
    if short:
      need, available, per = short
      raise ConfigError(field, f"{head} {_bytes(need)}{per}, more than the {_bytes(available)} of "
                        f"{_where(memory)}{size_note}")
    if size * example.bytes > host:  # the host assembles every batch before it goes to the devices
      raise ConfigError(field, f"{head} {_bytes(size * example.bytes)}, more than the {_bytes(host)} of host "
                        f"memory{size_note}")
  if config.data.name in ("parity", "line_parity") and config.data.eval_size * example.bytes > host:
    raise ConfigError("data.eval_size", f"the held-out set ({config.data.eval_size} examples of {example.bytes} "
                      f"bytes: {example.describe}) is kept in host memory and needs "
                      f"{_bytes(config.data.eval_size * example.bytes)}, more than the {_bytes(host)} of host "
                      f"memory{size_note}")


def _check_state_memory(config, task, num_devices: int, model, chain_lib, memory) -> None:
  """Parameters + optimizer state from shapes alone (`jax.eval_shape` of `tx.init`: traced, never compiled)."""
  import jax
  from flax import nnx

  from chainjax import optim as optim_lib

  if model is None:
    return
  params = nnx.state(model, nnx.Param)
  leaves = [x for x in jax.tree.leaves(params) if hasattr(x, "shape")]
  param_values = sum(math.prod(x.shape) for x in leaves)
  param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
  try:
    tx = optim_lib.build_optimizer(config.optim, max(num_updates(config, getattr(task, "train_size", 0)), 1),
                                   chain_lib.stage_names(config))
    opt_leaves = jax.tree.leaves(jax.eval_shape(tx.init, params))
    opt_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in opt_leaves if hasattr(x, "shape"))
  except (ValueError, TypeError):  # the optimizer's own errors surface when it is built for the run
    opt_bytes = 0
  per_device = -(-(param_bytes + opt_bytes) // config.mesh.model)  # the `model` axis splits the state
  short = _need(per_device, num_devices, memory)
  if short:
    need, available, per = short
    replicas = "" if per else f" ({num_devices} devices x {_bytes(per_device)})"
    raise ConfigError("chain.stages", f"the parameters ({param_values} values) and the {config.optim.optimizer} "
                      f"state need {_bytes(need)}{per}{replicas}, more than the {_bytes(available)} of "
                      f"{_where(memory)} (the {task.name} input is {tuple(task.input_shape)})")


def _validate_chain(config, task, stages_lib, chain_lib):
  """The stage list against the task; returns the abstract chain (shapes only) for the memory estimate."""
  chain = config.chain
  stages = list(chain.stages)
  specs = task.label_specs
  if not stages:
    raise ConfigError("chain.stages", "is empty; give one stage config per task label")
  for i, stage in enumerate(stages):
    stages_lib.validate_stage_config(stage, f"chain.stages[{i}]")
  names = [s.name for s in stages]
  if len(set(names)) != len(names):
    raise ConfigError("chain.stages", f"stage names must be unique, got {names}")
  if len(stages) != len(specs):
    raise ConfigError("chain.stages", f"the {task.name} task has {len(specs)} stage labels "
                      f"({', '.join(s.name for s in specs)}); got {len(stages)} stages")
  for i, (stage, spec) in enumerate(zip(stages, specs)):
    if stage.loss and stage.loss not in spec.allowed_losses():
      raise ConfigError(f"chain.stages[{i}].loss", f"{stage.loss!r} does not fit label {spec.name!r}; "
                        f"allowed: {', '.join(spec.allowed_losses())}")
  if not stages[-1].head.enabled:
    raise ConfigError(f"chain.stages[{len(stages) - 1}].head.enabled", "the last stage needs a head")
  weights = tuple(chain.loss_weights)
  if weights and len(weights) != len(stages):
    raise ConfigError("chain.loss_weights", f"has {len(weights)} entries for {len(stages)} stages")
  if any(not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights):
    raise ConfigError("chain.loss_weights", f"must be finite numbers >= 0, got {weights}")
  phases = tuple(chain.phase_steps)
  if phases:
    if any(not isinstance(p, int) or p <= 0 for p in phases):
      raise ConfigError("chain.phase_steps", f"must be positive ints, got {phases}")
    updates = num_updates(config, getattr(task, "train_size", 0))  # num_epochs resolved
    if len(phases) != len(stages) or sum(phases) != updates:
      what = f"total_steps={config.total_steps}" if config.num_epochs <= 0 else (
          f"the run's {updates} updates (num_epochs={config.num_epochs}, total_steps={config.total_steps})")
      raise ConfigError("chain.phase_steps", f"needs one budget per stage ({len(stages)}) summing to "
                        f"{what}, got {phases}")
  metric = config.early_stopping.metric
  auc = [s.head.enabled and spec.is_binary and spec.shape == () for s, spec in zip(stages, specs)]
  known = ["eval/loss", "eval/accuracy"] + (["eval/auc"] if auc[-1] else [])
  for i, stage in enumerate(stages):
    if stage.head.enabled:
      known += [f"eval/stage_{i + 1}/{m}" for m in ("loss", "accuracy") + (("auc",) if auc[i] else ())]
  if metric and metric not in known:
    raise ConfigError("early_stopping.metric", f"{metric!r} is not an eval metric of this chain; "
                      f"allowed: {', '.join(known)}")
  if chain.mode == "decoupled":
    for i, stage in enumerate(stages):
      if not stage.head.enabled:
        raise ConfigError(f"chain.stages[{i}].head.enabled", "decoupled mode cuts every gradient between "
                          "stages, so a stage without a head never learns: enable its head, or use deep_supervision")
  if chain.mode == "progressive" and metric:
    raise ConfigError("early_stopping.metric", "progressive mode trains one stage per phase, so the eval metric "
                      "changes meaning at every phase boundary: early stopping is not supported there (set it to '')")
  if chain.mode == "progressive":
    for i, stage in enumerate(stages):
      if not stage.head.enabled:
        raise ConfigError(f"chain.stages[{i}].head.enabled", "progressive mode trains every stage on its "
                          "own head: enable it")
  # Shapes: build the chain abstractly (no parameters allocated, nothing compiled).
  from flax import nnx
  try:
    model = nnx.eval_shape(lambda: chain_lib.build_chain(config, task, rngs=nnx.Rngs(0)))
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError("chain.stages", f"do not fit the {task.name} input (shape {tuple(task.input_shape)}, "
                      f"{task.input_dtype}): {detail}") from None
  _check_model_sharding(config, model, chain_lib)
  return model


def _check_model_sharding(config, model, chain_lib) -> None:
  """A `shard="model"` stage's kernels must split evenly along the `model` axis (else they would silently
  stay replicated)."""
  import jax
  from flax import nnx

  sharded = {i: stage.name for i, stage in enumerate(config.chain.stages) if stage.shard == "model"}
  if config.mesh.model <= 1 or not sharded:
    return
  for path, leaf in jax.tree.leaves_with_path(nnx.state(model, nnx.Param)):
    stage = chain_lib.stage_of_path(path)
    if stage in sharded.values() and len(leaf.shape) >= 2 and leaf.shape[-1] % config.mesh.model:
      index = next(i for i, name in sharded.items() if name == stage)
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ConfigError(f"chain.stages[{index}].shard", f"'model' splits kernels along their output axis, but "
                        f"{name} has {leaf.shape[-1]} outputs, not divisible by mesh.model={config.mesh.model}")



def _validate_optim(config, task) -> None:
  """`config.optim` beyond types and simple ranges: schedule shapes, the plateau rule, per-stage entries."""
  optim = config.optim
  stage_names = [s.name for s in config.chain.stages]
  for field in ("b1", "b2", "momentum"):
    if not 0 <= optim[field] < 1:
      raise ConfigError(f"optim.{field}", f"must be in [0, 1), got {optim[field]!r}")
  for field in ("decay_rate", "lr_decay_per_stage", "plateau_factor"):
    if not 0 < optim[field] <= 1:
      raise ConfigError(f"optim.{field}", f"must be in (0, 1], got {optim[field]!r}")
  if optim.end_lr_factor > 1:  # learning_rate is the peak; the decay ends at learning_rate * end_lr_factor
    raise ConfigError("optim.end_lr_factor", f"must be in [0, 1], got {optim.end_lr_factor!r}")
  if optim.plateau_min_scale > 1:
    raise ConfigError("optim.plateau_min_scale", f"must be in [0, 1], got {optim.plateau_min_scale!r}")
  if not optim.plateau_metric.startswith("eval/"):
    raise ConfigError("optim.plateau_metric", f"{optim.plateau_metric!r} must name an eval metric, e.g. 'eval/loss'")
  boundaries, scales = tuple(optim.boundaries), tuple(optim.scales)
  if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in boundaries):
    raise ConfigError("optim.boundaries", f"must be update counts (ints >= 0), got {boundaries}")
  if any(b >= a for b, a in zip(boundaries, boundaries[1:])):
    raise ConfigError("optim.boundaries", f"must be strictly increasing, got {boundaries}")
  if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0 for s in scales):
    raise ConfigError("optim.scales", f"must be finite numbers >= 0, got {scales}")
  if len(boundaries) != len(scales):
    raise ConfigError("optim.scales", f"has {len(scales)} entries for {len(boundaries)} boundaries")

  # Per-stage entries: known stage names, known and typed fields, "" / -1.0 or a valid value.
  entries = {}
  for name in optim.per_stage.keys():
    field = f"optim.per_stage.{name}"
    if name not in stage_names:
      raise ConfigError(field, f"{name!r} is not a stage name; stages: {', '.join(stage_names)}")
    entry = optim.per_stage[name]
    if not isinstance(entry, ml_collections.ConfigDict):
      raise ConfigError(field, f"must be a ConfigDict (config.stage_optim(...)), got {_type_name(entry)}")
    _check_schema(entry, stage_optim(), field + ".")
    if entry.get("optimizer", "") not in ("",) + OPTIMIZERS:
      raise ConfigError(f"{field}.optimizer", f"{entry.optimizer!r} is not one of: \"\" (inherit), "
                        f"{', '.join(OPTIMIZERS)}")
    if entry.get("schedule", "") not in ("",) + SCHEDULES:
      raise ConfigError(f"{field}.schedule", f"{entry.schedule!r} is not one of: \"\" (inherit), "
                        f"{', '.join(SCHEDULES)}")
    if entry.get("learning_rate", -1.0) != -1.0 and not entry.learning_rate > 0:
      raise ConfigError(f"{field}.learning_rate", f"must be > 0, or -1.0 to inherit, got {entry.learning_rate!r}")
    if entry.get("weight_decay", -1.0) != -1.0 and not entry.weight_decay >= 0:
      raise ConfigError(f"{field}.weight_decay", f"must be >= 0, or -1.0 to inherit, got {entry.weight_decay!r}")
    entries[name] = entry

  # What each stage ends up with.
  for name in stage_names:
    entry = entries.get(name, {})
    if entry and entry.get("frozen", False):
      continue
    where = f"optim.per_stage.{name}" if entry else "optim"
    optimizer = entry.get("optimizer", "") if entry else ""
    schedule = entry.get("schedule", "") if entry else ""
    weight_decay = entry.get("weight_decay", -1.0) if entry else -1.0
    optimizer, schedule = optimizer or optim.optimizer, schedule or optim.schedule
    weight_decay = optim.weight_decay if weight_decay == -1.0 else weight_decay
    if optimizer == "adam" and weight_decay > 0:
      field = f"{where}.weight_decay" if entry and entry.get("weight_decay", -1.0) != -1.0 else (
          f"{where}.optimizer" if entry and entry.get("optimizer", "") else "optim.weight_decay")
      raise ConfigError(field, f"adam has no weight decay (stage {name!r}); use adamw, lamb, lion, sgd or "
                        "adafactor, or weight_decay=0")
    total = num_updates(config, getattr(task, "train_size", 0))
    if schedule in ("warmup_cosine", "warmup_linear") and optim.warmup_steps >= total:
      raise ConfigError("optim.warmup_steps", f"must be < the {total} updates of this run for {schedule}")
    if schedule == "exponential_per_epoch" and optim.steps_per_epoch == 0 and not getattr(task, "train_size", 0):
      raise ConfigError("optim.steps_per_epoch", f"exponential_per_epoch needs the epoch length and the "
                        f"{task.name} task has no epochs (an endless stream): set it > 0")
