"""Command line: `python -m chainjax.main --config=configs/X.py[:arg] --workdir=DIR [--config.a.b=value]`.

Exit codes: 0 done (or already finished), 2 bad config or flags (one line naming the
field; the workdir is not touched), 3 the loss became NaN/inf (the last good
checkpoint is kept).
"""

from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/default.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")

EXIT_BAD_CONFIG = 2
EXIT_NONFINITE = 3


def _fail(message: str, code: int) -> None:
  print(f"chainjax: error: {message}", file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, but a bad flag or config override is one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else repr(e), EXIT_BAD_CONFIG)
  except (ValueError, TypeError, AttributeError, KeyError, SyntaxError) as e:  # raised by the config file
    _fail(f"--config: {e}", EXIT_BAD_CONFIG)


class _QuietLibraries(py_logging.Filter):
  """Keeps warnings and errors of Orbax/JAX internals, drops their per-save INFO chatter."""

  _NOISY = ("/orbax/", "/jax/_src/")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}", EXIT_BAD_CONFIG)
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/default.py", EXIT_BAD_CONFIG)
  if not _WORKDIR.value:
    _fail("--workdir is required", EXIT_BAD_CONFIG)

  import jax  # after flag parsing, so --help is fast

  from chainjax import config as config_lib
  from chainjax import train

  config = _CONFIG.value
  try:
    config_lib.validate(config, jax.device_count())
  except config_lib.ConfigError as e:
    _fail(str(e), EXIT_BAD_CONFIG)
  logging.info("JAX %s on %d %s device(s), process %d of %d.", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, jax.process_index(), jax.process_count())
  try:
    final = train.train_and_evaluate(config, _WORKDIR.value)
  except train.NonFiniteLossError as e:
    _fail(str(e), EXIT_NONFINITE)
  logging.info("Final metrics: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
