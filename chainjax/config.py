"""The config schema every experiment starts from, and its validation.

Config files under `configs/` call `base_config()` and change what they need;
`validate(config)` then checks every field against this schema (unknown field,
wrong type, value out of range, stages that do not fit the task) before anything
compiles, and raises one `ConfigError` naming the field and the allowed values.
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
  """A bad config value; `str(err)` is one line that names the field."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"config.{field}: {message}")


def parse_arg(arg: str, **defaults) -> dict:
  """`get_config` variants: `"mode=decoupled,runlocal"` -> {"mode": "decoupled", "runlocal": True}.

  Each key must be one of `defaults`; its value is converted to the default's type,
  and a bare key sets a flag.
  """
  out = dict(defaults)
  for item in filter(None, (a.strip() for a in (arg or "").split(","))):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed: {', '.join(defaults)}")
    if isinstance(defaults[key], bool):
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = type(defaults[key])(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every field chainjax reads, typed, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # init, dropout and the training stream
  c.batch_size = 256  # global, across all devices and hosts
  c.eval_batch_size = 1024
  c.total_steps = 1000  # optimizer updates
  c.eval_every = 200
  c.checkpoint_every = 500
  c.log_every = 50
  c.max_to_keep = 3

  c.data = ml_collections.ConfigDict()
  c.data.name = "parity"
  c.data.seed = 0  # fixes the task itself (parity subset) and the held-out set
  c.data.eval_size = 4096
  c.data.d = 32  # parity: number of input bits
  c.data.levels = 3  # parity: XOR-tree depth; subset size 2**levels; one stage per level
  c.data.num_images = 3  # line_parity: images per example

  c.chain = ml_collections.ConfigDict()
  c.chain.mode = "deep_supervision"
  c.chain.stages = []  # list of stage configs: chainjax.stages.stage_config(type, name, ...)
  c.chain.loss_weights = ()  # w_i per stage; empty = all 1.0
  c.chain.consistency_weight = 0.0  # KL between consecutive heads of the same label space
  c.chain.phase_steps = ()  # progressive: updates per phase; empty = total_steps split evenly

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.end_lr_factor = 0.0  # warmup_cosine: final LR = learning_rate * end_lr_factor
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.momentum = 0.9  # sgd
  c.optim.nesterov = False  # sgd
  c.optim.weight_decay = 0.0  # adamw
  c.optim.grad_clip_norm = 0.0  # 0 = no clipping

  c.early_stopping = ml_collections.ConfigDict()
  c.early_stopping.metric = ""  # e.g. "eval/accuracy"; "" = off
  c.early_stopping.mode = "max"
  c.early_stopping.patience = 3  # evals without improvement before stopping
  c.early_stopping.min_delta = 0.0
  return c


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------

_CHOICES = {
    "chain.mode": ("end_to_end", "deep_supervision", "decoupled", "progressive"),
    "optim.optimizer": ("adam", "adamw", "sgd"),
    "optim.schedule": ("constant", "warmup_cosine"),
    "early_stopping.mode": ("max", "min"),
}
_POSITIVE = ("batch_size", "eval_batch_size", "total_steps", "eval_every", "checkpoint_every",
             "log_every", "max_to_keep", "data.eval_size", "data.d", "data.levels", "data.num_images",
             "optim.learning_rate", "optim.eps")
_NON_NEGATIVE = ("seed", "data.seed", "chain.consistency_weight", "optim.warmup_steps",
                 "optim.end_lr_factor", "optim.momentum", "optim.weight_decay", "optim.grad_clip_norm",
                 "early_stopping.patience", "early_stopping.min_delta")


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
  """Unknown fields and wrong types, recursively (stage lists are checked by the stages module)."""
  for key in config.keys():
    field = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(field, f"unknown field; known fields here: {', '.join(sorted(schema.keys()))}")
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(field, f"must be a ConfigDict, got {_type_name(value)}")
      _check_schema(value, default, field + ".")
    elif field == "chain.stages":
      continue
    elif not _same_type(value, default):
      raise ConfigError(field, f"must be of type {_type_name(default)}, got {value!r} ({_type_name(value)})")


def _get(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises `ConfigError` for the first bad field; builds nothing that compiles."""
  from chainjax import chain as chain_lib
  from chainjax import data as data_lib
  from chainjax import stages as stages_lib

  _check_schema(config, base_config())
  for field, allowed in _CHOICES.items():
    if _get(config, field) not in allowed:
      raise ConfigError(field, f"{_get(config, field)!r} is not one of: {', '.join(allowed)}")
  for field in _POSITIVE:
    if not _get(config, field) > 0:
      raise ConfigError(field, f"must be > 0, got {_get(config, field)!r}")
  for field in _NON_NEGATIVE:
    if not _get(config, field) >= 0:
      raise ConfigError(field, f"must be >= 0, got {_get(config, field)!r}")
  if config.batch_size % num_devices:
    raise ConfigError("batch_size", f"{config.batch_size} is not divisible by the {num_devices} devices; "
                      f"use a multiple of {num_devices}")
  if config.eval_batch_size % num_devices:
    raise ConfigError("eval_batch_size", f"{config.eval_batch_size} is not divisible by the {num_devices} "
                      f"devices; use a multiple of {num_devices}")
  if config.optim.warmup_steps >= config.total_steps and config.optim.schedule == "warmup_cosine":
    raise ConfigError("optim.warmup_steps", f"must be < total_steps={config.total_steps}")
  metric = config.early_stopping.metric
  if metric and not metric.startswith("eval/"):
    raise ConfigError("early_stopping.metric", f"{metric!r} must name an eval metric, e.g. 'eval/accuracy'")
  if config.data.name not in data_lib.TASKS:
    raise ConfigError("data.name", f"{config.data.name!r} is not one of: {', '.join(data_lib.TASKS)}")
  try:
    task = data_lib.get_task(config)
  except ValueError as e:
    raise ConfigError("data", str(e)) from None
  _validate_chain(config, task, stages_lib, chain_lib)


def _validate_chain(config, task, stages_lib, chain_lib) -> None:
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
  if any(not isinstance(w, (int, float)) or w < 0 for w in weights):
    raise ConfigError("chain.loss_weights", f"must be numbers >= 0, got {weights}")
  phases = tuple(chain.phase_steps)
  if phases:
    if any(not isinstance(p, int) or p <= 0 for p in phases):
      raise ConfigError("chain.phase_steps", f"must be positive ints, got {phases}")
    if len(phases) != len(stages) or sum(phases) != config.total_steps:
      raise ConfigError("chain.phase_steps", f"needs one budget per stage ({len(stages)}) summing to "
                        f"total_steps={config.total_steps}, got {phases}")
  if chain.mode == "progressive":
    for i, stage in enumerate(stages):
      if not stage.head.enabled:
        raise ConfigError(f"chain.stages[{i}].head.enabled", "progressive mode trains every stage on its "
                          "own head: enable it")
  # Shapes: build the chain abstractly (no parameters allocated, nothing compiled).
  from flax import nnx
  nnx.eval_shape(lambda: chain_lib.build_chain(config, task, rngs=nnx.Rngs(0)))

