"""The synthetic protocol: a release scored on the synthetic held-out split, no learned metrics.

    python -m puma_jax.eval --config=configs/eval/synthetic.py --release=R \
        [--config.untrained_release=R0] [--workdir=DIR]

Held-out items (SyntheticSource split "eval": no scene is described as a training scene), each
prompted exactly as training formats its task (data/rows.py, sequence.py templates):

  text_to_image   single-shape scene captions, `[caption][IMG]` (sequence.t2i); one feature
                  generation through f0, every scale the release has decoded; colour / cell /
                  size / background read by synthetic_checks.check_single.
  reconstruction  image -> the release's CLIP, pooled to the scale -> decoder -> pixels:
                  PSNR (all scenes), colour / cell (single-shape scenes).
  understanding   the chat set's questions (synthetic._questions) asked alone with the image in
                  the LLaVA layout (PumaPipeline.chat); normalized exact match per question type.
  grounding       the grounded caption training teaches (sequence.grounded_caption): image, the
                  grounding marker, the caption up to the end of a shape's phrase (earlier shapes
                  followed by their true box tokens), then 4 tokens generated among the position
                  tokens only (PumaPipeline.answer_boxes) -> box; IoU with the truth.
  editing         `[source] instruction [IMG]` (sequence.edit) at `edit_scales`, `num.editing`
                  edits per operation; the asked change is visible ("edit") and the rest kept
                  ("kept"); check_edit.
  conditional     canny / inpaint / colorize condition images derived by the training parser
                  (data/parse.py), `[condition] <task prompt> caption [IMG]`, decoded at the
                  condition's default scale (router.py); colour / cell of single-shape scenes.
  router          with a learned router: the share of examples whose chosen scale is the task's
                  default (router.default_scale); without one the pipelines use the default.

Columns: the release, the untrained release (same architectures, random weights; skipped when
`untrained_release` is empty) and a trivial baseline computed from the training split without a
model: the most frequent training answer per question type, the mean training box, the mean
training image for every image check. Unlike the sharded protocols (runner.py) this one runs in
one process without resume: a tiny release takes minutes, and the checks need whole batches of
every task anyway.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from puma_jax.data import synthetic as S
from puma_jax.evaluation import scoring, synthetic_checks as C
from puma_jax.models import pooling

QUESTION_TYPES = ("colour", "shape", "position", "count", "background")
# (metric, threshold) the trained tiny PUMA should reach (README, "The tiny PUMA, end to end");
# measured, never tuned.
TARGETS = {
  "t2i/f0/colour": 80.0,
  "t2i/f1/colour": 80.0,
  "t2i/f0/cell": 60.0,
  "t2i/f1/cell": 60.0,
  "understanding/colour": 90.0,
  "grounding/iou>0.5": 60.0,
  "editing/f1/color/edit": 70.0,
  "reconstruction/f0/psnr": 22.0,
}
COLUMNS = ("trained", "untrained", "trivial")


class SyntheticEvalError(ValueError):
  pass


def question_type(question: str) -> str | None:
  """The synthetic._questions template a question comes from (None: "Describe the image.",
  whose whole-caption answer is not scored by exact match here)."""
  q = question.strip()
  if q == "What colour is the background?":
    return "background"
  for pattern, kind in (
    (r"^What colour is the ", "colour"),
    (r"^What shape is at the ", "shape"),
    (r"^Where is the ", "position"),
    (r"^How many shapes", "count"),
  ):
    if re.match(pattern, q):
      return kind
  return None


# -- held-out items ------------------------------------------------------------------------------


def _source(family: str, split: str, cfg, image_size: int, num: int | None = None):
  d = cfg.data
  return S.SyntheticSource(
    family,
    split,
    seed=int(d.seed),
    image_size=image_size,
    num_train=int(d.num_train) if num is None or split == "eval" else num,
    num_eval=int(d.num_eval),
  )


def _single_shape(src, n: int) -> list[tuple[int, S.Scene]]:
  out = []
  for i in range(len(src)):
    scene = S.make_scene(src.seed, int(src.ids[i]))
    if len(scene.shapes) == 1:
      out.append((i, scene))
      if len(out) == n:
        break
  return out


def held_out(cfg, image_size: int) -> dict:
  """Every check's items (deterministic in the config)."""
  from puma_jax.data import parse

  it, items = cfg.num, {}
  pairs = _source("pairs", "eval", cfg, image_size)
  t2i = _single_shape(pairs, int(it.text_to_image))
  items["t2i"] = [{"scene": sc, "caption": S.caption(sc)[0]} for _, sc in t2i]
  items["recon"] = [
    {"scene": S.make_scene(pairs.seed, int(pairs.ids[i])), "image": pairs[i]["image"]}
    for i in range(min(len(pairs), int(it.reconstruction)))
  ]

  chat = _source("chat", "eval", cfg, image_size)
  per_type = {t: [] for t in QUESTION_TYPES}
  for i in range(len(chat)):
    r = chat[i]
    conv = r["conversations"]
    for q, a in zip(conv[0::2], conv[1::2]):
      q = q["value"].replace("<image>\n", "")
      t = question_type(q)
      if t is not None and len(per_type[t]) < int(it.understanding):
        per_type[t].append({"type": t, "image": r["image"], "question": q, "answer": a["value"]})
  items["qa"] = [x for t in QUESTION_TYPES for x in per_type[t]]

  ground = _source("grounding", "eval", cfg, image_size)
  items["ground"] = []
  for i in range(min(len(ground), int(it.grounding))):
    r = ground[i]
    chunks = r["noun_chunks"]
    for k in range(len(chunks)):
      items["ground"].append(
        {
          "image": r["image"],
          "caption": r["caption"],
          "spans": [(int(x[0]), int(x[1])) for x in chunks[: k + 1]],
          "boxes": [[float(v) for v in x[2:6]] for x in chunks[: k + 1]],
        }
      )

  edit = _source("edit", "eval", cfg, image_size)
  items["edit"], per_op = [], Counter()
  for i in range(len(edit)):
    sid = int(edit.ids[i])
    source = S.make_scene(edit.seed, sid)
    # The draw SyntheticSource made, replayed to recover the target scene.
    rng = np.random.default_rng([edit.seed, sid, S.FAMILIES.index("edit")])
    target, instr = S.edit(source, rng)
    op = C.edit_op(source, target)
    if per_op[op] >= int(it.editing):
      continue
    per_op[op] += 1
    r = edit[i]
    if instr != r["instruction"]:
      raise SyntheticEvalError(f"edit replay disagrees with the source at {r['key']}")
    items["edit"].append(
      {"source": source, "target": target, "image": r["source"], "instruction": instr}
    )

  cond = _source("conditional", "eval", cfg, image_size)
  opts = parse.ParseOptions(
    seed=int(cfg.data.seed),
    cond_types=tuple(c for c in str(cfg.data.cond_types).split(",") if c),
    derive_short_side=image_size,
  )
  # The source name keys the per-example condition choice: training's is the family name.
  parser = parse.Parser("conditional", "conditional", opts)
  items["cond"] = []
  for i, scene in _single_shape(cond, int(it.conditional)):
    ex = parser(cond[i])
    if not hasattr(ex, "images"):
      raise SyntheticEvalError(f"conditional record {cond[i]['key']} was skipped: {ex}")
    items["cond"].append(
      {"scene": scene, "condition": ex.images[0], "cond_type": ex.cond_type, "caption": ex.text}
    )
  return items


# -- the trivial baseline --------------------------------------------------------------------------


def trivial_predictions(cfg, items: dict, image_size: int, scales) -> dict:
  """Predictions without a model, from the first `data.trivial_train` training scenes."""
  n = int(cfg.data.trivial_train)
  seed = int(cfg.data.seed)
  answers: dict[str, Counter] = {t: Counter() for t in QUESTION_TYPES}
  boxes, mean = [], np.zeros((image_size, image_size, 3), np.float64)
  for sid in range(n):
    scene = S.make_scene(seed, sid)
    rng = np.random.default_rng([seed, sid, S.FAMILIES.index("chat")])
    for q, a in S._questions(scene, rng):
      t = question_type(q)
      if t is not None:
        answers[t][a] += 1
    boxes += [S.shape_box(s) for s in scene.shapes]
    mean += S.render(scene, image_size)
  img = np.clip(np.round(mean / max(n, 1)), 0, 255).astype(np.uint8)
  top = {t: (c.most_common(1)[0][0] if c else "") for t, c in answers.items()}
  box = np.mean(boxes, axis=0).tolist()

  def imgs(k):
    return np.repeat(img[None], k, axis=0)

  return {
    "t2i": {s: imgs(len(items["t2i"])) for s in scales},
    "recon": {s: imgs(len(items["recon"])) for s in scales},
    "qa": [top[x["type"]] for x in items["qa"]],
    "ground": [box for _ in items["ground"]],
    "edit": {s: imgs(len(items["edit"])) for s in cfg.edit_scales if s in scales},
    "cond": imgs(len(items["cond"])),
    "router": None,
  }


# -- a release's predictions ---------------------------------------------------------------------


def ground_prompt(item: dict) -> list:
  """The segments of a grounding item's prompt: its caption up to the asked (last) phrase's end,
  earlier phrases followed by their true boxes, as training lays the caption out."""
  from puma_jax import sequence as seq

  return seq.grounding_prompt(item["caption"], item["spans"], item["boxes"][:-1])


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(n, start + size)


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  """Rows padded to `size` with copies of the last, so every batch has one compiled shape."""
  if len(x) < size:
    x = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
  return x


class ReleaseModel:
  """A release behind the pipelines (inference/pipelines.py), batched to `batch_size`."""

  def __init__(self, release_dir: str, cfg, log=print):
    from puma_jax import release as release_lib
    from puma_jax.diffusion import sampler as sampler_lib
    from puma_jax.inference import pipelines

    self.release = release_lib.Release.open(release_dir)
    settings = sampler_lib.SamplerSettings(
      num_steps=int(cfg.steps), guidance_scale=float(cfg.guidance), scheduler=str(cfg.scheduler)
    )
    self.pipe = pipelines.PumaPipeline.from_release(self.release, settings=settings)
    self.cfg, self.bs, self.log = cfg, int(cfg.batch_size), log
    self.seed = int(cfg.seed)

  @property
  def scales(self) -> tuple[str, ...]:
    return self.release.scales

  def _prompt(self, segs, open_image: bool):
    from puma_jax import sequence as seq

    return seq.build_prompt(segs, self.pipe.encode, self.pipe.special, open_image=open_image)

  def _features(self, prompts, images, through: str):
    """Generated features (N, slots, F) and router logits (N, 5) or None, in padded batches."""
    from puma_jax.inference import generation

    feats, logits = [], []
    for a, b in _chunks(len(prompts), self.bs):
      ps = prompts[a:b] + [prompts[b - 1]] * (self.bs - (b - a))
      im = None if images is None else self.pipe.pixels(list(_pad(np.stack(images[a:b]), self.bs)))
      f, lg = generation.generate_features(self.pipe.model, ps, through, images=im)
      feats.append(np.asarray(f)[: b - a])
      logits.append(None if lg is None else np.asarray(lg)[: b - a])
    out = np.concatenate(feats)
    return out, (None if logits[0] is None else np.concatenate(logits))

  def _decode(self, scale: str, feats: np.ndarray, first: int = 0) -> np.ndarray:
    """Example i of a check decodes with seed `seed + first + i`, whatever its batch."""
    out = []
    for a, b in _chunks(len(feats), self.bs):
      seeds = [self.seed + first + i for i in range(a, b)]
      seeds += [seeds[-1]] * (self.bs - len(seeds))
      out.append(self.pipe.decode_features(scale, _pad(feats[a:b], self.bs), seeds)[: b - a])
    return np.concatenate(out)

  def _router(self, kind, logits, cond_types=None):
    from puma_jax.inference import router

    if logits is None:
      return None
    chosen = router.choose(kind, logits)
    default = [router.default_scale(kind, c) for c in (cond_types or [None] * len(chosen))]
    return {"chosen": chosen, "default": default}

  def predict(self, items: dict) -> dict:
    from puma_jax import sequence as seq
    from puma_jax.inference import generation
    from puma_jax.reconstruct import Reconstructor

    scales, out, t = self.scales, {"router": {}}, time.time()
    finest = min(scales, key=pooling.scale_index) if scales else None

    if scales and items["t2i"]:
      prompts = [self._prompt(seq.t2i(x["caption"])[:1], True) for x in items["t2i"]]
      feats, logits = self._features(prompts, None, finest)
      out["t2i"] = {
        s: self._decode(s, np.asarray(generation.scale_slice(feats, s))) for s in scales
      }
      out["router"]["t2i"] = self._router("t2i", logits)
      self.log(f"[synthetic] text_to_image: {len(prompts)} prompts x {len(scales)} scales")

    if scales and items["recon"]:
      clip = self.pipe.model.clip if self.release.has("puma") else None
      if clip is None:
        from puma_jax import checkpoints

        clip = checkpoints.load_module(str(self.release.clip), family="clip-vision")
      out["recon"] = {}
      images = [x["image"] for x in items["recon"]]
      for s in scales:
        rec = Reconstructor(clip, self.pipe.decoder(s), self.pipe.vae, s, self.pipe.settings)
        feats = np.concatenate(
          [np.asarray(rec.features(images[a:b])) for a, b in _chunks(len(images), self.bs)]
        )
        out["recon"][s] = self._decode(s, feats, first=1000)
      self.log(f"[synthetic] reconstruction: {len(images)} images x {len(scales)} scales")

    qa = items["qa"]
    answers = []
    for a, b in _chunks(len(qa), self.bs):
      batch = qa[a:b] + [qa[b - 1]] * (self.bs - (b - a))
      got = self.pipe.chat(
        [x["image"] for x in batch],
        [x["question"] for x in batch],
        max_new_tokens=int(self.cfg.max_new_tokens),
      )
      answers += got[: b - a]
    out["qa"] = answers
    self.log(f"[synthetic] understanding: {len(qa)} questions")

    prompts = [self._prompt(ground_prompt(x), False) for x in items["ground"]]
    boxes = []
    for a, b in _chunks(len(prompts), self.bs):
      ps = prompts[a:b] + [prompts[b - 1]] * (self.bs - (b - a))
      im = np.stack([x["image"] for x in items["ground"][a:b]])
      boxes += self.pipe.answer_boxes(ps, list(_pad(im, self.bs)))[: b - a]
    out["ground"] = boxes
    self.log(f"[synthetic] grounding: {len(prompts)} phrases")

    edit_scales = [s for s in self.cfg.edit_scales if s in scales]
    if edit_scales and items["edit"]:
      prompts = [self._prompt(seq.edit(x["instruction"])[:2], True) for x in items["edit"]]
      through = min(edit_scales, key=pooling.scale_index)
      feats, logits = self._features(prompts, [x["image"] for x in items["edit"]], through)
      out["edit"] = {
        s: self._decode(s, np.asarray(generation.scale_slice(feats, s)), first=2000)
        for s in edit_scales
      }
      out["router"]["edit"] = self._router("edit", logits)
      self.log(f"[synthetic] editing: {len(prompts)} edits x {len(edit_scales)} scales")

    if scales and items["cond"]:
      from puma_jax.inference import router

      cond = items["cond"]
      types = [x["cond_type"] for x in cond]
      want = [router.default_scale("conditional", c) for c in types]
      # A release without the default decoder decodes at its nearest scale.
      use = [
        min(scales, key=lambda s, w=w: abs(pooling.scale_index(s) - pooling.scale_index(w)))
        for w in want
      ]
      prompts = [
        self._prompt(seq.conditional(x["cond_type"], x["caption"])[:2], True) for x in cond
      ]
      through = min(use, key=pooling.scale_index)
      feats, logits = self._features(prompts, [x["condition"] for x in cond], through)
      images = [None] * len(cond)
      for s in sorted(set(use), key=pooling.scale_index):
        idx = [i for i, u in enumerate(use) if u == s]
        dec = self._decode(s, np.asarray(generation.scale_slice(feats[idx], s)), first=3000)
        for j, i in enumerate(idx):
          images[i] = dec[j]
      out["cond"] = np.stack(images)
      out["cond_scales"] = use
      out["router"]["conditional"] = self._router("conditional", logits, types)
      self.log(f"[synthetic] conditional: {len(cond)} condition images")
    self.log(f"[synthetic] {self.release.root}: predictions in {time.time() - t:.1f}s")
    return out


# -- scoring -------------------------------------------------------------------------------------


def _pct(values) -> float | None:
  v = [float(x) for x in values if x is not None]
  return 100.0 * float(np.mean(v)) if v else None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of two uint8 images on [0, 1] (evaluation.metrics.psnr)."""
  import jax.numpy as jnp

  from puma_jax.evaluation import metrics

  x = jnp.asarray(a, jnp.float32)[None] / 255.0
  y = jnp.asarray(b, jnp.float32)[None] / 255.0
  return float(metrics.psnr(x, y)[0])


def score(pred: dict, items: dict) -> dict[str, float | None]:
  """Metric -> value (percentages, dB, IoU) for one column's predictions."""
  m: dict[str, float | None] = {}
  for s, imgs in sorted(pred.get("t2i", {}).items(), key=lambda kv: pooling.scale_index(kv[0])):
    checks = [C.check_single(img, x["scene"]) for img, x in zip(imgs, items["t2i"])]
    for k in ("colour", "cell", "size", "background"):
      m[f"t2i/{s}/{k}"] = _pct(c[k] for c in checks)
  for s, imgs in sorted(pred.get("recon", {}).items(), key=lambda kv: pooling.scale_index(kv[0])):
    m[f"reconstruction/{s}/psnr"] = float(
      np.mean([psnr(img, x["image"]) for img, x in zip(imgs, items["recon"])])
    )
    single = [
      C.check_single(img, x["scene"])
      for img, x in zip(imgs, items["recon"])
      if len(x["scene"].shapes) == 1
    ]
    for k in ("colour", "cell"):
      m[f"reconstruction/{s}/{k}"] = _pct(c[k] for c in single)
  if "qa" in pred:
    right = [scoring.short_answer_score(p, x["answer"]) for p, x in zip(pred["qa"], items["qa"])]
    for t in QUESTION_TYPES:
      m[f"understanding/{t}"] = _pct(r for r, x in zip(right, items["qa"]) if x["type"] == t)
    m["understanding/all"] = _pct(right)
  if "ground" in pred:
    ious = [
      0.0 if b is None else C.iou(b, x["boxes"][-1])
      for b, x in zip(pred["ground"], items["ground"])
    ]
    m["grounding/iou>0.5"] = _pct(v > 0.5 for v in ious)
    m["grounding/mean_iou"] = float(np.mean(ious)) if ious else None
    m["grounding/answered"] = _pct(b is not None for b in pred["ground"])
  for s, imgs in sorted(pred.get("edit", {}).items(), key=lambda kv: pooling.scale_index(kv[0])):
    checks = [C.check_edit(img, x["source"], x["target"]) for img, x in zip(imgs, items["edit"])]
    for op in C.EDIT_OPS:
      mine = [c for c in checks if c["op"] == op]
      if mine and op != "shape":
        m[f"editing/{s}/{op}/edit"] = _pct(c["edit"] for c in mine)
    m[f"editing/{s}/all/edit"] = _pct(c["edit"] for c in checks)
    m[f"editing/{s}/all/kept"] = _pct(c["kept"] for c in checks)
  if "cond" in pred:
    checks = [C.check_single(img, x["scene"]) for img, x in zip(pred["cond"], items["cond"])]
    for t in sorted({x["cond_type"] for x in items["cond"]}):
      mine = [c for c, x in zip(checks, items["cond"]) if x["cond_type"] == t]
      m[f"conditional/{t}/colour"] = _pct(c["colour"] for c in mine)
      m[f"conditional/{t}/cell"] = _pct(c["cell"] for c in mine)
  for task, r in sorted((pred.get("router") or {}).items()):
    if r is not None:
      m[f"router/{task}/default_share"] = _pct(a == b for a, b in zip(r["chosen"], r["default"]))
  return m


# -- outputs -------------------------------------------------------------------------------------


def _fmt(name: str, v) -> str:
  if v is None:
    return "-"
  return f"{v:.3f}" if name.endswith("mean_iou") else f"{v:.1f}"


def markdown(out: dict) -> str:
  cols = [c for c in COLUMNS if c in out["columns"]]
  lines = [
    f"# synthetic held-out eval of {out['release']}",
    "",
    f"Items: {', '.join(f'{k} {v}' for k, v in out['items'].items())}; sampler "
    f"{out['config']['scheduler']} {out['config']['steps']} steps, guidance "
    f"{out['config']['guidance']}, seed {out['config']['seed']}.",
    "Percentages unless named (psnr: dB, mean_iou: 0..1). trivial: no model (most frequent "
    "training answer per question type, mean training box, mean training image).",
    "Text-to-image, conditional and reconstruction colour/cell use single-shape held-out scenes "
    "(reconstruction PSNR: all); editing is read cell by cell; a change of shape kind is not "
    "checked. Targets (README, the tiny PUMA end to end) are marked pass/short for the trained "
    "release.",
  ]
  if "wall_s" in out:
    lines.append(f"Wall time {out['wall_s']:.0f}s.")
  if "untrained" not in cols:
    lines.append("No untrained release given (config untrained_release): that column is skipped.")
  if not out["router_learned"]:
    lines.append("The release has no learned router: the pipelines use each task's default scale.")
  lines += ["", "| check | " + " | ".join(cols) + " | target | |", "|---" * (len(cols) + 3) + "|"]
  for name in out["order"]:
    row = out["metrics"][name]
    target = TARGETS.get(name)
    mark = ""
    if target is not None and row.get("trained") is not None:
      mark = "pass" if row["trained"] >= target else "short"
    t = f">= {target:g}" if target is not None else ""
    lines.append(
      f"| {name} | " + " | ".join(_fmt(name, row.get(c)) for c in cols) + f" | {t} | {mark} |"
    )
  return "\n".join(lines) + "\n"


def write_grid(path: Path, items: dict, pred: dict, rows: int) -> None:
  """Held-out prompts (rows) x [true scene, f0..f4] (columns), labelled (sample.make_grid)."""
  from puma_jax import sample

  scales = sorted(pred.get("t2i", {}), key=pooling.scale_index)
  grid_rows = []
  for i, x in enumerate(items["t2i"][:rows]):
    cells = {"scene": S.render(x["scene"], pred["t2i"][scales[0]].shape[1])} if scales else {}
    cells.update({s: pred["t2i"][s][i] for s in scales})
    grid_rows.append((x["caption"], cells))
  sample.make_grid(grid_rows, ["scene", *scales], cell=96).save(path)


def default_workdir(release: str) -> str:
  """`<release>_eval` beside the release (a trailing slash is ignored)."""
  return str(Path(release).absolute()) + "_eval"


def run(cfg, release: str, workdir: str, log=print) -> dict:
  """Scores `release` (and `cfg.untrained_release`) and writes results.json, results.md and
  grid.png into `workdir`. Returns the results dict."""
  from puma_jax import release as release_lib

  t0 = time.time()
  if not release:
    raise SyntheticEvalError("the synthetic protocol needs a release: pass --release=DIR")
  rel = release_lib.Release.open(release)
  size = rel.image_size or 32
  items = held_out(cfg, size)
  log(
    "[synthetic] held-out items: "
    + ", ".join(f"{k} {len(v)}" for k, v in items.items())
    + f" ({size}x{size} images)"
  )
  if cfg.untrained_release:
    base = release_lib.Release.open(cfg.untrained_release)
    if base.scales != rel.scales:
      raise SyntheticEvalError(
        f"untrained_release {cfg.untrained_release} has scales {list(base.scales)}; the release "
        f"has {list(rel.scales)} (it must have the same architectures)"
      )
  preds = {"trained": ReleaseModel(release, cfg, log).predict(items)}
  if cfg.untrained_release:
    preds["untrained"] = ReleaseModel(cfg.untrained_release, cfg, log).predict(items)
  preds["trivial"] = trivial_predictions(cfg, items, size, rel.scales)
  scored = {k: score(p, items) for k, p in preds.items()}
  order = list(scored["trained"])
  for k in scored.values():
    order += [n for n in k if n not in order]
  metrics = {n: {c: scored[c].get(n) for c in scored} for n in order}
  out = {
    "protocol": "synthetic",
    "release": str(rel.root),
    "untrained_release": str(cfg.untrained_release),
    "columns": list(scored),
    "metrics": metrics,
    "order": order,
    "targets": {
      n: {
        "target": t,
        "trained": metrics.get(n, {}).get("trained"),
        "pass": (metrics.get(n, {}).get("trained") or -1e9) >= t,
      }
      for n, t in TARGETS.items()
    },
    "router_learned": any(v is not None for v in preds["trained"].get("router", {}).values()),
    "items": {k: len(v) for k, v in items.items()},
    "config": json.loads(cfg.to_json()),
  }
  wd = Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  write_grid(wd / "grid.png", items, preds["trained"], int(cfg.grid_rows))
  out["wall_s"] = round(time.time() - t0, 1)
  (wd / "results.json").write_text(json.dumps(out, indent=1, sort_keys=True))
  (wd / "results.md").write_text(markdown(out))
  return out
