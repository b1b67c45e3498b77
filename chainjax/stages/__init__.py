"""Chain stages: the config schema of each stage type, and builders for stages and heads.

A chain model is `h_1 = M_1(x), h_i = M_i(h_{i-1})`; each stage `M_i` may carry a
head that predicts stage `i`'s label. Every stage and head module is called as
`module(x, *, train, key=None)` with the batch axis first; `train` switches
BatchNorm to batch statistics and enables dropout, and `key` (dropout only) may
be None when there is no dropout to apply.

A stage config is a typed `ml_collections.ConfigDict` made by `stage_config`;
`validate_stage_config` checks one against the schema of its type before
anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from chainjax import config as config_lib
from chainjax.errors import ConfigError
from chainjax.data.base import LabelSpec
from chainjax.stages import conv, embedding, head, lstm, mlp, transformer
from chainjax.stages import init as init_lib

PASS_TO_NEXT = ("hidden", "prediction")


@dataclasses.dataclass(frozen=True)
class _Schema:
  """Typed defaults of one stage type's own fields, and what values they may take."""

  module: Any  # the module with `build(cfg, in_shape, in_dtype, *, rngs, path)`
  defaults: dict[str, Any]
  choices: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  positive: tuple[str, ...] = ()  # ints (or tuples of ints) that must be > 0
  rates: tuple[str, ...] = ()  # floats in [0, 1)


_COMMON_DEFAULTS = {
    "name": "",
    "type": "",
    "loss": "",  # "" = the task's default loss for this stage's label; else a name in chain.LOSSES
    "pass_to_next": "hidden",
    # Kernel init of every Dense/Conv/Embedding/attention kernel of the stage and its
    # head, by name (`init.INITS`); "default" = each Flax module's own default.
    "init": "default",
    # "model": split the stage's kernels along the mesh's `model` axis (config.mesh.model > 1).
    "shard": "replicated",
    "head": {"enabled": True, "pool": "flatten", "hidden": 0},
}
_COMMON_CHOICES = {
    "shard": ("replicated", "model"),
    "pass_to_next": PASS_TO_NEXT, "init": init_lib.INITS, "head.pool": head.POOLS,
}

_SCHEMAS = {
    "mlp": _Schema(
        mlp, {"features": 256, "depth": 2, "activation": "relu", "norm": "none"},
        choices={"activation": tuple(mlp.ACTIVATIONS), "norm": mlp.NORMS}, positive=("features", "depth")),
    "conv": _Schema(
        conv, {"features": (32, 64), "kernel_size": 3, "pool": "max", "norm": "none"},
        choices={"pool": conv.POOLS, "norm": conv.NORMS}, positive=("features", "kernel_size")),
    "embedding": _Schema(
        embedding, {"vocab_size": 20000, "features": 128}, positive=("vocab_size", "features")),
    "lstm": _Schema(
        # recurrent_init: the recurrent kernel's init ("orthogonal" is also Flax's default).
        lstm, {"features": 128, "output": "last", "recurrent_init": "orthogonal"},
        choices={"output": lstm.OUTPUTS, "recurrent_init": init_lib.INITS}, positive=("features",)),
    "transformer": _Schema(
        transformer,
        {"num_layers": 2, "num_heads": 4, "mlp_dim": 256, "dropout_rate": 0.0, "pool": "none", "max_len": 512},
        choices={"pool": transformer.POOLS}, positive=("num_layers", "num_heads", "mlp_dim", "max_len"),
        rates=("dropout_rate",)),
}

STAGE_TYPES = tuple(_SCHEMAS)  # ("mlp", "conv", "embedding", "lstm", "transformer")


def _defaults(type: str) -> dict[str, Any]:
  """All fields of a stage of `type` with their defaults, as a nested dict."""
  return {**_COMMON_DEFAULTS, "head": dict(_COMMON_DEFAULTS["head"]), **_SCHEMAS[type].defaults}


def _check_type(type: str, path: str) -> None:
  if type not in _SCHEMAS:
    raise ConfigError(f"{path}.type", f"unknown stage type {type!r}; allowed: {', '.join(STAGE_TYPES)}")


def stage_config(type: str, name: str, **overrides) -> ml_collections.ConfigDict:
  """Typed defaults for a stage of `type`, then `overrides` applied and the result validated.

  `head` may be overridden by a dict of its fields (merged into the defaults) or by
  dotted keys, e.g. `stage_config("mlp", "s1", **{"head.pool": "mean"})`. An
  unknown key, a wrong type or a bad value raises `ConfigError`.
  """
  path = f"stage[{name}]"
  _check_type(type, path)
  cfg = ml_collections.ConfigDict(_defaults(type))
  cfg.name, cfg.type = name, type
  flat = {}
  for key, value in overrides.items():
    if key == "head":
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"{path}.head", f"expected a dict of head fields (enabled, pool, hidden), got {value!r}")
      flat.update({f"head.{k}": v for k, v in value.items()})
    else:
      flat[key] = value
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
      if not isinstance(node.get(part), ml_collections.ConfigDict):
        raise ConfigError(f"{path}.{'.'.join(parents[:i + 1])}", "has no sub-fields")
      node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      allowed = ", ".join(k for k in _leaf_keys(_defaults(type)) if k not in ("name", "type"))
      raise ConfigError(f"{path}.{key}", f"unknown field for a {type} stage; allowed: {allowed}")
    try:
      node[leaf] = value
    except TypeError:
      raise ConfigError(f"{path}.{key}", f"must be of type {config_lib.type_name(node[leaf])}, got {value!r} "
                        f"({config_lib.type_name(value)})") from None
  validate_stage_config(cfg, path)
  return cfg


def _leaf_keys(defaults: dict[str, Any], prefix: str = "") -> list[str]:
  """Dotted names of all non-dict fields, e.g. ["activation", ..., "head.enabled", ...]."""
  keys = []
  for key, value in sorted(defaults.items()):
    keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
  return keys


def _get(cfg, dotted: str) -> Any:
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def validate_stage_config(cfg, path: str) -> None:
  """Raises `ConfigError` (field `f"{path}.{key}"`) unless `cfg` is a valid stage config.

  Checks for unknown or missing fields, types against the defaults of the stage's
  type (an int is accepted for a float), enum values, and sizes that must be positive.
  """
  if not hasattr(cfg, "keys"):
    raise ConfigError(path, f"expected a stage ConfigDict, got {cfg!r}")
  if "type" not in cfg:
    raise ConfigError(f"{path}.type", f"missing; allowed: {', '.join(STAGE_TYPES)}")
  _check_type(cfg["type"], path)
  schema = _SCHEMAS[cfg["type"]]
  config_lib.check_schema(cfg, _defaults(cfg["type"]), f"{path}.", complete=True)
  if not cfg["name"]:
    raise ConfigError(f"{path}.name", "must be a non-empty name (metrics and checkpoints use it)")
  for key, allowed in {**_COMMON_CHOICES, **schema.choices}.items():
    if _get(cfg, key) not in allowed:
      raise ConfigError(f"{path}.{key}", f"{_get(cfg, key)!r} is not allowed; allowed: "
                        f"{', '.join(repr(a) for a in allowed)}")
  for key in schema.positive:
    value = cfg[key]
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or min(values) <= 0:
      raise ConfigError(f"{path}.{key}", f"must be positive (a non-empty tuple of positive ints for a tuple), "
                        f"got {value!r}")
  if cfg["head"]["hidden"] < 0:
    raise ConfigError(f"{path}.head.hidden", f"must be >= 0 (0 = a linear head), got {cfg['head']['hidden']}")
  for key in schema.rates:
    if not 0.0 <= cfg[key] < 1.0:
      raise ConfigError(f"{path}.{key}", f"must be in [0, 1), got {cfg[key]!r}")


def build_stage(cfg, in_shape: tuple[int, ...], in_dtype, *, rngs: nnx.Rngs, path: str = "stage") -> nnx.Module:
  """The stage module of `cfg` for per-example inputs of `in_shape` and `in_dtype`.

  `cfg` comes from `stage_config` or was checked by `validate_stage_config` (as a run's config
  is); raises `ConfigError` (fields under `path`) if it does not fit the input.
  """
  return _SCHEMAS[cfg.type].module.build(cfg, tuple(in_shape), np.dtype(in_dtype), rngs=rngs, path=path)


def build_head(cfg, in_shape: tuple[int, ...], spec: LabelSpec, *, rngs: nnx.Rngs,
               path: str = "stage") -> head.ClassifierHead | None:
  """The head of stage config `cfg` for stage outputs of per-example `in_shape`; None if `cfg.head.enabled` is off.

  Raises `ConfigError` (field `f"{path}.head..."`) if its logits cannot take the
  shape `[B, *spec.logits_shape]`.
  """
  if not cfg.head.enabled:
    return None
  return head.build(cfg.head, tuple(in_shape), spec, rngs=rngs, path=path,
                    kernel_init=init_lib.kernel_init(cfg.init))


def output_shape(module: nnx.Module, in_shape: tuple[int, ...], in_dtype) -> jax.ShapeDtypeStruct:
  """Per-example output shape and dtype of `module` (a stage or head) for per-example inputs of `in_shape`.

  Traced abstractly (`jax.eval_shape`, no FLOPs) on a batch of one with
  `train=False`; the module itself is not touched.
  """
  graphdef, state = nnx.split(module)

  def apply(state, x):
    return nnx.merge(graphdef, state)(x, train=False)

  out = jax.eval_shape(apply, state, jax.ShapeDtypeStruct((1,) + tuple(in_shape), np.dtype(in_dtype)))
  return jax.ShapeDtypeStruct(out.shape[1:], out.dtype)


__all__ = [
    "PASS_TO_NEXT", "STAGE_TYPES", "build_head", "build_stage", "output_shape", "stage_config",
    "validate_stage_config",
]
