"""The embedded default: bit-subset parity, where a supervised chain learns what end-to-end cannot.

  python -m chainjax.main --config=configs/default.py --workdir=runs/default

Task: d=64 random bits; the answer is the parity of a fixed, hidden subset of 8 of them
(Shalev-Shwartz et al. 2017, sec. 2.1; Wies et al. 2023). A chain of 3 MLP stages
(width 256), stage i supervised by level i of the XOR tree over the subset (4, 2, 1
bits); batch 256, 3000 Adam updates, warmup + cosine from 1e-3.

Measured on 2 CPU cores, 1 device (JAX 0.10.2), 2026-11-28, held-out set of 4096:

  mode               eval/accuracy at step 500 / 1000 / 3000    wall time of the run
  deep_supervision   0.540 / 1.000 / 1.000                      ~25 s
  decoupled          - / - / 1.000                              ~19 s
  progressive        - / - / 1.000                              ~22 s
  end_to_end         - / - / 0.494 (chance)                     ~21 s
  progressive_finetune 0.501 / 0.479 / 1.000                    ~31 s (2026-12-01, machine busy with tests)

d and the budget were chosen so that end_to_end cannot find the 8-bit parity
(it needs on the order of d**8 examples) while the supervised chain finds it
within the first 1000 updates: d=32 and d=64 both separate the modes (1.0 vs
0.50); d=64 makes the gap plain. bf16 compute
(`--config.precision.policy=params=float32,compute=bfloat16,output=float32`) also
reaches 1.000.

Variants (`get_config(arg)`, comma-separated key=value):
  mode=<end_to_end|deep_supervision|decoupled|progressive|progressive_finetune>
                  (progressive_finetune: the last quarter of the updates fine-tunes end to end)
  runlocal        a seconds-long run for tests and smoke checks
"""

import ml_collections

from chainjax import config as config_lib
from chainjax import stages


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, mode="deep_supervision", runlocal=False)
  config = config_lib.base_config()
  config.seed = 0
  config.batch_size = 256
  config.total_steps = 3000
  config.eval_every = 500
  config.checkpoint_every = 1000
  config.log_every = 100

  config.data.name = "parity"
  config.data.d = 64
  config.data.levels = 3
  config.data.eval_size = 4096

  config.chain.mode = args["mode"]
  config.chain.stages = [
      stages.stage_config("mlp", name=f"level{i}", features=256, depth=1) for i in (1, 2, 3)
  ]
  config.chain.loss_weights = (1.0, 1.0, 1.0)

  # One all-inherit entry per stage, so `--config.optim.per_stage.<stage>.<field>=...` works.
  config.optim.per_stage = config_lib.per_stage_optim([s.name for s in config.chain.stages])

  config.optim.optimizer = "adam"
  config.optim.learning_rate = 1e-3
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 100

  if config.chain.mode == "progressive_finetune":
    config.chain.finetune_steps = config.total_steps // 4

  if args["runlocal"]:
    config.total_steps = 60
    config.eval_every = 30
    config.checkpoint_every = 30
    config.log_every = 10
    config.batch_size = 64
    config.eval_batch_size = 256
    config.data.eval_size = 512
    config.optim.warmup_steps = 10
    config.chain.finetune_steps = config.total_steps // 4 if config.chain.mode == "progressive_finetune" else 0
  return config


def sweep(add, arg=None):
  """Every chain mode x the number of input bits d that hide the 8-bit subset (32, 64, 128)."""
  finetune_steps = get_config(arg or "").total_steps // 4  # as get_config("mode=progressive_finetune") sets it
  for d in (32, 64, 128):
    for mode in ("end_to_end", "deep_supervision", "decoupled", "progressive"):
      add(**{"chain.mode": mode, "data.d": d})
    add(**{"chain.mode": "progressive_finetune", "chain.finetune_steps": finetune_steps, "data.d": d})
