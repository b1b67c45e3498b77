"""Checkpoints: an Orbax `CheckpointManager`, async saves, verified restore.

Each step is one folder `<directory>/<step>/` that Orbax writes with two items;
these files exist once Orbax has committed it (checked on orbax-checkpoint
0.12.8):

    <step>/_CHECKPOINT_METADATA  JSON; `commit_timestamp_nsecs` set at commit
    <step>/commit_success.txt    Orbax's commit marker for the step
    <step>/state/                the pytree (StandardCheckpointHandler, OCDBT):
        _METADATA, manifest.ocdbt, d/<data files>, commit_success.txt
    <step>/metadata/             the small JSON dict (JsonCheckpointHandler):
        metadata, commit_success.txt
    <step>/data/                 the input iterator's position (Grain's
        CheckpointHandler): process_<i>-of-<n>.json, one per process

Why verify: on a local filesystem Orbax counts *any* folder whose name is a step
number as a finished checkpoint (it only checks that the name has no
`.orbax-checkpoint-tmp` suffix), so a half-copied, truncated or empty `<step>/`
(a crash during a copy or sync, a disk filling up, a hand-made folder) becomes
`latest_step()`. Worse, it then blocks saves at steps up to it and counts towards
`max_to_keep`, so Orbax's retention may delete a good checkpoint in favour of it.
`Checkpointer` therefore checks every step before trusting it, first cheaply
(the files above exist and the JSON files parse) and then by restoring it; a
step that fails is moved aside to `<directory>/../corrupt_checkpoints/<step>-<unix
time>` (never deleted) and the next older step is tried. Limits: a restore
catches what a read can (missing, truncated or undecodable files), not a flipped
bit that still decodes; a transient read error also sets a good step aside, from
where it can be moved back by hand.

What guarantees what when saving:
  * Orbax writes a step into `<step>.orbax-checkpoint-tmp/` and renames it to
    `<step>/` only after every item is written and committed (local
    filesystems; on GCS it writes in place and finishes with the commit marker,
    which the structural check requires). A crash mid-save leaves only the tmp
    folder, which Orbax never lists as a step and which we ignore (we leave
    Orbax's `cleanup_tmp_directories` off, so nothing removes it at start);
    Orbax itself replaces a stale tmp folder when a save reuses its step.
  * A save never writes into an existing step folder: Orbax skips a step that is
    not newer than its latest step, and refuses (`StepAlreadyExistsError`) to
    force-save a step that exists.
  * Old steps beyond `max_to_keep` are deleted by Orbax only after the new step
    has committed; if the background write fails, nothing is deleted.

When a save fails (a full disk, a lost mount, a permission change): the write
runs in Orbax's background thread, so the error surfaces later. `Checkpointer`
turns it into one `CheckpointSaveError` naming the step and the OS error (e.g.
"No space left on device"), raised by whichever comes first of
`raise_if_save_failed()` (cheap: call it after every training step),
`save()`, `wait_until_finished()` and `close()`; it is raised once. Nothing of
the failed step replaces anything: Orbax leaves `<step>.orbax-checkpoint-tmp/`
(ignored, as above) and deletes no old step, so `restore_latest` returns the
last good checkpoint. Orbax's own log lines for the failure are kept, without
their tracebacks.

Multi-process: call every method on every process (they are collective, as in
Orbax). Every write goes through Orbax, which coordinates processes.
Moving a bad folder aside is done by process 0 only, followed by a barrier and a
reload of the manager on every process; a restore counts as failed if it fails
on any process.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import re
import sys
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import grain
import orbax.checkpoint as ocp

_STATE = "state"  # item name of the pytree
_METADATA = "metadata"  # item name of the JSON dict
_DATA = "data"  # item name of the input iterator state (Grain's handler, one file per process)
_COMMIT_MARKER = "commit_success.txt"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
# Files each item has once Orbax has committed it (orbax-checkpoint 0.12).
_ITEM_FILES = {
    _STATE: (_COMMIT_MARKER, "_METADATA"),
    _METADATA: (_COMMIT_MARKER, "metadata"),
}
_OCDBT_MANIFEST = "manifest.ocdbt"
CORRUPT_DIRNAME = "corrupt_checkpoints"
# Longest reason kept in a warning or error message.
_MAX_REASON_CHARS = 200
# Most errors one failed save leaves queued in Orbax that we drain (see
# `Checkpointer.wait_until_finished`).
_MAX_QUEUED_ERRORS = 16


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written: `step` is the save that failed.

  `str()` is one line, e.g. "checkpoint save failed at step 2000: No space
  left on device"; the original exception is the `__cause__`.
  """

  def __init__(self, step: int | None, reason: str):
    self.step = step
    self.reason = reason
    where = f" at step {step}" if step is not None else ""
    super().__init__(f"checkpoint save failed{where}: {reason}")


class Checkpointer:
  """Orbax CheckpointManager over <directory>: async saves, verified restore."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, read_only: bool = False):
    """Opens (or creates) `directory` and moves aside incomplete step folders.

    The structural sweep at start keeps Orbax's `max_to_keep` and its
    "save only newer steps" rule working on complete checkpoints only.

    `read_only`: for a reader next to (or after) a trainer, e.g. evaluation or export: nothing
    is created, saved or moved; an incomplete or unreadable step is skipped instead.
    """
    self._read_only = read_only
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self._directory = epath.Path(directory)
    self._corrupt_dir = self._directory.parent / CORRUPT_DIRNAME
    self._sync_count = 0
    self._pending_step = None  # the step of the save whose outcome is not yet checked
    _install_orbax_log_filter()
    registry = ocp.handlers.create_default_handler_registry(**{
        _STATE: ocp.handlers.StandardCheckpointHandler(),
        _METADATA: ocp.handlers.JsonCheckpointHandler(),
        _DATA: grain.checkpoint.CheckpointHandler(),
    })
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True, read_only=read_only),
        handler_registry=registry,
    )
    if not read_only:
      self._set_aside_incomplete()

  @property
  def directory(self) -> epath.Path:
    """The folder that holds the step folders."""
    return self._directory

  def save(self, step: int, state, metadata: dict | None = None, *,
           data_state: dict | None = None, force: bool = False) -> None:
    """Starts an async save of `state` (pytree of arrays) and `metadata` (JSON).

    `data_state` is this process's input iterator state (`get_state()` of a
    Grain iterator); it is captured now and written with Grain's handler.

    Returns once the arrays are copied off the devices; the write continues in
    the background (`wait_until_finished()` blocks on it). Orbax skips a step
    that is not newer than the latest one (logged as a warning); `force` skips
    Orbax's save-interval policy but never overwrites an existing step.

    Raises CheckpointSaveError, before starting, when the previous save failed
    in the background (nothing is saved then), or when this one fails at once
    with an OS error (e.g. creating its folder on a full disk).
    """
    metadata = dict(metadata or {})
    json.dumps(metadata)  # fail here, not in the background thread
    self.wait_until_finished()  # Orbax waits too; this way its error is ours
    items = {
        _STATE: ocp.args.StandardSave(state),
        _METADATA: ocp.args.JsonSave(metadata),
    }
    if data_state is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(_IteratorState(data_state))
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except
      if _os_error_text(e) is None:
        raise  # not the storage: a caller error (e.g. StepAlreadyExistsError)
      raise CheckpointSaveError(step, _short_reason(e)) from e
    if saved:
      self._pending_step = step
    else:
      logging.warning(
          "Checkpoint at step %d not saved: Orbax saves only steps newer than "
          "its latest step (%s) unless force=True.", step,
          self._manager.latest_step())

  def latest_step(self) -> int | None:
    """Newest step whose folder is structurally complete, or None.

    Waits for a save in progress. Incomplete folders found on the way are
    moved aside. `restore_latest` goes further and restores the step, so it
    may still fall back to an older one.
    """
    self.wait_until_finished()
    self._manager.reload()
    self._set_aside_incomplete()
    return self._manager.latest_step()

  def latest_metadata(self) -> tuple[int, dict] | None:
    """`(step, metadata)` of the newest complete step, reading only its JSON item; None without one.

    Cheap (no arrays are read), so a caller can check the saved metadata (e.g. the
    run's config) before building a restore target. An unreadable JSON item gives
    `{}`: `restore_latest` then decides whether the step is usable.
    """
    step = self.latest_step()
    if step is None:
      return None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
    except Exception:  # pylint: disable=broad-except
      return step, {}
    return step, dict(restored[_METADATA] or {})

  def restore_latest(self, abstract_state, *, partial: bool = False) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that restores cleanly onto `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding`;
    arrays come back with those shardings (so a run may resume on another
    device count). Returns `(step, state, metadata)`, or None when no step
    restores. A step that is incomplete or fails to restore is moved aside and
    the next older one is tried. A target whose tree paths or shapes differ
    from a checkpoint's raises ValueError instead: that is a caller error, and
    every checkpoint would otherwise be moved aside.

    `partial`: `abstract_state` may leave out subtrees of the saved state (e.g. the optimizer
    state when only the parameters are wanted); only what it names is read.
    """
    self.wait_until_finished()
    self._manager.reload()
    if not self._read_only:
      self._set_aside_incomplete()
    target_shapes = _shapes_by_path(abstract_state)
    with _quiet_closed_loop_noise():
      return self._restore_newest(abstract_state, target_shapes, partial)

  def _restore_newest(self, abstract_state, target_shapes, partial: bool = False):
    """The loop of `restore_latest` (see there)."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      if self._read_only and _incomplete_reason(self._step_dir(step)) is not None:
        logging.info("Skipping incomplete checkpoint %s.", self._step_dir(step))
        continue
      error = None
      try:
        saved_shapes = _shapes_by_path(
            self._manager.metadata(step).item_metadata[_STATE])
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if not _all_processes_ok(error is None):
        self._set_aside({step: _failure("tree metadata unreadable", error)})
        continue
      if partial:  # what the target leaves out stays on disk
        saved_shapes = {path: shape for path, shape in saved_shapes.items() if path in target_shapes}
      mismatch = _describe_mismatch(saved_shapes, target_shapes)
      if mismatch:
        raise ValueError(
            f"Checkpoint {self._step_dir(step)} does not match the restore "
            f"target: {mismatch}")
      try:
        if partial:  # the state item read on its own, so that it can take a PyTree handler's partial restore
          # An entry without arrays (e.g. the empty `rest` of a chain without BatchNorm) is left out of the
          # target, where Orbax would take it for a leaf, and put back as it is.
          empty = {k: v for k, v in abstract_state.items() if not jax.tree.leaves(v)}
          target = {k: v for k, v in abstract_state.items() if k not in empty}
          with ocp.PyTreeCheckpointer() as reader:
            state = reader.restore(self._step_dir(step) / _STATE, args=ocp.args.PyTreeRestore(
                target, ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
          state = {**state, **empty}
          restored = {_STATE: state, **self._manager.restore(
              step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))}
        else:
          restored = self._manager.restore(
              step,
              args=ocp.args.Composite(**{
                  _STATE: ocp.args.StandardRestore(abstract_state),
                  _METADATA: ocp.args.JsonRestore(),
              }),
          )
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if _all_processes_ok(error is None):
        logging.info("Restored checkpoint %s.", self._step_dir(step))
        return step, restored[_STATE], dict(restored[_METADATA])
      self._set_aside({step: _failure("restore failed", error)})
    return None

  def restore_data_state(self, step: int) -> dict | None:
    """This process's input iterator state saved at `step`, or None if that step has none.

    None also when the step was saved by a different number of processes (each
    process saves its own file): the caller then positions its input by step.
    """
    self.wait_until_finished()
    if not (self._step_dir(step) / _DATA).exists():
      return None
    state = _IteratorState()
    try:
      self._manager.restore(step, args=ocp.args.Composite(**{_DATA: grain.checkpoint.CheckpointRestore(state)}))
    except ValueError as e:
      logging.warning("Checkpoint %s has no input state for this process (%s).", self._step_dir(step), e)
      return None
    return state.state

  def raise_if_save_failed(self) -> None:
    """Raises CheckpointSaveError if the last save has finished with an error.

    Never blocks on a save in progress and touches neither disk nor devices
    (one lock read in Orbax while a save runs), so a training loop can call it
    after every step: a failed background save then stops the run within a
    step of the failure, not at the next save. With several processes it does
    nothing: each would see a failure at another step, so `save`, which every
    process reaches at the same step, reports it.
    """
    if jax.process_count() > 1:
      return
    if self._pending_step is None or self._manager.is_saving_in_progress():
      return
    # Orbax clears its flag as the last act of its finalize thread, so this
    # wait returns at once; it is where Orbax re-raises the background error.
    self.wait_until_finished()

  def wait_until_finished(self) -> None:
    """Blocks until the save in progress (if any) has committed.

    Raises CheckpointSaveError if that save failed (once per failure).
    """
    step, self._pending_step = self._pending_step, None
    error = None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    # A failed save can leave more errors queued, e.g. the write of the step's
    # _CHECKPOINT_METADATA into the same full disk. Orbax raises each at its
    # next call that waits, which could be a restore of a good step (which
    # would then be set aside as corrupt): drain them here.
    for _ in range(_MAX_QUEUED_ERRORS):
      try:
        self._manager.check_for_errors()
        break
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    if error is not None:
      raise CheckpointSaveError(step, _short_reason(error)) from error

  def close(self) -> None:
    """Waits for the save in progress and releases Orbax's resources.

    Resources are released even when that save failed; CheckpointSaveError
    is raised afterwards unless the failure was already reported.
    """
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  # -- verification ------------------------------------------------------------

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def _set_aside_incomplete(self) -> None:
    """Moves aside every step folder that lacks a file Orbax writes at commit."""
    bad = {}
    if jax.process_index() == 0:
      for step in self._manager.all_steps():
        reason = _incomplete_reason(self._step_dir(step))
        if reason is not None:
          bad[step] = reason
    self._set_aside(bad)

  def _set_aside(self, bad: dict[int, str]) -> None:
    """Process 0 moves each `{step: reason}` folder aside; all reload after (read-only: logged only)."""
    if self._read_only:
      for step, reason in sorted(bad.items()):
        logging.warning("Checkpoint folder %s is not usable (%s); skipping it.", self._step_dir(step), reason)
      return
    if jax.process_index() == 0:
      for step, reason in sorted(bad.items()):
        source = self._step_dir(step)
        target = self._corrupt_dir / f"{step}-{int(time.time())}"
        suffix = 0
        while target.exists():
          suffix += 1
          target = self._corrupt_dir / f"{step}-{int(time.time())}-{suffix}"
        logging.warning(
            "Checkpoint folder %s is not usable (%s); moving it to %s.",
            source, reason, target)
        self._corrupt_dir.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    self._sync_count += 1
    ocp.multihost.sync_global_processes(
        f"chainjax_checkpoint_set_aside_{self._sync_count}")
    self._manager.reload()


class _IteratorState:
  """A frozen iterator state that Grain's checkpoint handler saves and restores.

  Grain's handler calls `get_state()` when Orbax runs the save; handing it the
  live iterator could record a later position, so the state is copied at
  `Checkpointer.save` time. (The handler treats non-`DatasetIterator` items as
  bytes-state iterators: JSON bytes here.)
  """

  def __init__(self, state: dict | None = None):
    self.state = None if state is None else json.loads(json.dumps(state))

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:
    pass


def _incomplete_reason(step_dir: epath.Path) -> str | None:
  """Names the first commit-time file missing or unreadable in `step_dir`."""
  if not (step_dir / _STEP_METADATA_FILE).exists():
    return f"{_STEP_METADATA_FILE} missing"
  try:
    info = json.loads((step_dir / _STEP_METADATA_FILE).read_text())
    if not info.get("commit_timestamp_nsecs"):
      return f"{_STEP_METADATA_FILE} has no commit timestamp"
  except (OSError, ValueError) as e:
    return f"{_STEP_METADATA_FILE} unreadable: {e}"
  if not (step_dir / _COMMIT_MARKER).exists():
    return f"{_COMMIT_MARKER} missing"
  for item, names in _ITEM_FILES.items():
    for name in names:
      if not (step_dir / item / name).exists():
        return f"{item}/{name} missing"
  try:
    tree_info = json.loads((step_dir / _STATE / "_METADATA").read_text())
  except (OSError, ValueError) as e:
    return f"{_STATE}/_METADATA unreadable: {e}"
  if tree_info.get("use_ocdbt") and not (
      step_dir / _STATE / _OCDBT_MANIFEST).exists():
    return f"{_STATE}/{_OCDBT_MANIFEST} missing"
  return None


def _failure(what: str, error: Exception | None) -> str:
  """`what` plus this process's exception, if it was this process that failed."""
  if error is None:
    return f"{what} on another process"
  return f"{what}: {type(error).__name__}: {_short_reason(error)}"


# TensorStore appends the OS error code to its messages ("... Failed to write
# 605600 bytes to file 4: No space left on device [os_error_code='28']") and
# annotations such as [tensorstore_spec='{...}'] (the whole JSON spec) or
# [source locations='...'].
_TS_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
_TS_ANNOTATION = re.compile(r"\s*\[[a-z_ ]+='(?:[^'\\]|\\.)*'\]")


def _errors_in_chain(error: BaseException):
  """`error`, then its causes and contexts (each once)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _os_error_text(error: BaseException) -> str | None:
  """The OS's text for the first OS error in `error`'s chain, or None.

  Python raises OSError with `strerror`; TensorStore raises ValueError whose
  message carries `os_error_code`.
  """
  for e in _errors_in_chain(error):
    if isinstance(e, OSError) and e.errno:
      return e.strerror or os.strerror(e.errno)
    match = _TS_OS_ERROR.search(str(e))
    if match:
      return os.strerror(int(match.group(1)))
  return None


def _short_reason(error: BaseException) -> str:
  """One short line saying why `error` happened: the OS error text if any.

  Otherwise the last clause of the first line of the message, without
  TensorStore's annotations (its JSON spec alone can run to 60 lines).
  """
  text = _os_error_text(error)
  if text is not None:
    return text
  lines = [line for line in str(error).splitlines() if line.strip()]
  message = _TS_ANNOTATION.sub("", lines[0] if lines else "").strip()
  clauses = message.split(": ")
  if len(clauses) > 2:  # TensorStore chains "CODE: Error x: Error y: cause"
    message = f"{clauses[0]}: {clauses[-1]}"
  if not message:
    message = type(error).__name__
  if len(message) > _MAX_REASON_CHARS:
    message = message[:_MAX_REASON_CHARS - 3] + "..."
  return message


@contextlib.contextmanager
def _quiet_closed_loop_noise():
  """Drops 'Exception ignored' reports from a failed restore's leftover reads.

  When a read of a broken file fails, Orbax's asyncio.gather returns while
  sibling TensorStore reads are still pending; their callbacks later hit the
  closed event loop and Python prints an "Exception ignored" traceback that
  says nothing about the checkpoint (the warning that sets it aside does).
  Only RuntimeErrors about a closed event loop are dropped.
  """
  original = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and (
        "Event loop is closed" in str(unraisable.exc_value)):
      return
    original(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    if sys.unraisablehook is hook:
      sys.unraisablehook = original


class _OrbaxSaveErrorFilter(py_logging.Filter):
  """Keeps Orbax's log lines about a failed save but drops their tracebacks.

  Orbax logs the same background exception with a full traceback from two
  threads (each ~60 lines); `CheckpointSaveError` says it in one line.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if (record.exc_info and record.levelno >= py_logging.ERROR and
        "/orbax/" in record.pathname):
      message = _TS_ANNOTATION.sub("", record.getMessage())
      if len(message) > 2 * _MAX_REASON_CHARS:
        message = message[:2 * _MAX_REASON_CHARS - 3] + "..."
      reason = _short_reason(record.exc_info[1]) if record.exc_info[1] else ""
      record.msg = message if reason in message else f"{message}: {reason}"
      record.args = None
      record.exc_info = None
      record.exc_text = None
    return True


def _install_orbax_log_filter() -> None:
  """Adds `_OrbaxSaveErrorFilter` to absl's logger (once per process)."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _OrbaxSaveErrorFilter) for f in logger.filters):
    logger.addFilter(_OrbaxSaveErrorFilter())


def _all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (a restore is all or nothing)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _key_name(key) -> str:
  """A tree-path entry as a plain string (dict key, attribute or index)."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _shapes_by_path(tree) -> dict[tuple[str, ...], tuple[int, ...] | None]:
  """`{path: shape}` with paths spelt the same for Orbax metadata and targets.

  Orbax stores NamedTuple fields as dict keys and tuples as lists, so paths are
  compared as strings (`("opt", "0", "mu", "w")`).
  """
  leaves, _ = jax.tree.flatten_with_path(tree)
  return {
      tuple(_key_name(k) for k in path): (
          tuple(leaf.shape) if hasattr(leaf, "shape") else None)
      for path, leaf in leaves
  }


def _describe_mismatch(saved: dict, target: dict, limit: int = 5) -> str:
  """One line naming up to `limit` paths that differ between two shape maps."""
  problems = [f"{'/'.join(p)} missing in checkpoint"
              for p in sorted(target.keys() - saved.keys())]
  problems += [f"{'/'.join(p)} missing in target"
               for p in sorted(saved.keys() - target.keys())]
  problems += [f"{'/'.join(p)} shape {saved[p]} saved vs {target[p]} target"
               for p in sorted(saved.keys() & target.keys())
               if None not in (saved[p], target[p]) and saved[p] != target[p]]
  more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
  return "; ".join(problems[:limit]) + more
