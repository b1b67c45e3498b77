"""Greedy and decoupled layer-wise training against backprop: a 4-stage CNN on Fashion-MNIST, every mode.

  python -m chainjax.data.prepare fashion_mnist          # once: offline, from Debian's dataset-fashion-mnist
  python -m experiments.run --config=experiments/greedy_layerwise/config.py --workdir=runs/greedy_layerwise \
      --seeds=2 --parallel=2

Belilovsky, Eickenberg & Oyallon (greedy layer-wise learning, ICML 2019; decoupled greedy learning,
DGL, ICML 2020) train a CNN one block at a time, each block with its own auxiliary classifier, either
block after block (`progressive`) or all at once with the gradient stopped between blocks (`decoupled`,
DGL), and find the per-block accuracy rising with depth and the last block within about a point of
end-to-end backprop. Lee et al. (deeply-supervised nets, AISTATS 2015) put a classifier on every block
and sum the losses with the gradient flowing through (`deep_supervision`).

The chain: four conv blocks (3x3 'SAME' conv with 16, 32, 32, 64 channels, BatchNorm, relu; 2x2 max pool
after blocks 1, 2 and 4: 28 -> 14 -> 7 -> 7 -> 3), each with a linear 10-way head on its flattened
feature map (the last through a hidden layer of 128), loss weights all 1. Adam 2e-3, 200 warmup
updates then cosine to 0, batch 128, `EPOCHS` epochs of the 60000 training images (far fewer than the
papers' 50+ on CIFAR-10: see the README); the 10000 test images are evaluated after every epoch.
`end_to_end` trains the last head only, so its earlier heads stay at chance; `progressive` gives each
block an equal share of the updates (phase j trains block j on head j, the earlier blocks frozen),
`progressive_finetune` the same on three quarters of the updates and then the whole chain end to end.

Variants (comma-separated key=value): mode=<a chain mode>, epochs=N, runlocal (a seconds-long run).
"""

import ml_collections

from chainjax import config as config_lib
from chainjax import stages

MODES = ("end_to_end", "deep_supervision", "decoupled", "progressive", "progressive_finetune")
EPOCHS = 3
WIDTHS = (16, 32, 32, 64)
POOLS = ("max", "max", "none", "max")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, mode="decoupled", epochs=EPOCHS, runlocal=False)
  config = config_lib.base_config()
  config.seed = 0
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = args["epochs"]
  config.total_steps = 0  # no cap: num_epochs epochs
  config.checkpoint_every = 1000
  config.log_every = 100

  config.data.name = "fashion_mnist"
  config.data.split_train = "train"
  config.data.split_eval = "test"
  config.data.cache = True  # decoded images in memory after epoch 1

  config.chain.mode = args["mode"]
  config.chain.stages = [
      stages.stage_config("conv", name=f"block{i + 1}", features=(width,), kernel_size=3, pool=pool, norm="batch",
                          head={"enabled": True, "pool": "flatten", "hidden": 0})
      for i, (width, pool) in enumerate(zip(WIDTHS, POOLS))
  ]
  config.chain.stages[-1].head.hidden = 128
  config.chain.loss_weights = (1.0,) * len(WIDTHS)
  if args["mode"] == "progressive_finetune":
    config.chain.finetune_steps = args["epochs"] * (60000 // config.batch_size) // 4
  config.optim.per_stage = config_lib.per_stage_optim([s.name for s in config.chain.stages])

  config.optim.optimizer = "adam"
  config.optim.learning_rate = 2e-3
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 200

  if args["runlocal"]:
    config.num_epochs = 1
    config.total_steps = 8
    config.batch_size = 8
    config.eval_batch_size = 16
    config.checkpoint_every = 4
    config.log_every = 2
    config.optim.warmup_steps = 2
    if args["mode"] == "progressive_finetune":
      config.chain.finetune_steps = 4
  return config


def sweep(add, arg=None):
  del arg
  for mode in MODES:
    add(variant=f"mode={mode}")


def report(arg=None):
  del arg
  return {"metrics": ("eval/accuracy", *(f"eval/stage_{i}/accuracy" for i in range(1, len(WIDTHS)))),
          "target": "eval/accuracy>=0.9"}
