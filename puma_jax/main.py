"""Entry point: python -m puma_jax.main --config=configs/pretrain.py[:variant] [--workdir=DIR]
[--config.key=value ...]

Thin on purpose (as in the Flax examples): parse flags, check the stage name against
`training.registry`, then `training.loop.train_and_evaluate`.
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from puma_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/pretrain.py", "Training config file (and :variant).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "workdirs/default", "Directory for checkpoints and metrics (resumed if present)."
)


def main(argv):
  from puma_jax.training import loop, registry

  logging.set_verbosity(logging.INFO)
  registry.get_stage(str(_CONFIG.value.stage))
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _expected():
  from puma_jax.training import loop  # imported late: `--help` should not wait for JAX

  return (ValueError, loop.StopTraining)


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__, expected=_expected))
