"""A complete tiny PUMA trained end to end on the built-in synthetic set, on a CPU.

    python -m puma_jax.tools.train_demo --workdir=W [--smoke] [--clip=random|trained]

Every stage is an ordinary training run (`training.loop.train_and_evaluate` of a
`configs/<file>.py:<variant>` config, exactly what `python -m puma_jax.main` runs), in process,
each in its own workdir under W:

  W/parts/clip        the ONE CLIP every stage reads (the decoders invert the MLLM's CLIP
                      features, so both must see the same network): seeded random weights with
                      a 2-D sin-cos place code (`random_clip`); with --clip=trained that CLIP
                      trained contrastively on the synthetic captions first (tools/demo_clip,
                      a stand-in for the pretrained CLIP-L that cannot be downloaded here; the
                      MLLM stages then weight the image loss `TRAINED_CLIP_IMAGE_WEIGHT`)
  W/vae               configs/vae.py:demo              -> W/parts/vae
  W/decoder_f4..f0    configs/decoder.py:demo_fK       (init.clip, init.vae)
  W/pretrain          configs/pretrain.py:demo         (init.clip) -> W/parts/pretrain_puma
  W/unified           configs/unified.py:demo          (init.puma) every task + the router
  W/release           the trained release (docs/SAMPLING.md), tiny_release.make
  W/release_untrained the same architectures with random weights and the same CLIP (baseline)

Rerunning resumes: a stage whose final checkpoint is present is skipped, a partly trained one
resumes from its newest checkpoint (the loop's own resume), finished parts and releases are
kept. One line per stage start and end with the elapsed time and an ETA for the whole demo;
per-stage wall times are printed at the end and written to W/demo_times.json. `--smoke` runs a
handful of steps per stage (CI: the release is written and can be sampled).

Budget (2-core CPU): 30 minutes. Measured on 2 idle cores (2026-12-02): 29 min 42 s in all
(VAE 1800 steps 4:09, decoders f4..f0 (200 / 200 / 200 / 200 / 4000 steps) 1:25 / 0:58 / 0:55
/ 0:54 / 10:07, pretraining 400 steps 4:13, unified tuning 600 steps 6:31, the two releases
29 s); stage times vary by 10-20% between runs. The MLLM stages (puma.tiny(): 173k trainable
parameters, 84k frozen CLIP; 8 packed rows of 896 positions per step) run 1.6-2 steps/s.
Held-out scores of that run: the README, "The tiny PUMA, end to end".
Then: python -m puma_jax.eval --config=configs/eval/synthetic.py --release=W/release
and: python -m puma_jax.tools.diagnose_demo --workdir=W (why it scores what it scores)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from absl import flags

from puma_jax.models import pooling
from puma_jax.tools import demo_clip

REPO = Path(__file__).resolve().parents[2]
SMOKE_STEPS = 2  # optimizer steps per training stage under --smoke
CLIP_STEPS = 300  # the CLIP stage's contrastive steps (puma_jax/tools/demo_clip.py)
CLIP_BATCH = 64  # its image-caption pairs per step
SMOKE_CLIP_BATCH = 8  # ... under --smoke
CLIP_KINDS = ("random", "trained")  # --clip
# The MLLM stages' loss.image_weight with the trained CLIP (ours). Predicting each slot's mean
# feature costs an MSE of about 30 on its features (the scale weights of docs/DESIGN.md §7
# included; the random CLIP's: 13), and at 1.0 the regression outweighed the text CE 30 to 1.
# Measured, 400 steps of the demo pretraining on the trained CLIP, held out: text CE 1.76 at
# 1.0, 0.32 at 0.03, 0.30 with no image loss; image MSE 11.3, 14.8 and 39.8 (docs/DESIGN.md §11).
TRAINED_CLIP_IMAGE_WEIGHT = 0.03
TIMES_FILE = "demo_times.json"
# Seconds per optimizer step of each stage kind on 2 idle cores (a full run on 2026-12-02: VAE
# 1800 steps in 4:24, decoder f0 4000 in 9:43, unified tuning 800 in 8:09, less the fixed part);
# the ETA scales them by how much slower the stages that did run were.
PRIOR_STEP_S = {"clip": 0.75, "vae": 0.14, "decoder": 0.14, "mllm": 0.58}
PRIOR_FIXED_S = 20.0  # per stage: compile, data start, checkpoint, export


def load_config(spec: str, overrides: dict | None = None, optional: dict | None = None):
  """The config of "path/to/file.py[:arg]" as ml_collections' config_flags builds it
  (`get_config(arg)`, or `get_config()` without one), with dotted-key `overrides` applied
  (a key the config lacks is an error) and `optional` ones (applied where the key exists).
  A relative path is taken from the repository root."""
  path, _, arg = spec.partition(":")
  p = Path(path)
  if not p.is_absolute():
    p = REPO / p
  if not p.is_file():
    raise ValueError(f"config file {p} does not exist")
  mod_spec = importlib.util.spec_from_file_location(f"_puma_config_{p.stem}", p)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in [*(overrides or {}).items(), *(optional or {}).items()]:
    target, *path_, leaf = [config, *key.split(".")]
    for k in path_:
      target = target[k] if k in target else {}
    if leaf not in target:
      if key in (optional or {}):
        continue
      raise ValueError(f"{spec}: no field {key!r} to override")
    target[leaf] = value
  return config


@dataclasses.dataclass
class Stage:
  """One step of the demo. kind: "train" (a training run in `workdir`), "part" (a module dir
  written by `make`), "release"."""

  name: str
  kind: str
  path: Path  # the workdir, part dir or release dir
  config: str = ""  # train: configs/<file>.py:<variant>
  overrides: dict = dataclasses.field(default_factory=dict)
  make: Callable[[Path], None] | None = None  # part / release: writes `path`
  step_kind: str = ""  # train: vae | decoder | mllm; part: clip (the ETA's prior)
  steps: int | None = None  # part: its own optimizer steps if it trains (train: the config's)

  def load(self, smoke: bool):
    return load_config(self.config, self.overrides, SMOKE if smoke else None)


# --smoke: where a stage's config has the field. In this order: a config whose eval_every *is*
# its total_steps reference (not a derived one) has both set by either, so total_steps comes
# last (such a stage then evaluates once, at its last step).
SMOKE = {
  "train.eval_every": 0,
  "train.log_every": 1,
  "train.checkpoint_every": SMOKE_STEPS,
  "optim.warmup_steps": 0,
  "optim.total_steps": SMOKE_STEPS,
  "train.total_steps": SMOKE_STEPS,
}


def plan(workdir: Path, seed: int = 0, smoke: bool = False, clip_kind: str = "random"):
  """The demo's stages, in order (`clip_kind`: `CLIP_KINDS`)."""
  if clip_kind not in CLIP_KINDS:
    raise ValueError(f"--clip={clip_kind!r}; choose from {CLIP_KINDS}")
  from puma_jax import export
  from puma_jax.tools import tiny_release

  w = Path(workdir).absolute()
  clip, vae, pre_puma = w / "parts" / "clip", w / "parts" / "vae", w / "parts" / "pretrain_puma"
  scales = list(reversed(pooling.SCALE_NAMES))  # f4 (1 token, fastest) first
  decoders = [w / f"decoder_{s}" for s in pooling.SCALE_NAMES]
  trained = clip_kind == "trained"
  mllm_overrides = {"loss.image_weight": TRAINED_CLIP_IMAGE_WEIGHT} if trained else {}
  if trained:
    clip_stage = Stage(
      "clip",
      "part",
      clip,
      make=lambda dst: train_clip(dst, seed, smoke),
      step_kind="clip",
      steps=clip_steps(smoke),
    )
  else:
    clip_stage = Stage("clip", "part", clip, make=lambda dst: write_clip(dst, seed))
  stages = [
    clip_stage,
    Stage("vae", "train", w / "vae", "configs/vae.py:demo", step_kind="vae"),
    Stage("vae_part", "part", vae, make=lambda dst: export.save_module_dir(w / "vae", dst)),
  ]
  for s in scales:
    stages.append(
      Stage(
        f"decoder_{s}",
        "train",
        w / f"decoder_{s}",
        f"configs/decoder.py:demo_{s}",
        {"init.clip": str(clip), "init.vae": str(vae)},
        step_kind="decoder",
      )
    )
  stages += [
    Stage(
      "pretrain",
      "train",
      w / "pretrain",
      "configs/pretrain.py:demo",
      {"init.clip": str(clip), **mllm_overrides},
      step_kind="mllm",
    ),
    Stage(
      "pretrain_puma",
      "part",
      pre_puma,
      make=lambda dst: export.save_module_dir(w / "pretrain", dst),
    ),
    Stage(
      "unified",
      "train",
      w / "unified",
      "configs/unified.py:demo",
      {"init.puma": str(pre_puma), **mllm_overrides},
      step_kind="mllm",
    ),
    Stage(
      "release",
      "release",
      w / "release",
      make=lambda dst: tiny_release.make(dst, seed=seed, workdirs=[w / "unified", *decoders]),
    ),
    Stage(
      "release_untrained",
      "release",
      w / "release_untrained",
      make=lambda dst: tiny_release.make(
        dst, seed=seed, workdirs=[w / "unified", *decoders], clip=clip, untrained=True
      ),
    ),
  ]
  return stages


def _check_clip_kind(path: Path, kind: str) -> None:
  """A workdir's CLIP part stays what it was written as: resuming with the other `--clip`
  would pair stages trained on different CLIPs."""
  if not path.is_dir():
    return
  was = "trained" if (path / demo_clip.RECORD).is_file() else "random"
  if was != kind:
    raise ValueError(
      f"{path} holds the {was} CLIP but --clip={kind}: use a new workdir (or --clip={was})"
    )


def clip_steps(smoke: bool) -> int:
  """Optimizer steps of the demo's CLIP stage (`train_clip`)."""
  return SMOKE_STEPS if smoke else CLIP_STEPS


def train_clip(dst: Path, seed: int, smoke: bool = False) -> None:
  """The demo's shared CLIP: `random_clip(seed)` trained contrastively on the synthetic
  captions (`puma_jax.tools.demo_clip`, a stand-in for a pretrained CLIP), written to `dst`."""
  demo_clip.train(
    dst,
    seed=seed,
    steps=clip_steps(smoke),
    batch=SMOKE_CLIP_BATCH if smoke else CLIP_BATCH,
    warmup=0 if smoke else demo_clip.WARMUP,
  )


def write_clip(dst: Path, seed: int) -> None:
  """`random_clip(seed)` saved as a clip-vision module dir (what `init.clip` reads)."""
  from puma_jax import checkpoints

  model = demo_clip.random_clip(seed)
  checkpoints.save_module(
    dst,
    "clip-vision",
    model.config,
    model,
    source=f"puma_jax.tools.train_demo (random, seed {seed}; 2-D sin-cos position code)",
  )


def status(stage: Stage, total_steps: int | None) -> tuple[str, int]:
  """("done" | "partial" | "todo", newest finished step) of a stage from what is on disk."""
  if stage.kind == "part":
    from puma_jax import checkpoints

    # parts are renamed into place whole (`_staged`): present means finished
    return ("done" if (stage.path / checkpoints.CONFIG_FILE).is_file() else "todo"), 0
  if stage.kind == "release":
    return ("done" if _release_done(stage.path) else "todo"), 0
  from puma_jax.training import checkpoints

  root = stage.path / "checkpoints"
  steps = (
    sorted(
      int(p.name)
      for p in root.iterdir()
      if p.name.isdigit() and p.is_dir() and checkpoints.verify(p) is None
    )
    if root.is_dir()
    else []
  )
  if not steps:
    return "todo", 0
  final = (root / str(steps[-1]) / checkpoints.MANIFEST).is_file()
  if total_steps is not None and steps[-1] >= total_steps and final:
    return "done", steps[-1]
  return "partial", steps[-1]


def _release_done(path: Path) -> bool:
  from puma_jax import release as release_lib

  try:
    release_lib.Release.open(path)
  except (OSError, ValueError):
    return False
  return True


def _staged(dst: Path, make: Callable[[Path], None]) -> None:
  """make() into a temporary sibling, renamed to `dst` at the end: an interrupted part is never
  mistaken for a finished one."""
  import shutil

  tmp = dst.with_name(f".{dst.name}.partial")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.parent.mkdir(parents=True, exist_ok=True)
  make(tmp)
  tmp.rename(dst)


def _fmt(s: float) -> str:
  s = int(round(s))
  return f"{s // 60}:{s % 60:02d}"


class Eta:
  """Seconds left for the whole demo: remaining steps x the prior step time of their kind,
  scaled by measured / prior of the training stages already run in this process."""

  def __init__(self, stages: list[Stage], steps: dict[str, int]):
    self.steps, self.kinds = steps, {s.name: s.step_kind for s in stages}
    self.measured = self.predicted = 0.0

  def prior(self, name: str, done_steps: int = 0) -> float:
    kind = self.kinds.get(name)
    if not kind:
      return PRIOR_FIXED_S / 4
    return PRIOR_FIXED_S + PRIOR_STEP_S[kind] * max(self.steps[name] - done_steps, 0)

  def record(self, name: str, wall: float, done_steps: int) -> None:
    if self.kinds.get(name):
      self.measured += wall
      self.predicted += self.prior(name, done_steps)

  def left(self, remaining: list[tuple[str, int]]) -> float:
    factor = self.measured / self.predicted if self.predicted else 1.0
    return factor * sum(self.prior(n, d) for n, d in remaining)


def run(
  workdir: str | Path, *, smoke: bool = False, seed: int = 0, clip: str = "random", say=print
) -> dict:
  """Runs (or resumes) every stage; returns {stage: wall seconds} of this run."""
  from absl import logging

  from puma_jax.training import loop

  w = Path(workdir).absolute()
  w.mkdir(parents=True, exist_ok=True)
  stages = plan(w, seed, smoke, clip)
  _check_clip_kind(w / "parts" / "clip", clip)
  configs = {s.name: s.load(smoke) for s in stages if s.kind == "train"}
  steps = {n: int(c.train.total_steps) for n, c in configs.items()}
  steps.update({s.name: s.steps for s in stages if s.steps is not None})
  state = {s.name: status(s, steps.get(s.name)) for s in stages}
  eta = Eta(stages, steps)
  times_path = w / TIMES_FILE
  times = json.loads(times_path.read_text()) if times_path.is_file() else {}
  t0 = time.perf_counter()
  # The stages' progress lines are prints; absl INFO (metric writers, orbax) goes to each
  # workdir's train.log only.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  this_run = {}
  try:
    for i, st in enumerate(stages):
      what, done = state[st.name]
      remaining = [(s.name, state[s.name][1]) for s in stages[i:] if state[s.name][0] != "done"]
      if what == "done":
        say(f"[demo {_fmt(time.perf_counter() - t0)}] {st.name}: done ({st.path}), skipped")
        continue
      desc = (
        f"{st.config}, {steps[st.name]} steps"
        + (f", resuming at step {done}" if what == "partial" else "")
        if st.kind == "train"
        else (f"{steps[st.name]} steps" if st.name in steps else "writing")
      )
      say(
        f"[demo {_fmt(time.perf_counter() - t0)}] stage {i + 1}/{len(stages)} {st.name} "
        f"({desc}) -> {st.path}; ETA {_fmt(eta.left(remaining))}"
      )
      ts = time.perf_counter()
      if st.kind == "train":
        loop.train_and_evaluate(configs[st.name], str(st.path))
        new, _ = status(st, steps[st.name])
        if new != "done":  # a Ctrl-C / SIGTERM: the loop saved and returned
          raise loop.StopTraining(f"{st.name} stopped before its last step; rerun to resume")
      else:
        # reading a finished workdir read-only makes orbax warn about its save options
        logging.set_verbosity(logging.ERROR)
        try:
          _staged(st.path, st.make)
        finally:
          logging.set_verbosity(logging.WARNING)
      wall = time.perf_counter() - ts
      eta.record(st.name, wall, done)
      state[st.name] = ("done", steps.get(st.name, 0))
      this_run[st.name] = times[st.name] = round(wall, 2)
      times_path.write_text(json.dumps(times, indent=1) + "\n")
      left = [(s.name, state[s.name][1]) for s in stages if state[s.name][0] != "done"]
      say(
        f"[demo {_fmt(time.perf_counter() - t0)}] {st.name} done in {_fmt(wall)}; "
        f"ETA {_fmt(eta.left(left))}"
      )
  finally:
    logging.set_verbosity(verbosity)
  total = time.perf_counter() - t0
  say(f"demo finished in {_fmt(total)}; stage wall times (also in {times_path}):")
  for name, s in times.items():
    say(f"  {name:18s} {_fmt(s)}" + ("" if name in this_run else "  (an earlier run)"))
  say(
    "next: python -m puma_jax.eval --config=configs/eval/synthetic.py "
    f"--release={w / 'release'} --config.untrained_release={w / 'release_untrained'} "
    f"--workdir={w / 'eval'}"
  )
  return this_run


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "demo directory (created; rerun to resume)", flag_values=FLAGS)
flags.DEFINE_bool("smoke", False, f"{SMOKE_STEPS} steps per stage (CI)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the shared CLIP and the baseline", flag_values=FLAGS)
flags.DEFINE_enum(
  "clip",
  "random",
  list(CLIP_KINDS),
  "the shared CLIP: random (seeded, 2-D sin-cos place code) or trained contrastively first "
  "(tools/demo_clip; with the image loss scaled to its features)",
  flag_values=FLAGS,
)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def _main(argv: list[str]) -> None:
  run(FLAGS.workdir, smoke=FLAGS.smoke, seed=FLAGS.seed, clip=FLAGS.clip)


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  from puma_jax import cli
  from puma_jax.training import loop

  argv = sys.argv if argv is None else ["python -m puma_jax.tools.train_demo", *argv]
  return cli.run(
    _main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError, loop.StopTraining)
  )


if __name__ == "__main__":
  raise SystemExit(main())
