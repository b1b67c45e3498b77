"""Shared test utilities: configs from files, final parameters of a workdir."""

import os

import numpy as np
import orbax.checkpoint as ocp

from chainjax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = "", **overrides):
  """`configs/<name>.py:get_config(arg)` with dotted-key overrides."""
  module = config_lib.load_file(os.path.join(REPO, "configs", f"{name}.py"))
  return override(module.get_config(arg), **overrides)


def override(config, **overrides):
  """Sets dotted fields, e.g. `override(config, **{"optim.learning_rate": 0.1})`."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def checkpoint_steps(workdir) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def final_state(workdir, step: int | None = None) -> dict:
  """The train state of the newest checkpoint (or of `step`) as numpy arrays (read without a target)."""
  step = checkpoint_steps(workdir)[-1] if step is None else step
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return {"step": step, "tree": state}


def assert_trees_equal(a, b):
  import jax
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
