"""What the demo MLLM reads from an image as it trains: one MLLM training run scored at every
checkpoint on held-out and training single-shape scenes of the synthetic set (README, "The tiny
PUMA, end to end"). Run by hand (minutes per 100 steps on a 2-core CPU); CI runs it at toy size.

    python -m benchmarks.mllm_learning_curve --workdir=W --steps=1600 --every=400
    python -m benchmarks.mllm_learning_curve --workdir=W --steps=800 --every=400 \
        --set=optim.lr_groups.llm=0.006 --set=optim.lr_groups.default=0.006

The run is `--config` (default configs/pretrain.py:demo, the demo's pretraining) reading the
demo's CLIP (`train_demo.write_clip`, written to W/parts/clip once; or `--clip=DIR`, such as
the contrastively trained one of `python -m puma_jax.tools.demo_clip`), with `--steps` optimizer
steps (the lr schedule spans them), a checkpoint every `--every` and the `--set` overrides
(dotted config keys, JSON values). At every checkpoint, with `tools/diagnose_demo`'s scoring:

  colour      "What colour is the {shape} at the {place}?" by forced choice over the colours
              (the background's left out; chance about 12%), on `--n` held-out and `--n`
              training scenes
  background  "What colour is the background?" by forced choice over the three backgrounds
              (held-out; chance 33%)
  describe    "Describe the image." answered greedily (held-out): the shape's colour named
              right, the background named right, distinct answers overall and at most among
              the scenes of one background (1: the answer depends on nothing but the background)

Writes W/curve.json and W/curve.md (one row per checkpoint). Rerunning resumes the training run
and rescores every checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "workdir", None, "output directory (created; rerun to resume)", flag_values=FLAGS, required=True
)
flags.DEFINE_string("config", "configs/pretrain.py:demo", "MLLM config", flag_values=FLAGS)
flags.DEFINE_string(
  "clip", "", "clip-vision dir (default: the demo's random CLIP, written once)", flag_values=FLAGS
)
flags.DEFINE_integer("steps", 1600, "optimizer steps", flag_values=FLAGS)
flags.DEFINE_integer("every", 400, "steps between scored checkpoints", flag_values=FLAGS)
flags.DEFINE_integer("n", 48, "held-out and training scenes scored", flag_values=FLAGS)
flags.DEFINE_multi_string("set", [], "config override KEY=VALUE (JSON value)", flag_values=FLAGS)


def parse_overrides(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set={item!r}: expected KEY=VALUE")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value  # a plain string
  return out


def score(pipe, n: int) -> dict:
  from puma_jax.data import synthetic as S
  from puma_jax.tools import diagnose_demo as D

  size = pipe.model.config.clip.image_size
  row = {}
  for split in ("eval", "train"):
    images, scenes = D.single_shape_scenes(split, n, size)
    cands = [[c for c in S.COLORS if c != sc.background] for sc in scenes]
    row[f"colour_{split}"] = D.forced_choice(
      pipe,
      images,
      lambda i: D.colour_question(scenes[i]),
      lambda c: f"It is {c}.",
      lambda i: cands[i],
      lambda i: scenes[i].shapes[0].color,
    )
    if split == "eval":
      row["background_eval"] = D.forced_choice(
        pipe,
        images,
        lambda i: "What colour is the background?",
        lambda c: f"The background is {c}.",
        lambda i: S.BACKGROUNDS,
        lambda i: scenes[i].background,
      )
      d = D.describe_section(pipe, scenes, images)
      row.update({f"describe_{k}": v for k, v in d.items() if k != "examples"})
      row["describe_examples"] = d["examples"][:2]
  return row


def markdown(rows: dict) -> str:
  lines = [
    "| step | colour held-out | colour training | background held-out | describe: colour / "
    "background | distinct answers (max per background) |",
    "|---|---|---|---|---|---|",
  ]
  pct = lambda x: f"{100 * x:.1f}%"
  for step, r in rows.items():
    lines.append(
      f"| {step} | {pct(r['colour_eval'])} | {pct(r['colour_train'])} | "
      f"{pct(r['background_eval'])} | {pct(r['describe_shape_colour'])} / "
      f"{pct(r['describe_background'])} | {r['describe_distinct']} "
      f"({r['describe_distinct_within_background_max']}) |"
    )
  return "\n".join(lines) + "\n"


def run(
  workdir,
  *,
  config: str,
  steps: int,
  every: int,
  n: int,
  overrides: dict,
  clip_dir: str = "",
  say=print,
):
  from absl import logging

  from puma_jax import export
  from puma_jax.inference import pipelines
  from puma_jax.tools import train_demo
  from puma_jax.training import loop

  if steps < 1 or every < 1 or steps % every:
    raise ValueError(f"--steps={steps} must be a positive multiple of --every={every}")
  w = Path(workdir).absolute()
  clip = Path(clip_dir).absolute() if clip_dir else w / "parts" / "clip"
  if clip_dir and not clip.is_dir():
    raise ValueError(f"--clip={clip_dir}: no such directory")
  if not clip.is_dir():
    train_demo.write_clip(clip, 0)
  base = {
    "init.clip": str(clip),
    "optim.total_steps": steps,
    "train.checkpoint_every": every,
    "train.keep_checkpoints": steps // every + 1,
  }
  cfg = train_demo.load_config(config, {**base, **overrides})
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    loop.train_and_evaluate(cfg, str(w / "run"))
    rows = {}
    for step in range(every, steps + 1, every):
      dst = w / f"puma_{step}"
      if not dst.is_dir():
        logging.set_verbosity(logging.ERROR)  # orbax warns about read-only restores
        export.save_module_dir(w / "run", dst, step=step)
        logging.set_verbosity(logging.WARNING)
      rows[step] = score(pipelines.PumaPipeline.load(str(dst)), n)
      r = rows[step]
      say(
        f"step {step}: colour {r['colour_eval']:.3f} held-out / {r['colour_train']:.3f} "
        f"training, background {r['background_eval']:.3f}, describe distinct "
        f"{r['describe_distinct']} (max {r['describe_distinct_within_background_max']} per "
        "background)"
      )
  finally:
    logging.set_verbosity(verbosity)
  meta = {"config": config, "clip": str(clip), "steps": steps, "every": every, "n": n}
  meta["overrides"] = overrides
  (w / "curve.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
  (w / "curve.md").write_text(f"`{json.dumps(meta)}`\n\n" + markdown(rows))
  say(f"wrote {w / 'curve.md'} and curve.json")
  return rows


def _main(argv: list[str]) -> None:
  run(
    FLAGS.workdir,
    config=FLAGS.config,
    steps=FLAGS.steps,
    every=FLAGS.every,
    n=FLAGS.n,
    overrides=parse_overrides(FLAGS.set),
    clip_dir=FLAGS.clip,
  )


def main(argv: list[str] | None = None) -> int:
  from puma_jax import cli

  argv = sys.argv if argv is None else ["python -m benchmarks.mllm_learning_curve", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError))


if __name__ == "__main__":
  raise SystemExit(main())
