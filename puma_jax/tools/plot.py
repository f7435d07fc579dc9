"""Training curves from metrics.jsonl (written by training/loop.py) as PNGs.

    python -m puma_jax.tools.plot --workdir=W [--out=W/plots]

W is one training workdir (it holds metrics.jsonl) or a directory of them (the train_demo
layout: W/vae, W/decoder_f0, W/pretrain, ...). Writes one PNG per stage workdir (panels: total
loss, text CE, per-scale MSE, router CE, held-out evaluation, whatever of these it logged) and,
for several, overview.png (every stage's loss on one figure).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

METRICS = "metrics.jsonl"
# panel title -> which keys it draws (exact names, or a prefix ending in "*")
PANELS = (
  ("loss", ("loss",)),
  ("text CE", ("text_ce",)),
  ("per-scale image MSE", ("mse_f*",)),
  ("router CE", ("router_ce",)),
  ("held-out evaluation", ("eval/*",)),
)
# eval/ keys a panel would drown in: the per-kind breakdowns
_EVAL_SKIP = ("eval/text_ce/", "eval/image_mse/")


def read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
  """metric name -> (steps, values) from one metrics.jsonl; a line that does not parse (the
  torn tail of a killed run) is skipped."""
  series: dict[str, tuple[list[int], list[float]]] = {}
  for line in path.read_text(errors="replace").splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if not isinstance(rec, dict) or "step" not in rec:
      continue
    for k, v in rec.items():
      if k != "step" and isinstance(v, (int, float)):
        steps, values = series.setdefault(k, ([], []))
        steps.append(int(rec["step"]))
        values.append(float(v))
  return series


def _match(key: str, patterns) -> bool:
  for p in patterns:
    if p.endswith("*"):
      if key.startswith(p[:-1]) and not key.startswith(_EVAL_SKIP):
        return True
    elif key == p:
      return True
  return False


def find_workdirs(root: Path) -> list[Path]:
  """`root` itself when it holds metrics.jsonl, else its subdirectories that do (sorted)."""
  root = Path(root)
  if not root.is_dir():
    raise ValueError(f"--workdir {root}: not a directory")
  if (root / METRICS).is_file():
    return [root]
  found = sorted(p.parent for p in root.glob(f"*/{METRICS}") if p.is_file())
  if not found:
    raise ValueError(
      f"--workdir {root}: no {METRICS} in it nor in its subdirectories (a training workdir, "
      "or a directory of them, after at least one logged step)"
    )
  return found


def plot_stage(name: str, series: dict, dst: Path) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(t, sorted(k for k in series if _match(k, pats))) for t, pats in PANELS]
  panels = [(t, keys) for t, keys in panels if keys]
  if not panels:
    raise ValueError(f"{name}: {METRICS} has none of the plotted metrics (loss, text_ce, ...)")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (title, keys) in zip(axes[0], panels):
    for k in keys:
      steps, values = series[k]
      ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=k)
    ax.set_title(title)
    ax.set_xlabel("step")
    if title != "held-out evaluation" and all(min(series[k][1]) > 0 for k in keys):
      ax.set_yscale("log")  # losses fall over orders of magnitude
    if len(keys) > 1:
      ax.legend(fontsize=7)
  fig.suptitle(name)
  fig.tight_layout()
  fig.savefig(dst, dpi=80)
  plt.close(fig)
  return dst


def plot_overview(stages: dict[str, dict], dst: Path) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, series in stages.items():
    if "loss" in series:
      steps, values = series["loss"]
      ax.plot(steps, values, label=name)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_title("training loss per stage")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(dst, dpi=80)
  plt.close(fig)
  return dst


def plot(workdir, out=None) -> list[Path]:
  """Writes the PNGs (default folder: `workdir`/plots); returns their paths."""
  root = Path(workdir)
  dirs = find_workdirs(root)
  out = Path(out) if out else root / "plots"
  out.mkdir(parents=True, exist_ok=True)
  stages = {d.name: read_metrics(d / METRICS) for d in dirs}
  written = [plot_stage(n, s, out / f"{n}.png") for n, s in stages.items() if s]
  if not written:
    raise ValueError(f"--workdir {root}: {METRICS} holds no metric lines yet")
  if len(stages) > 1:
    written.append(plot_overview(stages, out / "overview.png"))
  return written


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "training workdir or a folder of them", flag_values=FLAGS)
flags.DEFINE_string("out", None, "folder for the PNGs (default: WORKDIR/plots)", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def _main(argv: list[str]) -> None:
  for p in plot(FLAGS.workdir, FLAGS.out):
    print(p)


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  from puma_jax import cli

  argv = sys.argv if argv is None else ["python -m puma_jax.tools.plot", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError))


if __name__ == "__main__":
  raise SystemExit(main())
