"""The Keras IMDB recipe: Embedding -> LSTM -> Dense(relu) -> Dense(1), as a chain.

  tfds build imdb_reviews --file_format=array_record    # once, on a machine with network access
  python -m chainjax.main --config=configs/imdb_lstm.py --workdir=runs/imdb_lstm

Offline, on generated sentences with negation (nothing to download):

  python -m chainjax.main --config=configs/imdb_lstm.py:data=synthetic --workdir=runs/imdb_lstm_synthetic

The recipe (as in the Keras IMDB examples): the 20000 most frequent training words,
reviews cut/padded to 256 ids in front (Keras `pad_sequences`), Embedding(20000,
128) -> LSTM(128) -> Dense(128, relu) -> Dense(1), sigmoid cross-entropy from
logits, Adam lr 2e-5 (b1 0.9) with lr * 0.1**epoch, batch 16, 20 epochs, early
stopping on the eval AUC with patience 2, evaluated on the "test" split.

As a chain (a chainjax stage is one body, and embedding and LSTM are separate
stage types):

  stage "embed"       embedding(20000, 128), no head          } the document's stage 1,
  stage "encoder"     lstm(128), last hidden state, no head   } the text encoder h_1
  stage "classifier"  mlp: Dense(128, relu); head Dense(1)      stage 2, the classifier y

With one head, `deep_supervision` trains exactly the document's model. `aux` gives
the encoder its own linear head on the same label (an auxiliary loss on h_1).
`decoupled` and `progressive` do not fit this mapping: the headless "embed"
stage would never be trained.

Variants (comma-separated key=value):
  data=<imdb|synthetic>   synthetic: `synthetic_sentiment` (20000 train / 4096 eval
                          sentences of at most 36 words, max_len 64), lr 1e-3
  aux                     a head on the encoder as well (deep supervision)
  runlocal                a seconds-long synthetic run for tests and smoke checks

Measured on 2 CPU cores (shared), 1 device, 2026-11-28, data=synthetic, through
chainjax.main: one epoch = 1250 updates, ~35 s;
  epoch     1       2       3       4       5
  val_auc   0.9923  0.9998  1.0000  1.0000  1.0000  -> early stop after epoch 5
  (~3 min; eval/accuracy 0.9976). Seeds 1 and 2 (by hand): eval AUC > 0.99 after
  1000 updates, 1.0000 after 2 epochs.
The document's lr 2e-5 cannot learn the synthetic set offline: eval AUC 0.52 after
the first epoch (1e-4: 0.57), and lr * 0.1**epoch leaves it no later epochs; hence
1e-3 for data=synthetic. For reference, word counts alone reach eval AUC 0.70
(logistic regression) / 0.72 (an MLP), since negation needs word order.
"""

import ml_collections

from chainjax import config as config_lib
from chainjax import stages


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, data="imdb", aux=False, runlocal=False)
  if args["data"] not in ("imdb", "synthetic"):
    raise ValueError(f"data={args['data']!r}: allowed imdb, synthetic")
  config = config_lib.base_config()
  config.seed = 0
  config.batch_size = 16
  config.eval_batch_size = 256
  config.num_epochs = 20
  config.total_steps = 0  # no cap: early stopping ends the run
  config.checkpoint_every = 2000
  config.log_every = 100

  config.data.name = "imdb_reviews"
  config.data.split_train = "train"
  config.data.split_eval = "test"
  config.data.vocab_size = 20000
  config.data.max_len = 256
  config.data.eval_size = 4096  # synthetic only; TFDS eval sets are whole splits

  config.chain.mode = "deep_supervision"
  config.chain.stages = [
      stages.stage_config("embedding", name="embed", vocab_size=config.data.vocab_size, features=128,
                          head={"enabled": False}),
      stages.stage_config("lstm", name="encoder", features=128, output="last",
                          head={"enabled": args["aux"]}),
      stages.stage_config("mlp", name="classifier", features=128, depth=1, activation="relu"),
  ]
  config.optim.per_stage = config_lib.per_stage_optim([s.name for s in config.chain.stages])

  config.optim.optimizer = "adam"
  config.optim.learning_rate = 2e-5
  config.optim.b1 = 0.9
  config.optim.schedule = "exponential_per_epoch"
  config.optim.decay_rate = 0.1

  config.early_stopping.metric = "eval/auc"
  config.early_stopping.mode = "max"
  config.early_stopping.patience = 2

  if args["data"] == "synthetic" or args["runlocal"]:
    config.data.name = "synthetic_sentiment"
    config.data.max_len = 64  # sentences have at most 39 words
    config.optim.learning_rate = 1e-3
  if args["runlocal"]:
    config.num_epochs = 1
    config.total_steps = 40
    config.checkpoint_every = 20
    config.log_every = 10
    config.eval_batch_size = 128
    config.data.eval_size = 256
  return config


def sweep(add, arg=None):
  """The document's model and the one with an encoder head (`aux`) x the learning rate.

  `decoupled` and `progressive` do not fit this chain (its "embed" stage has no head), so the
  mode axis is deep supervision with and without the auxiliary loss on the encoder.
  """
  for aux in (False, True):
    variant = ",".join(filter(None, (arg, "aux" if aux else "")))
    for learning_rate in (2e-5, 1e-4, 1e-3):
      add(variant=variant, **{"optim.learning_rate": learning_rate})
