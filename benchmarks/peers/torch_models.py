"""PyTorch (CPU) peers of the models chainjax trains, and the time of one full train step of each.

Written from the configs, not translated from chainjax code, so that a benchmark row can say how
fast an ordinary PyTorch program trains the same model on the same machine:

  imdb_lstm          configs/imdb_lstm.py: Embedding(20000, 128) -> LSTM(128), last hidden state ->
                     Linear(128, 128) + relu -> Linear(128, 1); sigmoid cross-entropy from logits
                     (`BCEWithLogitsLoss`); Adam. Int ids [B, T] (T = 256, the config's max_len).
  fashion_mnist_cnn  configs/fashion_mnist_cnn.py: 3 stages of Conv3x3 'same' (16, 32, 64 channels,
                     no bias: BatchNorm follows) -> BatchNorm -> relu -> 2x2 max pool (28 -> 14 -> 7
                     -> 3), each with a 10-way head on its flattened map (the last one through
                     Linear(576, 128) + relu); deep supervision: 0.3 * CE_1 + 0.3 * CE_2 + 1.0 * CE_3;
                     Adam 2e-3. Float images [B, 28, 28, 1] in chainjax (NHWC); here a
                     [B, 1, 28, 28] tensor in torch's channels_last memory format (NHWC in
                     memory, as chainjax), with the model converted too: faster than the default
                     contiguous NCHW for this CNN on CPU (see `fashion_mnist_cnn`).

One train step is what the chainjax trainer's step does: forward, loss, backward and an Adam
update of every parameter (one `torch.optim.Adam` over all of them: chainjax's per-stage Adams
with one learning rate and no schedule in effect are the same update). Learning-rate schedules
(warmup/cosine, per-epoch decay) are left out: they change no cost. Inputs and labels are random,
of the right shapes and dtypes, drawn from a fixed seed and held in memory (no input pipeline).

Timing (`time_train_steps`): warm-up steps (not timed), then `windows` timed windows of
`steps_per_window` steps each; a window's rate is batch_size * steps / seconds, and the result is
the median window with the min and max. Torch runs its own default number of threads
(`torch.get_num_threads()`, all cores unless set), which every result records.

Torch is imported inside the functions, so this module (and `available`) imports without torch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

SEED = 0

IMDB_VOCAB = 20000
IMDB_FEATURES = 128
IMDB_SEQ_LEN = 256
IMDB_LR = 1e-3

FMNIST_WIDTHS = (16, 32, 64)
FMNIST_CLASSES = 10
FMNIST_HIDDEN = 128  # the last head's hidden layer
FMNIST_LOSS_WEIGHTS = (0.3, 0.3, 1.0)
FMNIST_LR = 2e-3
FMNIST_SIZE = 28


def available() -> bool:
  """Whether torch can be imported (the peers are optional: the `bench` extra installs it)."""
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


# --------------------------------------------------------------------------------------------
# Models (built by functions, so that defining them needs torch only when they are asked for).
# --------------------------------------------------------------------------------------------


def imdb_lstm_model(vocab_size: int = IMDB_VOCAB, features: int = IMDB_FEATURES):
  """The IMDB recipe's model: ids [B, T] (int64) -> one logit per example [B]."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  class ImdbLstm(nn.Module):
    """Embedding -> LSTM (last hidden state) -> Linear + relu -> Linear(1)."""

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(vocab_size, features)
      self.lstm = nn.LSTM(features, features, batch_first=True)
      self.hidden = nn.Linear(features, features)
      self.out = nn.Linear(features, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
      _, (h_n, _) = self.lstm(self.embed(ids))  # h_n: [num_layers=1, B, F], the state after step T
      return self.out(torch.relu(self.hidden(h_n[-1]))).squeeze(-1)

  return ImdbLstm()


def fashion_mnist_cnn_model(widths: tuple[int, ...] = FMNIST_WIDTHS, classes: int = FMNIST_CLASSES,
                            hidden: int = FMNIST_HIDDEN, size: int = FMNIST_SIZE):
  """The Fashion-MNIST chain: images [B, 1, H, W] -> one [B, classes] logits tensor per stage."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  def head(features: int, hidden_units: int) -> nn.Module:
    if hidden_units:
      return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden_units), nn.ReLU(),
                           nn.Linear(hidden_units, classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes))

  class FashionMnistCnn(nn.Module):
    """Conv stages, each with its own classifier head; `forward` returns every head's logits."""

    def __init__(self):
      super().__init__()
      stages, heads = [], []
      channels, side = 1, size
      for i, width in enumerate(widths):
        # momentum 0.1 in torch's convention is Flax's BatchNorm momentum 0.99; eps 1e-5 in both.
        stages.append(nn.Sequential(nn.Conv2d(channels, width, 3, padding="same", bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)))
        channels, side = width, side // 2
        heads.append(head(width * side * side, hidden if i == len(widths) - 1 else 0))
      self.stages = nn.ModuleList(stages)
      self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
      logits = []
      for stage, stage_head in zip(self.stages, self.heads):
        x = stage(x)
        logits.append(stage_head(x))
      return logits

  return FashionMnistCnn()


def param_count(model) -> int:
  """Number of trainable scalars (BatchNorm's running statistics are buffers, not counted)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Train steps and their timing.
# --------------------------------------------------------------------------------------------


def imdb_lstm_step(batch_size: int, seq_len: int = IMDB_SEQ_LEN) -> Callable[[], float]:
  """A closure running one train step of `imdb_lstm` on a fixed random batch; returns the loss."""
  import torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(SEED)
  model = imdb_lstm_model()
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=IMDB_LR)
  loss_fn = torch.nn.BCEWithLogitsLoss()
  gen = torch.Generator().manual_seed(SEED)
  ids = torch.randint(0, IMDB_VOCAB, (batch_size, seq_len), generator=gen, dtype=torch.int64)
  labels = torch.randint(0, 2, (batch_size,), generator=gen).float()

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(ids), labels)
    loss.backward()
    optimizer.step()
    return loss.item()

  return step


def fashion_mnist_cnn_step(batch_size: int, channels_last: bool = True) -> Callable[[], float]:
  """A closure running one train step of `fashion_mnist_cnn` (deep supervision) on a fixed random
  batch; returns the loss. `channels_last`: model and images in torch's NHWC memory format."""
  import torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(SEED)
  model = fashion_mnist_cnn_model()
  model.train()
  gen = torch.Generator().manual_seed(SEED)
  images = torch.rand((batch_size, 1, FMNIST_SIZE, FMNIST_SIZE), generator=gen)
  labels = torch.randint(0, FMNIST_CLASSES, (batch_size,), generator=gen)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(model.parameters(), lr=FMNIST_LR)
  loss_fn = torch.nn.CrossEntropyLoss()

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    logits = model(images)
    loss = sum(w * loss_fn(y, labels) for w, y in zip(FMNIST_LOSS_WEIGHTS, logits))
    loss.backward()
    optimizer.step()
    return loss.item()

  return step


def time_train_steps(step: Callable[[], float], batch_size: int, *, windows: int, steps_per_window: int,
                     warm_up: int) -> dict:
  """`warm_up` untimed steps, then `windows` timed windows of `steps_per_window` steps each.

  Returns {"examples_per_sec": median window rate, "min", "max", "windows": every window's rate,
  "torch": version, "threads": torch's intra-op threads}. Torch on CPU runs each op to the end
  before returning, and `step` reads the loss (`.item()`), so a window's wall time covers its steps.
  """
  import torch  # pylint: disable=import-outside-toplevel

  if windows < 1 or steps_per_window < 1:
    raise ValueError(f"windows={windows}, steps_per_window={steps_per_window}: both must be >= 1")
  for _ in range(warm_up):
    step()
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps_per_window):
      step()
    rates.append(batch_size * steps_per_window / (time.perf_counter() - start))
  return {"examples_per_sec": statistics.median(rates), "min": min(rates), "max": max(rates), "windows": rates,
          "torch": torch.__version__, "threads": torch.get_num_threads()}


def imdb_lstm(batch_size: int, seq_len: int | None = IMDB_SEQ_LEN, windows: int = 5, steps_per_window: int = 5,
              warm_up: int = 3) -> dict:
  """Examples/s of `imdb_lstm` train steps on [batch_size, seq_len] ids (see `time_train_steps`)."""
  step = imdb_lstm_step(batch_size, IMDB_SEQ_LEN if seq_len is None else seq_len)
  return time_train_steps(step, batch_size, windows=windows, steps_per_window=steps_per_window, warm_up=warm_up)


def fashion_mnist_cnn(batch_size: int, seq_len: int | None = None, windows: int = 5, steps_per_window: int = 10,
                      warm_up: int = 5, channels_last: bool = True) -> dict:
  """Examples/s of `fashion_mnist_cnn` train steps on [batch_size, 1, 28, 28] images.

  `seq_len` is accepted (and must be None) so that every model's timing function has the same
  signature. channels_last is the default because it was the faster layout here: 2 CPU cores
  (shared), torch 2.13.0+cpu, batch 128, 12 interleaved rounds of 5 steps per layout, twice:
  1.3-1.7x the examples/s of contiguous NCHW in every round not hit by other work (medians
  4565/s vs 3180/s in the quieter of the two runs).
  """
  if seq_len is not None:
    raise ValueError(f"fashion_mnist_cnn takes images, not sequences: seq_len={seq_len} must be None")
  step = fashion_mnist_cnn_step(batch_size, channels_last=channels_last)
  return time_train_steps(step, batch_size, windows=windows, steps_per_window=steps_per_window, warm_up=warm_up)


# --------------------------------------------------------------------------------------------
# Benchmark rows.
# --------------------------------------------------------------------------------------------

# Row name -> (timing function, batch size, seq_len, full settings, quick settings); settings are
# (windows, steps_per_window, warm_up). Full windows last ~1-5 s each on 2 CPU cores; quick ones
# are single steps (still 5 windows), for smoke tests.
PEERS = {
    "imdb_lstm b16": (imdb_lstm, 16, IMDB_SEQ_LEN, (7, 8, 3), (5, 1, 1)),
    "imdb_lstm b64": (imdb_lstm, 64, IMDB_SEQ_LEN, (7, 3, 2), (5, 1, 1)),
    "fashion_mnist_cnn b128": (fashion_mnist_cnn, 128, None, (7, 20, 10), (5, 1, 2)),
}


def rows(quick: bool, names: tuple[str, ...] | None = None) -> list[dict]:
  """One row per peer in `PEERS` (or per name in `names`), measured one after the other:
  {"name", "examples_per_sec" (median window), "min", "max", "torch", "threads"}.

  `quick`: 5 windows of one step after 1-2 warm-up steps (seconds; for tests), instead of the
  full settings. Raises ImportError without torch (check `available()` first).
  """
  unknown = sorted(set(names or ()) - set(PEERS))
  if unknown:
    raise ValueError(f"unknown peers {unknown}; known: {sorted(PEERS)}")
  out = []
  for name, (fn, batch_size, seq_len, full, small) in PEERS.items():
    if names is not None and name not in names:
      continue
    windows, steps_per_window, warm_up = small if quick else full
    result = fn(batch_size, seq_len, windows=windows, steps_per_window=steps_per_window, warm_up=warm_up)
    out.append({"name": name, **{k: result[k] for k in ("examples_per_sec", "min", "max", "torch", "threads")}})
  return out
