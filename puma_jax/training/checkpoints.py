"""Training checkpoints: parameters, optimizer state, step, frozen parts, data-iterator state
and the model/stage description (`Stage.meta()`, checked on resume), in an orbax
CheckpointManager under `workdir/checkpoints` (async, newest `train.keep_checkpoints` kept).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from puma_jax.checkpoints import CheckpointError

# The items of one training checkpoint (orbax item names; renaming one breaks resuming).
TRAIN_ITEMS = ("state", "frozen", "data", "meta")


def train_manager(directory: Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=int(config.train.keep_checkpoints),
    enable_async_checkpointing=bool(config.train.async_checkpointing),
    create=True,
  )
  return ocp.CheckpointManager(Path(directory).absolute(), item_names=TRAIN_ITEMS, options=options)


def save_train(
  manager: ocp.CheckpointManager, step: int, state, frozen, data_state: dict, meta: dict
) -> None:
  items = dict(
    state=ocp.args.StandardSave(state),
    frozen=ocp.args.StandardSave(frozen),
    data=ocp.args.JsonSave(data_state),
    meta=ocp.args.JsonSave(meta),
  )
  if not jax.tree.leaves(frozen):
    del items["frozen"]  # a stage that freezes nothing (vae): orbax refuses an empty item
  manager.save(step, args=ocp.args.Composite(**items))


def check_train_meta(manager: ocp.CheckpointManager, step: int, meta: dict) -> None:
  """Refuses to resume from a checkpoint of another model or stage (nothing is deleted)."""
  stored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if stored != json.loads(json.dumps(meta)):
    diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
    raise CheckpointError(
      f"{manager.directory} holds a checkpoint (step {step}) of another model or stage "
      f"(differs in {diff}); use a new --workdir, or the same config to resume. "
      "Nothing was changed."
    )


def restore_train(manager: ocp.CheckpointManager, step: int, abstract_state, abstract_frozen):
  items = dict(
    state=ocp.args.StandardRestore(abstract_state),
    frozen=ocp.args.StandardRestore(abstract_frozen),
    data=ocp.args.JsonRestore(),
  )
  if not jax.tree.leaves(abstract_frozen):
    del items["frozen"]  # never saved (save_train)
  got = manager.restore(step, args=ocp.args.Composite(**items))
  return got["state"], got["frozen"] if "frozen" in items else abstract_frozen, got["data"]


# ----------------------------------------------------------------------------------------------
# Integrity: a manifest of file hashes per checkpoint, and setting aside what fails it.
#
# Orbax checks no content on restore (its zarr3 crc32c covers only the chunk index), so a
# flipped byte in a data file restores silently. After a save has completed, every file of
# the step directory is hashed (sha256) into MANIFEST inside it; a resume checks the hashes
# before loading and never loads a step that fails. Steps without a manifest (saved by an
# older version, or a kill between the save and its manifest) are tried, with a warning.

MANIFEST = "puma_manifest.json"
SET_ASIDE = "checkpoints.unreadable"  # sibling of checkpoints/: what resume would not load


class UnreadableCheckpoint(Exception):
  def __init__(self, step: int, reason: str):
    super().__init__(f"step {step}: {reason}")
    self.step, self.reason = step, reason


class _DroppedReadErrors(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" records of orbax's array reads.

  When one array of a damaged checkpoint fails to read, orbax's `asyncio.gather` raises the
  first error and leaves the other reads' errors (and the gather's own future) unretrieved;
  asyncio logs each, with a TensorStore spec dump, whenever it is garbage collected, which may
  be minutes later in the middle of a later run's console. The failure is reported once,
  naming the step (`UnreadableCheckpoint`), so these echoes are dropped: a record is one when
  its message says so and either its exception was raised in orbax's code or its text names a
  file of a step whose restore failed (`failed`). The second covers TensorStore's own futures:
  their errors are set by a C++ callback, never raised in Python, so they carry no traceback
  and their message names only the file ('... in OCDBT database at local file ".../4/state/"').
  """

  def __init__(self):
    super().__init__()
    self.failed: set[str] = set()  # step directories whose restore failed, as paths and resolved

  def _names_failed_step(self, text: str) -> bool:
    return any(d in text for d in self.failed)

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    seen = set()
    while exc is not None and id(exc) not in seen:
      seen.add(id(exc))
      if self._names_failed_step(str(exc)):
        return False
      tb = exc.__traceback__
      while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
          return False
        tb = tb.tb_next
      exc = exc.__cause__ or exc.__context__
    return "orbax" not in str(record.msg) and not self._names_failed_step(str(record.msg))


_DROP_READ_ERRORS = _DroppedReadErrors()


def _is_orbax_coroutine(obj) -> bool:
  code = getattr(obj, "cr_code", None)
  return code is not None and "orbax" in code.co_filename


def _drop_orbax_unraisable(previous):
  def hook(unraisable):
    # a read finishing after its loop closed: TensorStore's callback meets the closed loop
    late = (
      unraisable.object is None
      and isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"
    )
    failed_read = _DROP_READ_ERRORS._names_failed_step(str(unraisable.exc_value))
    if not (late or failed_read or _is_orbax_coroutine(unraisable.object)):
      previous(unraisable)

  hook.drops_orbax_reads = True
  return hook


def drop_failed_read_echoes(step_dir: Path | str) -> None:
  """After a failed restore of `step_dir` (its exception already released): keeps the echoes
  of orbax's abandoned reads off the console from now on, and collects what can be collected.

  The echoes: asyncio's "Task exception was never retrieved" records (`_DroppedReadErrors`)
  and, for reads still suspended in orbax's closed event loop, "Exception ignored in
  <coroutine>" when the coroutine is finalized (it re-raises its read error on close), often
  only at interpreter exit, or "Event loop is closed" from a read that completes after its loop
  closed. Other unraisable errors are reported as before."""
  path = Path(step_dir)
  # with a trailing separator: step 4's files, not step 40's
  _DROP_READ_ERRORS.failed.update({os.path.join(str(p), "") for p in (path, path.resolve())})
  log = logging.getLogger("asyncio")
  if _DROP_READ_ERRORS not in log.filters:
    log.addFilter(_DROP_READ_ERRORS)
  if not getattr(sys.unraisablehook, "drops_orbax_reads", False):
    sys.unraisablehook = _drop_orbax_unraisable(sys.unraisablehook)
  gc.collect()


def _hash_file(path: Path) -> str:
  import hashlib

  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _step_files(step_dir: Path) -> dict[str, str]:
  return {
    str(p.relative_to(step_dir)): _hash_file(p)
    for p in sorted(step_dir.rglob("*"))
    if p.is_file() and p.name != MANIFEST
  }


def write_manifests(manager: ocp.CheckpointManager) -> None:
  """Waits for pending saves, then writes the manifest of every step that lacks one."""
  import jax

  manager.wait_until_finished()
  if jax.process_index() != 0:
    return
  root = Path(manager.directory)
  for step in manager.all_steps():
    step_dir = root / str(step)
    if step_dir.is_dir() and not (step_dir / MANIFEST).exists():
      tmp = step_dir / (MANIFEST + ".tmp")
      tmp.write_text(json.dumps({"sha256": _step_files(step_dir)}, indent=0, sort_keys=True))
      tmp.replace(step_dir / MANIFEST)


def verify(step_dir: Path) -> str | None:
  """None if the step directory matches its manifest (or has none); else what is wrong."""
  if not (step_dir / "_CHECKPOINT_METADATA").exists():
    return "not an orbax checkpoint (no _CHECKPOINT_METADATA)"
  path = step_dir / MANIFEST
  if not path.exists():
    return None
  try:
    want = json.loads(path.read_text())["sha256"]
  except (ValueError, KeyError, TypeError) as e:
    return f"unreadable {MANIFEST} ({type(e).__name__})"
  have = _step_files(step_dir)
  missing = sorted(set(want) - set(have))
  if missing:
    return f"file {missing[0]} is missing"
  changed = sorted(k for k in want if have[k] != want[k])
  if changed:
    return f"file {changed[0]} does not match its sha256 in {MANIFEST}"
  return None


def set_aside(directory: Path, name: str, reason: str, log) -> None:
  """Moves `directory/name` to `directory/../checkpoints.unreadable/` (nothing is deleted),
  out of orbax's way: orbax would count it as the latest step and refuse to save below it."""
  import time

  dst_root = Path(directory).parent / SET_ASIDE
  dst_root.mkdir(exist_ok=True)
  dst = dst_root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
  Path(directory, name).rename(dst)
  log(f"checkpoints/{name} is not a usable checkpoint ({reason}); moved to {dst} and ignored")


def sanitize(directory: Path, log) -> None:
  """Before orbax lists the steps: numeric entries that are no complete checkpoint or fail
  their manifest are set aside; other stray entries are left where they are, with a warning
  (orbax ignores them)."""
  import jax

  directory = Path(directory)
  if jax.process_index() != 0 or not directory.is_dir():
    return
  for p in sorted(directory.iterdir()):
    if p.name.isdigit() and p.is_dir():
      reason = verify(p)
      if reason:
        set_aside(directory, p.name, reason, log)
    elif p.name.isdigit():
      set_aside(directory, p.name, "not a directory", log)
    elif ".orbax-checkpoint-tmp" not in p.name:  # orbax's own partial saves: its to clean
      log(f"checkpoints/{p.name} is not a checkpoint; ignored")
