"""Entry point: python -m puma_jax.eval --config=configs/eval/<protocol>.py[:variant] --workdir=DIR
[--config.key=value ...]

Scores this host's share of the records (resuming from DIR/shards), and on process 0 writes
DIR/results.json and DIR/results.md (our numbers beside the paper's). See
puma_jax/evaluation/runner.py.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from puma_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "configs/eval/<protocol>.py[:variant]", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for shard files and results (a partly finished run there is resumed)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from puma_jax.evaluation import runner

  out = runner.evaluate(_CONFIG.value, _WORKDIR.value)
  if out is not None:
    if out["random_weights"]:
      print(
        "note: stand-ins built in-process (random weights or the toy generator): "
        f"{', '.join(out['random_weights'])} (no checkpoint dirs given); the numbers test "
        "the pipeline, not PUMA"
      )
    print(runner.markdown(out), end="")
    print(f"wrote {_WORKDIR.value}/results.json and results.md")


def _expected():
  from puma_jax.evaluation import metrics, records, runner  # late: `--help` should not wait

  return (
    records.EvalDataError,
    runner.EvalError,
    metrics.MissingWeightsError,
    metrics.MetricInputError,
    ValueError,
  )


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.exit(cli.run(main, doc=__doc__, expected=_expected))
