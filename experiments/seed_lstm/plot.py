"""The held-out AUC per epoch of every model of the sweep, beside the design document's Keras log.

  python experiments/seed_lstm/plot.py --workdir=runs/seed_lstm    # after the sweep

Writes `auc_per_epoch.png` next to this file: for each model (`model=lstm`, `model=lstm,aux`,
`model=transformer`) the mean over its seeds of `eval/auc` after each epoch with a min-max band
(early stopping ends seeds at different epochs: each epoch averages the seeds that reached it),
and the document's `val_auc` and training `auc` over its 20 epochs.
"""

import collections
import json
import os
import re

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/seed_lstm", "the sweep's --workdir")
_OUTPUT = flags.DEFINE_string("output", os.path.join(os.path.dirname(os.path.abspath(__file__)), "auc_per_epoch.png"),
                              "the plot to write")

# The design document's Keras log: its own review data (not ours), batch 16, lr 2e-5 * 0.1**epoch, 20 epochs.
DOCUMENT_VAL_AUC = (0.7878, 0.8027, 0.8054, 0.8126, 0.8163, 0.8181, 0.8173, 0.8204, 0.8192, 0.8202,
                    0.8206, 0.8197, 0.8189, 0.8191, 0.8199, 0.8196, 0.8197, 0.8193, 0.8193, 0.8190)
DOCUMENT_AUC = (0.7928, 0.8264, 0.8457, 0.8578, 0.8637, 0.8722, 0.8788, 0.8835, 0.8853, 0.8862,
                0.8875, 0.8890, 0.8898, 0.8910, 0.8914, 0.8916, 0.8914, 0.8916, 0.8914, 0.8912)


def epoch_aucs(run_dir: str) -> list[float]:
  """`eval/auc` of each epoch of one run (its evals are at the ends of its epochs), in order."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r["eval/auc"] for r in sorted(records, key=lambda r: r["step"]) if "eval/auc" in r]


def main(argv):
  del argv
  models = collections.defaultdict(list)  # model -> per seed, the AUC of each epoch
  for name in sorted(os.listdir(_WORKDIR.value)):
    path = os.path.join(_WORKDIR.value, name)
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
      models[re.sub(r",seed=\d+$", "", name)].append(epoch_aucs(path))
  if not models:
    raise app.UsageError(f"--workdir={_WORKDIR.value}: no run with a metrics.jsonl")

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 4.5))
  epochs = range(1, len(DOCUMENT_VAL_AUC) + 1)
  ax.plot(epochs, DOCUMENT_VAL_AUC, "k--", marker=".", label="document: val_auc (its reviews)")
  ax.plot(epochs, DOCUMENT_AUC, "k:", label="document: training auc")
  for model, seeds in models.items():
    longest = max(len(s) for s in seeds)
    values = [[s[e] for s in seeds if e < len(s)] for e in range(longest)]
    mean = [sum(v) / len(v) for v in values]
    line, = ax.plot(range(1, longest + 1), mean, marker=".", label=f"ours, {model} ({len(seeds)} seeds): eval AUC")
    ax.fill_between(range(1, longest + 1), [min(v) for v in values], [max(v) for v in values],
                    color=line.get_color(), alpha=0.2)
  ax.set_xlabel("epoch")
  ax.set_ylabel("AUC")
  ax.set_xticks(list(epochs))
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", loc="upper right", bbox_to_anchor=(1.0, 0.98))
  fig.tight_layout()
  fig.savefig(_OUTPUT.value, dpi=110)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
