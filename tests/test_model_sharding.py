"""A stage that asks for it (`shard="model"`) has its kernels split along the mesh's `model` axis,
and training computes the same thing as with every parameter replicated."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from chainjax import chain as chain_lib
from chainjax import config as config_lib
from chainjax import data as data_lib
from chainjax import parallel
from chainjax import experiment
from chainjax import train

from helpers import final_state, load_config


def _config(model: int):
  config = load_config("default", "runlocal", total_steps=20, eval_every=20, checkpoint_every=20,
                       **{"mesh.model": model, "optim.optimizer": "sgd", "optim.learning_rate": 0.05,
                          "optim.schedule": "constant"})
  config.chain.stages[0].shard = "model"
  config.chain.stages[0].features = 64
  return config


def test_sharded_stage_kernels_split_along_model_axis():
  config = _config(model=2)
  task = data_lib.get_task(config)
  model = chain_lib.build_chain(config, task, rngs=nnx.Rngs(0))
  _, state = experiment.init_train_state(model, experiment.build_tx(config, config.total_steps))
  mesh = parallel.make_mesh(model=2)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  shardings = experiment.train_state_shardings(config, state, mesh)
  params = nnx.to_pure_dict(shardings.params)
  assert params["stages"]["level1"]["body"]["layers"][0]["kernel"].spec == P(None, "model")
  assert params["stages"]["level1"]["body"]["layers"][0]["bias"].spec == P()  # 1-D: replicated
  assert params["stages"]["level2"]["body"]["layers"][0]["kernel"].spec == P()  # did not ask
  placed = jax.device_put(state, shardings)
  kernel = nnx.to_pure_dict(placed.params)["stages"]["level1"]["body"]["layers"][0]["kernel"]
  assert {s.data.shape for s in kernel.addressable_shards} == {(kernel.shape[0], kernel.shape[1] // 2)}


def test_model_sharded_training_matches_replicated(tmp_path):
  results = {}
  for model in (1, 2):
    final = train.train_and_evaluate(_config(model), str(tmp_path / str(model)))
    results[model] = (final, final_state(tmp_path / str(model))["tree"]["params"])
  (f1, p1), (f2, p2) = results[1], results[2]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), p1, p2)
  assert abs(f1["eval/loss"] - f2["eval/loss"]) < 1e-5


def test_model_axis_must_divide_devices():
  config = _config(model=3)
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh.model: 3 does not divide the 8 devices"):
    experiment.validate(config, num_devices=8)
