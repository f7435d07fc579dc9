"""Eval: synthetic -- a release scored on the synthetic held-out split with model-free checks.

Every task PUMA is trained on (text-to-image per scale, reconstruction per scale, understanding,
grounding, editing, conditional generation, the router) is read back with checks that need no
learned metric network (puma_jax/evaluation/synthetic_checks.py), next to an untrained release
of the same architectures and a trivial baseline. See docs/EVAL.md ("synthetic").

Variants (`--config=configs/eval/synthetic.py:VARIANT`):
  default  item counts that finish in about 5 minutes for a tiny release on a 2-core CPU.
  smoke    2 items per check and 2 sampler steps (CI).

Run:
  python -m puma_jax.eval --config=configs/eval/synthetic.py --release=R \
      [--config.untrained_release=R0] [--workdir=DIR]     # DIR defaults to R_eval
"""

import ml_collections


def get_config(arg: str = "default"):
  if arg not in ("default", "smoke"):
    raise ValueError(f"unknown synthetic eval variant {arg!r}; choose default or smoke")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.protocol = "synthetic"  # dispatches to puma_jax/evaluation/synthetic_eval.py
  c.release = ""  # the release to score (set by --release, or here)
  c.untrained_release = ""  # same architectures, random weights ("" = no such column)
  c.seed = 0  # sampling seed (example i of a check decodes with fold_in(key(seed), i))
  c.steps = 2 if smoke else 50  # diffusion steps per decode (docs/SAMPLING.md: 50)
  c.guidance = 2.0  # classifier-free guidance scale (docs/DESIGN.md §5: 2.0)
  c.scheduler = "ddpm"  # diffusion scheduler (docs/SAMPLING.md: ddpm, the paper's)
  c.batch_size = 2 if smoke else 16  # examples per compiled call (one program per scale)
  c.max_new_tokens = 32  # answer length cap (the longest training answer is ~25 bytes)
  c.grid_rows = 2 if smoke else 8  # held-out prompts shown in grid.png

  c.num = ml_collections.ConfigDict()
  n = 2 if smoke else 16
  c.num.text_to_image = n  # single-shape held-out prompts, each decoded at every scale
  c.num.reconstruction = n  # held-out images reconstructed at every scale
  c.num.understanding = 2 if smoke else 12  # questions per type (colour, shape, ...)
  c.num.grounding = n  # held-out scenes; every shape of each is grounded
  c.num.editing = 1 if smoke else 6  # held-out edits per operation (colour, move, ...)
  c.num.conditional = 2 if smoke else 12  # held-out condition images (canny/inpaint/colorize)
  c.edit_scales = ("f1",)  # editing output scales (f1: the task default, router.py)

  c.data = ml_collections.ConfigDict()
  c.data.seed = 0  # the training data's seed (data.seed): scenes and per-example choices
  c.data.num_train = 2000  # the training split's size (data.synthetic.num_train): held-out
  # scenes are those never described like one of these
  c.data.num_eval = 200  # held-out scenes available per family (items are drawn from these)
  c.data.trivial_train = 2000  # training scenes the trivial baseline averages (answers, boxes,
  # mean image)
  c.data.cond_types = "canny,inpaint,colorize"  # data.conditional.cond_types of training
  return c
