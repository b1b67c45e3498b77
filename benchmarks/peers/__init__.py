"""PyTorch peers of chainjax's models: how fast plain PyTorch (CPU) trains the same model here.

A benchmark that reports chainjax's examples/s can put a peer row next to it, measured on the
same machine, so that a reader can tell a slow machine from a slow program:

    from benchmarks import peers
    if peers.available():
      for row in peers.rows(quick=False):   # {"name", "examples_per_sec", "min", "max", "torch", "threads"}
        print(row)

The models, their train step and the timing are in `torch_models` (see its docstring). Torch is
optional (`pip install -e .[bench]`); without it this package still imports and `available()`
is False.
"""

from benchmarks.peers.torch_models import PEERS, available, fashion_mnist_cnn, imdb_lstm, rows

__all__ = ["PEERS", "available", "fashion_mnist_cnn", "imdb_lstm", "rows"]
