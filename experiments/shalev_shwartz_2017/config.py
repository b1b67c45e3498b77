"""Shalev-Shwartz, Shamir & Shammah 2017, section 3.1: end to end vs decomposition on k line images.

  python -m experiments.run --config=experiments/shalev_shwartz_2017/config.py \
      --workdir=runs/shalev_shwartz_2017 --seeds=3 --parallel=2

The task and the chain are `configs/line_parity.py`'s: an example is k binary 28x28 images with one
line each, an image's label is whether its line's angle is below pi/2, and the answer is the parity
of the k image labels. Stage 1 (`image`) is a CNN applied to every image with a per-image head whose k
scores go on to stage 2 (`parity`), an MLP over them. `end_to_end` supervises the answer only;
`deep_supervision` adds the per-image labels at stage 1 (the paper's decomposition, its primary and
per-image losses summed); `decoupled`, `progressive` and `progressive_finetune` are chainjax's other
modes, as extra rows. The sweep: k in {1, 2, 3, 4} x the five modes; the run's `steps_to_target` is
the first eval at which held-out accuracy reaches 0.95.

The budget is scaled down from the paper's (batch 200, 20,000 updates) to fit 2 CPU cores: see
`README.md` in this folder for the numbers and for the gradient signal-to-noise per k
(`python -m chainjax.main --mode=diagnose`).

Variants (comma-separated key=value): k=<images per example>, mode=<a chain mode>.
"""

import os

import ml_collections

from chainjax import config as config_lib

MODES = ("end_to_end", "deep_supervision", "decoupled", "progressive", "progressive_finetune")
STEPS = 800
FINETUNE_STEPS = 200  # progressive_finetune: its end-to-end phase; the stage-wise phases split the rest


def _line_parity():
  return config_lib.load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                                           "line_parity.py"))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, k=3, mode="deep_supervision")
  config = _line_parity().get_config(f"k={args['k']},mode={args['mode']}")
  config.seed = 0
  config.total_steps = STEPS
  config.eval_every = 100
  config.checkpoint_every = 400
  config.log_every = 100
  if args["mode"] == "progressive_finetune":
    config.chain.finetune_steps = FINETUNE_STEPS
  return config


def sweep(add, arg=None):
  del arg
  for k in (1, 2, 3, 4):
    for mode in MODES:
      finetune = {"chain.finetune_steps": FINETUNE_STEPS} if mode == "progressive_finetune" else {}
      add(variant=f"k={k}", **{"chain.mode": mode, **finetune})


def report(arg=None):
  del arg
  return {"metrics": ("eval/accuracy", "eval/stage_1/accuracy"), "target": "eval/accuracy>=0.95"}
