"""The paper's four evaluation protocols (docs/DESIGN.md §13), one shape for all:

    ev = EVALUATORS[protocol](config, generator, nets, put)
    ev.run(records) -> {name: value}                      # everything in memory
    items, feats = ev.score(batch)                          # what the sharded runner calls
    ev.aggregate(all_items, all_feats) -> {name: value}     # per-item results -> the table

`score` returns one dict per record, {"id", "values": {metric: float}, ...} or
{"id", "skip": reason, "detail"}; skipped records (missing/unreadable images, mixed sizes where
`data.mixed_sizes="skip"`) are counted under "skipped/<reason>" and left out of every mean.
`put(x)` places an NHWC batch on the mesh (batch over the data axes; padded to a multiple of
their size, the padding dropped again), so the metric networks run data-parallel.

  reconstruction  per scale: PSNR and LPIPS between the input and its reconstruction, both
                  center-cropped and resized to `image_size` (256 for the paper).
  text_to_image   per scale: CLIP-I (generated vs reference), CLIP-T (generated vs caption),
                  LPIPS_d (two seeds), FID (reference vs generated Inception features);
                  "max/*": per-example best over the scales (the paper's 5-scale oracle).
  editing         per scale: CLIP-I (output vs source), CLIP-T (output vs target caption),
                  DINO (output vs source); "max/*" as above.
  understanding   LLaVA-1.5 prompts (`PumaPipeline.chat` adds the paper's system message):
                  short answers (VQAv2/GQA exact match), multiple choice (MMBench letter),
                  yes/no pairs (MME accuracy, accuracy+ and score).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from puma_jax.evaluation import fid as fid_lib
from puma_jax.evaluation import metrics as M
from puma_jax.evaluation import records as R
from puma_jax.evaluation import scoring

# LLaVA-1.5's answer-format suffixes (its eval scripts for MMBench and VQAv2/GQA).
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."


def _idx(records) -> list[int]:
  """Global record positions (sampling keys); `run` without the runner numbers them itself."""
  return [int(r.get("idx", i)) for i, r in enumerate(records)]


def _floats(x) -> np.ndarray:
  return np.asarray(x, np.float32) / 255.0


class Evaluator:
  protocol = ""

  def __init__(self, cfg, generator, nets, put=None):
    self.cfg, self.gen, self.nets = cfg, generator, nets
    self.put = put or (lambda x: (x, x.shape[0]))

  # -- helpers -----------------------------------------------------------------------------------

  def _load(self, records, field, size=None):
    """(kept records, their images, skip items) for the image field `field`."""
    kept, images, skips = [], [], []
    for r in records:
      try:
        images.append(R.load_image(r[field], size, self.cfg.data.mixed_sizes))
        kept.append(r)
      except R.ItemSkip as e:
        skips.append({"id": str(r["id"]), "skip": e.reason, "detail": str(e)})
    return kept, images, skips

  def _pairwise(self, fn, a: np.ndarray, b) -> np.ndarray:
    """`fn(a, b)` on mesh-placed batches; `b` may be a list of strings (kept on the host)."""
    xa, n = self.put(a)
    xb = self.put(b)[0] if isinstance(b, np.ndarray) else list(b) + [b[-1]] * (xa.shape[0] - n)
    return np.asarray(fn(xa, xb), np.float64)[:n]

  def _resized(self, images) -> np.ndarray:
    size = int(self.cfg.image_size)
    return _floats(np.stack([R.load_image(np.asarray(im), size) for im in images]))

  @property
  def scales(self):
    return tuple(self.cfg.scales)

  # -- the interface -----------------------------------------------------------------------------

  def score(self, records) -> tuple[list[dict], dict[str, np.ndarray]]:
    raise NotImplementedError

  def aggregate(self, items, features=None) -> dict[str, float]:
    out: dict[str, float] = {}
    sums, counts = defaultdict(float), Counter()
    for it in items:
      for k, v in it.get("values", {}).items():
        sums[k] += v
        counts[k] += 1
    for k in sorted(sums):
      out[k] = sums[k] / counts[k]
    out["items/scored"] = sum("values" in it for it in items)
    skipped = Counter(it["skip"] for it in items if "skip" in it)
    out["items/skipped"] = sum(skipped.values())
    for reason, n in sorted(skipped.items()):
      out[f"skipped/{reason}"] = n
    return out

  def run(self, records) -> dict[str, float]:
    if not records:
      raise R.EvalDataError(f"{self.protocol}: no records to evaluate")
    items, feats = [], defaultdict(list)
    bs = int(self.cfg.batch_size)
    for i in range(0, len(records), bs):
      it, f = self.score(records[i : i + bs])
      items += it
      for k, v in f.items():
        feats[k].append(v)
    return self.aggregate(items, {k: np.concatenate(v) for k, v in feats.items()})

  def _with_max(self, values: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    if len(self.scales) > 1:
      for name in names:
        values[f"max/{name}"] = np.asarray(
          scoring.best_over_scales({s: values[f"{s}/{name}"] for s in self.scales})
        )
    return values

  @staticmethod
  def _items(records, values: dict[str, np.ndarray]) -> list[dict]:
    return [
      {"id": str(r["id"]), "values": {k: float(v[i]) for k, v in values.items()}}
      for i, r in enumerate(records)
    ]


class ReconstructionEvaluator(Evaluator):
  protocol = "reconstruction"

  def score(self, records):
    kept, images, skips = self._load(records, "image")
    if not kept:
      return skips, {}
    ref = self._resized(images)
    lp = self.nets.lpips()
    values = {}
    for s in self.scales:
      rec = self._resized(self.gen.reconstruct(images, s, int(self.cfg.seed), _idx(kept)))
      values[f"{s}/psnr"] = self._pairwise(M.psnr_checked, rec, ref)
      values[f"{s}/lpips"] = self._pairwise(lp, rec, ref)
    return self._items(kept, values) + skips, {}


class TextToImageEvaluator(Evaluator):
  protocol = "text_to_image"

  def score(self, records):
    kept, refs, skips = self._load(records, "image", int(self.cfg.image_size))
    if not kept:
      return skips, {}
    captions = [r["caption"] for r in kept]
    seed = int(self.cfg.seed)
    first = self.gen.text_to_image(captions, self.scales, seed, _idx(kept))
    second = (
      self.gen.text_to_image(captions, self.scales, seed + 1, _idx(kept))
      if self.cfg.metrics.lpips_d
      else None
    )
    clip = self.nets.clip()
    ref = _floats(np.stack(refs))
    values, feats = {}, {}
    if self.cfg.metrics.fid:
      inc = self.nets.inception()
      feats["real"] = self._pairwise(lambda a, _: inc(a), ref, ref)
    for s in self.scales:
      gen = self._resized(first[s])
      values[f"{s}/clip_i"] = self._pairwise(clip.clip_i, gen, ref)
      values[f"{s}/clip_t"] = self._pairwise(clip.clip_t, gen, captions)
      if second is not None:
        values[f"{s}/lpips_d"] = self._pairwise(
          self.nets.lpips().diversity, gen, self._resized(second[s])
        )
      if self.cfg.metrics.fid:
        feats[f"gen/{s}"] = self._pairwise(lambda a, _: inc(a), gen, gen)
    self._with_max(values, ("clip_i", "clip_t"))
    # Features travel with the item order of `kept`; skips carry none.
    return self._items(kept, values) + skips, feats

  def aggregate(self, items, features=None):
    out = super().aggregate(items)
    if self.cfg.metrics.fid and features and "real" in features:
      real = fid_lib.FeatureStats(features["real"].shape[1]).add(features["real"])
      for s in self.scales:
        gen = fid_lib.FeatureStats(real.dim).add(features[f"gen/{s}"])
        if real.n >= 2:
          out[f"{s}/fid"] = fid_lib.fid_from_stats(real, gen)
    return out


class EditingEvaluator(Evaluator):
  protocol = "editing"

  def score(self, records):
    kept, sources, skips = self._load(records, "source", int(self.cfg.image_size))
    if not kept:
      return skips, {}
    out = self.gen.edit(
      sources, [r["instruction"] for r in kept], self.scales, int(self.cfg.seed), _idx(kept)
    )
    src = _floats(np.stack(sources))
    clip, dino = self.nets.clip(), self.nets.dino()
    values = {}
    for s in self.scales:
      gen = self._resized(out[s])
      values[f"{s}/clip_i"] = self._pairwise(clip.clip_i, gen, src)
      values[f"{s}/clip_t"] = self._pairwise(clip.clip_t, gen, [r["target_caption"] for r in kept])
      values[f"{s}/dino"] = self._pairwise(dino, gen, src)
    self._with_max(values, ("clip_i", "clip_t", "dino"))
    return self._items(kept, values) + skips, {}


def understanding_prompt(record) -> str:
  q = str(record["question"]).strip()
  kind = record["kind"]
  if kind == "choice":
    opts = "\n".join(f"{k}. {v}" for k, v in record["options"].items())
    return f"{q}\n{opts}\n{CHOICE_SUFFIX}"
  if kind == "short":
    return f"{q}\n{SHORT_SUFFIX}"
  if kind == "yes_no":
    return q  # MME questions carry "Please answer yes or no." themselves
  raise R.EvalDataError(
    f"understanding record {record['id']}: kind={kind!r}; choose short, choice or yes_no"
  )


class UnderstandingEvaluator(Evaluator):
  protocol = "understanding"

  def score(self, records):
    prompts = [understanding_prompt(r) for r in records]  # bad kinds fail before generation
    kept, images, skips = self._load(records, "image")
    if not kept:
      return skips, {}
    by_id = dict(zip((str(r["id"]) for r in records), prompts))
    answers = self.gen.chat(
      images, [by_id[str(r["id"])] for r in kept], max_new_tokens=int(self.cfg.max_new_tokens)
    )
    items = []
    for r, a in zip(kept, answers):
      kind = r["kind"]
      if kind == "short":
        v = scoring.short_answer_score(a, r["answer"])
      elif kind == "choice":
        v = scoring.multiple_choice_score(a, r["options"], r["answer"])
      else:
        v = float(scoring.yes_no(a) == scoring.yes_no(r["answer"]))
      it = {"id": str(r["id"]), "values": {f"{kind}/accuracy": 100.0 * v}, "prediction": a}
      if kind == "yes_no":
        it["mme"] = {
          "category": r.get("category", "all"),
          "image_id": r.get("image_id", r["id"]),
          "correct": v,
        }
      items.append(it)
    return items + skips, {}

  def aggregate(self, items, features=None):
    out = super().aggregate(items)
    mme = [it["mme"] for it in items if "mme" in it]
    if mme:
      out.update({f"mme/{k}": v for k, v in scoring.mme_scores(mme).items()})
    return out


EVALUATORS = {
  e.protocol: e
  for e in (ReconstructionEvaluator, TextToImageEvaluator, EditingEvaluator, UnderstandingEvaluator)
}
