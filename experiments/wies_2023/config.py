"""Wies, Levine & Shashua 2023: bit-subset parity with and without intermediate supervision.

  python -m experiments.run --config=experiments/wies_2023/config.py --workdir=runs/wies_2023 --seeds=3

The input is d=64 random bits; the answer is the parity of a hidden subset of `subset` of them.
The chain has one MLP stage per level of the XOR tree over the subset (log2(subset) stages,
width 256); with intermediate supervision (`deep_supervision`) stage i also learns the XORs of
tree level i, so each stage only has to learn 2-bit XORs of its input. Without it
(`end_to_end`) only the answer is supervised. The sweep: subset in {4, 8, 16, 32} x both modes;
the run's `steps_to_target` is the first eval step at which held-out accuracy reaches 0.95.
Batch 256, 3000 Adam updates, warmup + cosine from 1e-3, an eval of 4096 held-out examples
every 100 updates. The results are in this folder (README.md, RESULTS.md, results.csv, the plot).

Variants (comma-separated key=value): subset=<a power of two, at least 2>, d=<input bits>,
mode=<a chain mode>.
"""

import math

import ml_collections

from chainjax import config as config_lib
from chainjax import stages


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, subset=8, d=64, mode="deep_supervision")
  levels = round(math.log2(args["subset"])) if args["subset"] > 1 else 0
  if levels < 1 or 2**levels != args["subset"] or args["subset"] > args["d"]:
    raise ValueError(f"subset={args['subset']}: must be a power of two in [2, d={args['d']}]")
  config = config_lib.base_config()
  config.seed = 0
  config.batch_size = 256
  config.total_steps = 3000
  config.eval_every = 100
  config.checkpoint_every = 1000
  config.log_every = 500

  config.data.name = "parity"
  config.data.d = args["d"]
  config.data.levels = levels
  config.data.eval_size = 4096

  config.chain.mode = args["mode"]
  config.chain.stages = [stages.stage_config("mlp", name=f"level{i}", features=256, depth=1)
                         for i in range(1, levels + 1)]
  config.chain.loss_weights = (1.0,) * levels
  config.optim.per_stage = config_lib.per_stage_optim([s.name for s in config.chain.stages])

  config.optim.optimizer = "adam"
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 100
  return config


def sweep(add, arg=None):
  del arg
  for subset in (4, 8, 16, 32):
    for mode in ("deep_supervision", "end_to_end"):
      add(variant=f"subset={subset}", **{"chain.mode": mode})


def report(arg=None):
  del arg
  return {"metrics": ("eval/accuracy",), "target": "eval/accuracy>=0.95"}
