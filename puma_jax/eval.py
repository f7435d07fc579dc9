"""Entry point: python -m puma_jax.eval --config=configs/eval/<protocol>.py[:variant] --workdir=DIR
[--release=R] [--config.key=value ...]

Scores this host's share of the records (resuming from DIR/shards), and on process 0 writes
DIR/results.json and DIR/results.md (our numbers beside the paper's). See
puma_jax/evaluation/runner.py.

`--release=R` takes the model from a release directory (docs/SAMPLING.md): for the synthetic
protocol (configs/eval/synthetic.py; puma_jax/evaluation/synthetic_eval.py) it is the release
scored; for the others it sets model.kind=puma and model.puma / decoders / vae / tokenizer (and
model.clip when R has a clip/ part). With --release, --workdir defaults to `<R>_eval` for the
synthetic protocol and `<R>_eval_<protocol>` for the others.
"""

from __future__ import annotations

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
_RELEASE = flags.DEFINE_string(
  "release",
  None,
  "Release directory to evaluate (docs/SAMPLING.md); --workdir defaults to R_eval "
  "(synthetic) or R_eval_PROTOCOL.",
)
flags.mark_flags_as_required(["config"])


def main(argv):
  from puma_jax.evaluation import runner

  cfg, release = _CONFIG.value, _RELEASE.value or ""
  if cfg.protocol == "synthetic":
    from puma_jax.evaluation import synthetic_eval

    release = release or cfg.release
    if not release:
      raise app.UsageError("the synthetic protocol needs --release=DIR (or --config.release)")
    workdir = _WORKDIR.value or synthetic_eval.default_workdir(release)
    out = synthetic_eval.run(cfg, release, workdir)
    print(synthetic_eval.markdown(out), end="")
    print(f"wrote {workdir}/results.json, results.md and grid.png ({out['wall_s']:.0f}s)")
    return
  if release:
    from puma_jax.evaluation import config as eval_config

    cfg = eval_config.from_release(cfg, release)
  workdir = _WORKDIR.value or (release and release.rstrip("/") + f"_eval_{cfg.protocol}")
  if not workdir:
    raise app.UsageError("give --workdir=DIR (or --release=R: the workdir is then R_eval_PROTOCOL)")
  out = runner.evaluate(cfg, workdir)
  if out is not None:
    if out["random_weights"]:
      print(
        "note: stand-ins built in-process (random weights or the toy generator): "
        f"{', '.join(out['random_weights'])} (no checkpoint dirs given); the numbers test "
        "the pipeline, not PUMA"
      )
    print(runner.markdown(out), end="")
    print(f"wrote {workdir}/results.json and results.md")


def _expected():
  from puma_jax import release
  from puma_jax.evaluation import metrics, records, runner, synthetic_eval  # late: `--help`

  return (
    release.ReleaseError,
    synthetic_eval.SyntheticEvalError,
    records.EvalDataError,
    runner.EvalError,
    metrics.MissingWeightsError,
    metrics.MetricInputError,
    ValueError,
  )


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__, expected=_expected))
