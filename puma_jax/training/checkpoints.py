"""Training checkpoints: parameters, optimizer state, step, frozen parts, data-iterator state
and the model/stage description (`Stage.meta()`, checked on resume), in an orbax
CheckpointManager under `workdir/checkpoints` (async, newest `train.keep_checkpoints` kept).
"""

from __future__ import annotations

import json
from pathlib import Path

import orbax.checkpoint as ocp

from puma_jax.checkpoints import CheckpointError

# The items of one training checkpoint (orbax item names; renaming one breaks resuming).
TRAIN_ITEMS = ("state", "frozen", "data", "meta")


def train_manager(directory: Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(config.train.keep_checkpoints),
      enable_async_checkpointing=bool(config.train.async_checkpointing),
      create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), item_names=TRAIN_ITEMS,
                               options=options)


def save_train(manager: ocp.CheckpointManager, step: int, state, frozen, data_state: dict,
               meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), frozen=ocp.args.StandardSave(frozen),
      data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))


def check_train_meta(manager: ocp.CheckpointManager, step: int, meta: dict) -> None:
  """Refuses to resume from a checkpoint of another model or stage (nothing is deleted)."""
  stored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if stored != json.loads(json.dumps(meta)):
    diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
    raise CheckpointError(
        f"{manager.directory} holds a checkpoint (step {step}) of another model or stage "
        f"(differs in {diff}); use a new --workdir, or the same config to resume. "
        "Nothing was changed.")


def restore_train(manager: ocp.CheckpointManager, step: int, abstract_state, abstract_frozen):
  got = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      frozen=ocp.args.StandardRestore(abstract_frozen), data=ocp.args.JsonRestore()))
  return got["state"], got["frozen"], got["data"]
