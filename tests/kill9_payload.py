"""Payload for tests/test_train.py: `python -m puma_jax.main ...` that kills itself with SIGKILL
right after its checkpoint of step $PUMA_TEST_KILL_AFTER_SAVE is saved: a kill -9 at a known
point of the run, whatever the machine's speed (a test polling for the checkpoint from outside
could find a fast run already past it, or finished)."""

import os
import signal
import sys

from puma_jax import cli, main as entry
from puma_jax.training import checkpoints

_save = checkpoints.save_train
_KILL_AFTER = int(os.environ["PUMA_TEST_KILL_AFTER_SAVE"])


def save_then_die(manager, step, *args, **kw):
  _save(manager, step, *args, **kw)
  if step == _KILL_AFTER:
    manager.wait_until_finished()  # a synchronous save has finished already; an async one now
    os.kill(os.getpid(), signal.SIGKILL)


checkpoints.save_train = save_then_die

if __name__ == "__main__":
  sys.exit(cli.run(entry.main, doc=entry.__doc__, expected=entry._expected))
