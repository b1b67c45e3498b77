"""The design document's LSTM sentiment experiment, offline, and a transformer encoder beside it.

  python -m experiments.run --config=experiments/seed_lstm/config.py --workdir=runs/seed_lstm --seeds=3 --parallel=2

The document trains Embedding -> LSTM(128) -> Dense(128, relu) -> Dense(1) with Keras on IMDB-style
reviews (batch 16, Adam with lr * 0.1**epoch, early stopping on val_auc with patience 2, 20 epochs at
most) and prints one line per epoch. `configs/imdb_lstm.py:data=synthetic` is that recipe as a chain on
`synthetic_sentiment`, the offline set of generated sentences with negation (nothing downloaded), at
lr 1e-3 (the document's 2e-5 does not learn it: see that file). The rows:

  model=lstm               the document's model (one head, at the classifier);
  model=lstm,aux           the same with a head on the LSTM encoder as well (deep supervision of h_1);
  model=transformer        `configs/text_transformer.py`: a 2-block pre-LN encoder in place of the LSTM,
                           7 epochs of 625 updates of 32 (its own config runs 3000 updates, 4.8 epochs;
                           with 5 epochs, 1 seed of 3 ended at 0.95: see README.md).

Every run evaluates on the 4096 held-out sentences once per epoch and logs a Keras-style line per epoch
(`run.log`), the form of the document's log. The target is eval AUC >= 0.99.

Variants (comma-separated key=value): model=<lstm|transformer>, aux.
"""

import os

import ml_collections

from chainjax import config as config_lib

MODELS = {"lstm": "imdb_lstm.py", "transformer": "text_transformer.py"}
TRANSFORMER_EPOCHS = 7  # of 625 updates of 32: 140k examples, what the LSTM reads before its early stop (80k-140k)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, model="lstm", aux=False)
  if args["model"] not in MODELS:
    raise ValueError(f"model={args['model']!r}: allowed {', '.join(MODELS)}")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", MODELS[args["model"]])
  config = config_lib.load_file(path).get_config(f"data=synthetic,aux={args['aux']}")
  config.seed = 0
  if args["model"] == "transformer":  # epochs, as the LSTM: an eval and a Keras line per epoch
    config.num_epochs = TRANSFORMER_EPOCHS
    config.total_steps = 0
  return config


def sweep(add, arg=None):
  del arg
  for variant in ("model=lstm", "model=lstm,aux", "model=transformer"):
    add(variant=variant)


def report(arg=None):
  del arg
  return {"metrics": ("eval/auc", "eval/accuracy", "eval/loss"), "target": "eval/auc>=0.99"}
