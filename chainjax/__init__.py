"""chainjax: chained optimization in JAX (chains of Flax NNX stages with per-stage losses)."""

__version__ = "0.1.0"
