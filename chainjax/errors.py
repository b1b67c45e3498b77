"""The errors chainjax raises on purpose, each one line that says what is wrong and how to fix it.

This module imports nothing of chainjax, so every module may raise these without an
import cycle. `chainjax.main` maps each to its exit code (see the README's table).
"""


class ConfigError(ValueError):
  """A bad config value; `str(err)` is one line that names the field (exit 2)."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"config.{field}: {message}")


class DataError(ConfigError):
  """A dataset that cannot be read as configured; `str(err)` names the `config.data` field (exit 2)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"data.{field}", message)


class WorkdirError(RuntimeError):
  """The workdir's files cannot be written (e.g. `config.json` is a folder); one line naming the file (exit 2)."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the train step (exit 3)."""


class DivergedError(NonFiniteLossError):
  """The loss grew past `config.divergence_factor` times its first logged value (exit 3, as NaN)."""
