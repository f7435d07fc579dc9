"""Why a tiny PUMA scores what it scores: measurements of the mechanisms behind the synthetic
eval's checks (README, "The tiny PUMA, end to end"; docs/DESIGN.md §5).

    python -m puma_jax.tools.diagnose_demo --workdir=W [--n=24] [--scales=f0,f1]

W is a `train_demo` workdir: its release (W/release: CLIP, decoders, VAE, PumaModel) is read.
Writes W/diagnose/report.md (the tables), report.json (the same figures) and recon.png (rows:
held-out scenes, their VAE round trip, then per scale the reconstruction of each scene and of
its mirror image, then per scale the MLLM's generated and teacher-forced pictures). Every figure
is on held-out single-shape scenes of the synthetic set (`--n` of them) unless it says
otherwise. Sections:

  clip     Do the frozen CLIP's patch tokens say where they are? Shares of their variance that
           is the token's position (mean over images), the image's (mean over tokens), and the
           rest (local content); a token's own grid row read from its feature alone (nearest
           class mean fitted on training scenes; chance 1/16).
  probes   Is what the checks ask in the features? Ridge probes fitted on training scenes: the
           shape's cell from all f0 tokens, its colour from the single f4 token.
  vae      The VAE round trip: PSNR and the eval's colour / cell checks (every decoder's ceiling).
  decoder  Per scale: reconstruction PSNR and colour / cell checks; the mirror test (the drawn
           shape's x against the true x over the scenes and their mirror images); the
           cross-attention at three noise levels (t = 100, 500, 900): normalized entropy (1 =
           uniform), mass on the shape's feature tokens and on the tokens of the query's own
           place, each as a multiple of their share of the tokens (1 = no preference), and how
           much the weights depend on the query (mean total-variation distance of a query's
           weights from the mean query's; 0 = every place reads the same mixture).
  t2i      Per scale, the MLLM's text-to-image from each scene's caption, decoded with the
           same seeds two ways: from the features it generates (fed back slot by slot, as the
           eval does) and from its teacher-forced predictions (the true features as inputs, as
           in training): PSNR, colour / cell checks, and the features' MSE against the scene's
           own (next to their variance over the scenes). Rows of recon.png after the scales.
  mllm     Colour questions ("What colour is the {shape} at the {place}?"): forced choice over
           the colours (the answer "It is C." of highest log-probability; the background's
           colour excluded) and where the position that predicts the colour looks,
           per layer: attention mass on the image's slots by scale and, within f0, on the shape's
           slots as a multiple of their share.
  describe "Describe the image." answered greedily for every scene: exact matches with the
           scene's own description, the shape's colour and the background named right, and
           how many distinct answers there are, overall and at most among scenes of one
           background (1 there: the answer depends on nothing but the background).

Sampling: DDPM, 25 steps, guidance 2.0 (`--steps`, `--guidance`), seeds 1000 + i.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import flags

NOISE_LEVELS = (100, 500, 900)  # timesteps at which cross-attention is measured
PROBE_TRAIN = 400  # training scenes the probes and the row means are fitted on
BATCH = 16  # MLLM rows per forward pass in the t2i and MLLM sections
GRID = 16  # the CLIP patch grid (configs/clip.py:tiny, like ViT-L/14 at 224)


# -- statistics (pure NumPy; tests/test_diagnose_demo.py) ---------------------------------------


def variance_shares(tokens: np.ndarray) -> dict[str, float]:
  """(B, T, D) tokens -> shares of their variance that are position (the mean over images of
  each token index), image (the mean over tokens of each image) and local (the rest)."""
  x = tokens - tokens.mean((0, 1))
  pos, img = x.mean(0), x.mean(1)
  local = x - pos[None] - img[:, None]
  total = float((x**2).sum(-1).mean())
  share = lambda a: float((a**2).sum(-1).mean()) / total
  return {"position": share(pos), "image": share(img), "local": share(local)}


def own_row_accuracy(train: np.ndarray, test: np.ndarray, grid: int = GRID) -> float:
  """Tokens (B, grid*grid, D): how often a test token's nearest row mean (fitted on `train`)
  is its own grid row."""
  rows = np.arange(train.shape[1]) // grid
  means = np.stack([train[:, rows == r].mean((0, 1)) for r in range(grid)])
  d = ((test[:, :, None, :] - means[None, None]) ** 2).sum(-1)
  return float((d.argmin(-1) == rows[None]).mean())


def ridge_probe(xtr, ytr, xte, yte, num_classes: int, lam: float = 1e-2) -> float:
  """Held-out accuracy of a one-vs-rest ridge classifier on standardized features (dual form:
  features may outnumber examples)."""
  xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
  a, b = (xtr - mu) / sd, (xte - mu) / sd
  y = np.eye(num_classes)[ytr] * 2 - 1
  k = a @ a.T
  alpha = np.linalg.solve(k + lam * np.trace(k) / len(k) * np.eye(len(k)), y)
  return float(((b @ a.T @ alpha).argmax(-1) == yte).mean())


def region_masks(q_grid: int, k_grid: int) -> np.ndarray:
  """(q_grid^2, k_grid^2) bool: key token j lies in query place i's region of the image."""
  qi, ki = np.arange(q_grid**2), np.arange(k_grid**2)
  qr, qc, kr, kc = qi // q_grid, qi % q_grid, ki // k_grid, ki % k_grid
  return ((kr[None] * q_grid // k_grid) == qr[:, None]) & (
    (kc[None] * q_grid // k_grid) == qc[:, None]
  )


def cross_attention_stats(w: np.ndarray, shape_tokens: np.ndarray) -> dict[str, float]:
  """`w` (B, H, T, S) cross-attention weights of T = q^2 image places over S = k^2 feature
  tokens (square grids), `shape_tokens` (B, S) bool. See the module docstring."""
  _, _, t, s = w.shape
  q, k = int(round(t**0.5)), int(round(s**0.5))
  entropy = -(w * np.log(w + 1e-12)).sum(-1).mean() / np.log(s) if s > 1 else 0.0
  out = {"entropy": float(entropy)}
  if q * q == t and k * k == s and s > 1:
    own = region_masks(q, k) if q <= k else region_masks(k, q).T
    out["own_place_x"] = float((w * own).sum(-1).mean() / (own.sum(1).mean() / s))
  fg = shape_tokens[:, None, None, :].astype(np.float32)
  share = fg.mean(-1)  # (B, 1, 1)
  keep = share[:, 0, 0] > 0
  if keep.any() and s > 1:
    out["shape_tokens_x"] = float(((w * fg).sum(-1) / np.maximum(share, 1e-9))[keep].mean())
  out["query_dependence"] = float(0.5 * np.abs(w - w.mean(2, keepdims=True)).sum(-1).mean())
  return out


def shape_patches(images: np.ndarray, backgrounds, tokens: int) -> np.ndarray:
  """(B, tokens) bool: the feature tokens at `tokens` (a square grid) whose image region is at
  least a quarter shape pixels (the eval's foreground test), or the fullest region."""
  from puma_jax.evaluation import synthetic_checks as C

  b, size = images.shape[0], images.shape[1]
  g = int(round(tokens**0.5))
  fg = np.stack([C.foreground(im, bg) for im, bg in zip(images, backgrounds)]).astype(np.float32)
  f = size // g
  frac = fg.reshape(b, g, f, g, f).mean((2, 4)).reshape(b, -1)
  # a small shape across region borders may fill no region by a quarter: its fullest counts
  return (frac >= np.minimum(0.25, frac.max(-1, keepdims=True))) & (frac > 0)


def x_centroid(img: np.ndarray, background: str) -> float:
  """Mean column of the foreground pixels (NaN if none)."""
  from puma_jax.evaluation import synthetic_checks as C

  ys, xs = np.nonzero(C.foreground(img, background))
  return float(xs.mean()) if len(xs) else float("nan")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Mean per-image PSNR in dB of uint8 image batches (`evaluation.metrics.psnr`, as the eval)."""
  from puma_jax.evaluation import metrics

  return float(np.mean(metrics.psnr(a.astype(np.float32) / 255.0, b.astype(np.float32) / 255.0)))


# -- the held-out scenes --------------------------------------------------------------------------


def single_shape_scenes(split: str, n: int, image_size: int, start: int = 0):
  """(uint8 images (n, S, S, 3), scenes) of the first `n` single-shape scenes of the synthetic
  `pairs` family's `split` (the seeds and sizes of configs/eval/synthetic.py)."""
  from puma_jax.data import synthetic as S

  src = S.SyntheticSource("pairs", split, image_size=image_size)
  images, scenes = [], []
  for i in range(start, len(src)):
    scene = S.make_scene(src.seed, int(src.ids[i]))
    if len(scene.shapes) == 1:
      images.append(src[i]["image"])
      scenes.append(scene)
      if len(images) == n:
        break
  if len(images) < n:
    raise ValueError(f"--n={n}: the {split} split holds only {len(images)} single-shape scenes")
  return np.stack(images), scenes


# -- the sections ---------------------------------------------------------------------------------


def clip_section(clip, train_patches, test_patches) -> dict:
  shares = variance_shares(test_patches)
  return {
    **{f"{k}_share": v for k, v in shares.items()},
    "own_row": own_row_accuracy(train_patches, test_patches),
    "own_row_chance": 1 / GRID,
  }


def probes_section(train_patches, train_scenes, test_patches, test_scenes) -> dict:
  from puma_jax.data import synthetic as S
  from puma_jax.models import pooling

  colours = list(S.COLORS)
  f4 = lambda p: np.asarray(pooling.pool(p, 1))  # the mean of the 16x16 patch tokens
  f0 = lambda p: p  # f0 is the patch grid itself (256 tokens)
  cell = lambda sc: np.array([s.shapes[0].cell for s in sc])
  colour = lambda sc: np.array([colours.index(s.shapes[0].color) for s in sc])
  return {
    "cell_from_f0": ridge_probe(
      f0(train_patches), cell(train_scenes), f0(test_patches), cell(test_scenes), len(S.CELLS)
    ),
    "cell_chance": 1 / len(S.CELLS),
    "colour_from_f4": ridge_probe(
      f4(train_patches), colour(train_scenes), f4(test_patches), colour(test_scenes), len(colours)
    ),
    "colour_chance": 1 / len(colours),
  }


def _checks(out: np.ndarray, images: np.ndarray, scenes) -> dict:
  from puma_jax.evaluation import synthetic_checks as C

  res = [C.check_single(o, sc) for o, sc in zip(out, scenes)]
  return {
    "psnr": psnr(out, images),
    "colour": float(np.mean([r["colour"] for r in res])),
    "cell": float(np.mean([r["cell"] for r in res])),
  }


def vae_section(vae, images, scenes) -> tuple[dict, np.ndarray]:
  import jax.numpy as jnp

  x = jnp.asarray(images.astype(np.float32) / 127.5 - 1)
  mean, _ = vae.encode_moments(x)
  out = np.asarray(jnp.clip((vae.decode(mean) + 1) * 127.5, 0, 255)).round().astype(np.uint8)
  return _checks(out, images, scenes), out


def decoder_section(
  pipe, scale: str, images, scenes, feats, mirror_feats, seed: int
) -> tuple[dict, list]:
  """`feats` / `mirror_feats`: `scale`'s CLIP features of `images` and of their mirror images."""
  import jax
  import jax.numpy as jnp

  from puma_jax.diffusion import schedulers as S
  from puma_jax.models import layers

  tokens = feats.shape[1]
  mirror = images[:, :, ::-1].copy()
  feats, mfeats = jnp.asarray(feats), jnp.asarray(mirror_feats)
  seeds = [seed + i for i in range(len(images))]
  out = pipe.decode_features(scale, np.asarray(feats), seeds)
  mout = pipe.decode_features(scale, np.asarray(mfeats), seeds)
  rec = _checks(out, images, scenes)
  bgs = [sc.background for sc in scenes]
  drawn = [x_centroid(o, bg) for o, bg in zip(list(out) + list(mout), bgs + bgs)]
  true = [x_centroid(o, bg) for o, bg in zip(list(images) + list(mirror), bgs + bgs)]
  ok = np.isfinite(drawn) & np.isfinite(true)
  rec["mirror_x_corr"] = float(np.corrcoef(np.array(drawn)[ok], np.array(true)[ok])[0, 1])
  n = len(images)
  d_out = [abs(a - b) for a, b in zip(drawn[:n], drawn[n:]) if np.isfinite(a) and np.isfinite(b)]
  rec["mirror_dx_drawn"] = float(np.mean(d_out)) if d_out else float("nan")
  rec["mirror_dx_true"] = float(np.mean(np.abs(np.array(true[:n]) - np.array(true[n:]))))

  decoder, vae = pipe.decoder(scale), pipe.vae
  sched = pipe.scheduler_config_for(scale)
  factor = float(vae.config.scaling_factor)
  x0 = vae.encode_moments(jnp.asarray(images.astype(np.float32) / 127.5 - 1))[0] * factor
  fg = shape_patches(images, bgs, tokens)
  attn = {}
  for t in NOISE_LEVELS:
    noise = jax.random.normal(jax.random.key(seed + t), x0.shape)
    ts = jnp.full((n,), t, jnp.int32)
    with layers.capture_attention() as got:
      decoder(S.add_noise(sched, x0, noise, ts), ts, feats)
    blocks = [cross_attention_stats(w, fg) for kind, w in got if kind == "cross"]
    attn[t] = {k: float(np.mean([b[k] for b in blocks if k in b])) for k in blocks[0]}
  rec["cross_attention"] = attn
  return rec, [out, mirror, mout]


def teacher_forced_features(pipe, scale: str, captions, images) -> np.ndarray:
  """(n, tokens, F): the MLLM's predictions of `scale`'s slots for the t2i rows `caption` ->
  `image`, teacher forced (one pass with the image's true features as inputs, as in training:
  each slot predicted from the true slots before it)."""

  from puma_jax import sequence as seq
  from puma_jax.data import rows
  from puma_jax.models import pooling, puma

  model = pipe.model
  k = pooling.scale_index(scale)
  enc = rows.MLLMEncoder(pipe.encode, pipe.special, 1024, 1, model.config.clip.image_size)
  slot_scale, slot_pos = np.asarray(puma.SLOT_SCALE), np.asarray(puma.SLOT_POS)
  batch_rows = []
  for cap, img in zip(captions, images):
    built = seq.build(seq.t2i(cap), pipe.encode, pipe.special, "t2i", num_images=1)
    batch_rows.append(enc.row([rows.Encoded(built, [img], "diagnose", cap)], 1))
  out = []
  for i in range(0, len(batch_rows), BATCH):  # padded rows of one length: one pass per BATCH
    part = batch_rows[i : i + BATCH]
    preds = np.asarray(model(_stack(part), logits=False)["feature_pred"])
    for row, pred in zip(part, preds):
      idx, tok = np.asarray(row["image_index"]), np.asarray(row["image_token"])
      # position p predicts the slot at p + 1
      at = np.array(
        [p for p in range(len(idx) - 1) if idx[p + 1] >= 0 and slot_scale[tok[p + 1]] == k]
      )
      out.append(pred[at[np.argsort(slot_pos[tok[at + 1]])]])
  return np.stack(out)


def t2i_section(pipe, scale: str, images, scenes, true_feats, seed: int) -> tuple[dict, list]:
  """Text-to-image at `scale` from each scene's caption, two ways: the MLLM generating its own
  features (what the eval scores: the head's prediction fed back slot by slot) and teacher
  forced (`teacher_forced_features`). Same decoder and seeds for both; `true_feats`: the
  scenes' own features at `scale` (their decoding is the decoder's reconstruction)."""
  from puma_jax.data import synthetic as S

  captions = [S.caption(sc)[0] for sc in scenes]
  gen = np.asarray(pipe.text_to_image(captions, (scale,), return_features=True)[scale])
  forced = teacher_forced_features(pipe, scale, captions, images)
  seeds = [seed + i for i in range(len(images))]
  true_feats = np.asarray(true_feats)
  var = float(((true_feats - true_feats.mean(0)) ** 2).mean())
  out, pics = {"feature_variance": var}, []
  for name, f in (("generated", gen), ("teacher_forced", forced)):
    pic = pipe.decode_features(scale, f, seeds)
    out[name] = _checks(pic, images, scenes)
    out[name]["feature_mse"] = float(((f - true_feats) ** 2).mean())
    pics.append(pic)
  return out, pics


def chat_rows(pipe, images, questions, answers) -> list[dict]:
  """One unpacked training row (the chat layout) per image, question and answer, as the model
  trains on it; the answer is the supervised text."""
  from puma_jax.data import parse, rows

  size = pipe.model.config.clip.image_size
  enc = rows.MLLMEncoder(pipe.encode, pipe.special, 1024, 1, size)
  parser = parse.Parser("chat", "chat", parse.ParseOptions())
  out = []
  for b, (img, q, a) in enumerate(zip(images, questions, answers)):
    conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
    out.append(enc(parser({"key": f"d{b}", "image": img, "conversations": conv})))
  return out


def _stack(part: list[dict]) -> dict:
  import jax.numpy as jnp

  from puma_jax.models import clip as clip_lib

  batch = {k: jnp.asarray(np.stack([r[k] for r in part])) for k in part[0]}
  batch.pop("num_images", None)
  batch["images"] = clip_lib.normalize_uint8(batch["images"])
  return batch


def answer_logprobs(model, batch_rows: list[dict]) -> np.ndarray:
  """(rows,): each row's log-likelihood of its supervised text, BATCH rows per jitted pass."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graph, state = nnx.split(model)

  @jax.jit
  def logp(state, batch):
    lp = jax.nn.log_softmax(nnx.merge(graph, state)(batch)["logits"], -1)
    lp = jnp.take_along_axis(lp, batch["text_target"][..., None], -1)[..., 0]
    return (lp * batch["text_mask"]).sum(-1)

  out = []
  for i in range(0, len(batch_rows), BATCH):  # one compiled shape: the last chunk padded
    part = batch_rows[i : i + BATCH]
    out.append(np.asarray(logp(state, _stack(part + part[-1:] * (BATCH - len(part))))))
  return np.concatenate(out)[: len(batch_rows)]


def forced_choice(pipe, images, question, answer, candidates, truth) -> float:
  """Share of images whose true candidate has the highest log-likelihood. `question(i)`: the
  question about image i; `answer(c)`: the answer naming candidate c; `candidates(i)`: the
  candidates for image i; `truth(i)`: the right one."""
  qs, ans, owner = [], [], []
  for i in range(len(images)):
    for c in candidates(i):
      qs.append(question(i))
      ans.append(answer(c))
      owner.append((i, c))
  lp = answer_logprobs(pipe.model, chat_rows(pipe, [images[i] for i, _ in owner], qs, ans))
  best: dict[int, tuple[float, str]] = {}
  for (i, c), v in zip(owner, lp):
    if i not in best or v > best[i][0]:
      best[i] = (float(v), c)
  return float(np.mean([best[i][1] == truth(i) for i in range(len(images))]))


def colour_question(scene) -> str:
  """The held-out colour question about a scene's (first) shape, as the chat data asks it."""
  from puma_jax.data import synthetic as S

  s = scene.shapes[0]
  return f"What colour is the {s.kind} at the {S.CELLS[s.cell]}?"


def mllm_section(pipe, images, scenes) -> dict:
  """The MLLM's answer to "What colour is the <shape> at the <cell>?" by forced choice (the
  candidate answer "It is <colour>." of highest log-likelihood, the background's colour left
  out), and where the position predicting the colour's first token looks: its attention mass
  on each scale's slots and, within f0, on the shape's slots relative to their share."""
  from puma_jax.data import synthetic as S
  from puma_jax.models import layers, pooling, puma

  model = pipe.model
  lead = pipe.encode("It is ")
  fg = shape_patches(images, [sc.background for sc in scenes], 256)
  slot_scale, slot_pos = np.asarray(puma.SLOT_SCALE), np.asarray(puma.SLOT_POS)
  cands = [[c for c in S.COLORS if c != sc.background] for sc in scenes]
  hit = forced_choice(
    pipe,
    images,
    lambda i: colour_question(scenes[i]),
    lambda c: f"It is {c}.",
    lambda i: cands[i],
    lambda i: scenes[i].shapes[0].color,
  )
  chance = float(np.mean([1 / len(c) for c in cands]))

  # Attention at the answer position: causal, so any candidate's row shows it.
  firsts = chat_rows(
    pipe, images, [colour_question(sc) for sc in scenes], ["It is red."] * len(scenes)
  )
  layers_stats = []
  for i in range(0, len(firsts), BATCH):
    part = firsts[i : i + BATCH]
    with layers.capture_attention() as got:  # eager: the weights are recorded
      model(_stack(part), logits=False)
    for j, row in enumerate(part):
      b = i + j
      tok = np.asarray(row["tokens"])
      starts = [p for p in range(len(tok) - len(lead)) if list(tok[p : p + len(lead)]) == lead]
      answer_at = starts[-1] + len(lead) - 1  # predicts the colour word's first byte
      img_at = np.nonzero(np.asarray(row["image_index"]) >= 0)[0]
      slot = np.asarray(row["image_token"])[img_at]
      scale_of, pos_of = slot_scale[slot], slot_pos[slot]
      f0 = scale_of == 0
      share = fg[b][pos_of[f0]].mean()
      per_layer = []
      for _, w in got:
        a = w[j, :, answer_at][:, img_at].mean(0)  # (image slots,), mean over heads
        by = [float(a[scale_of == k].sum()) for k in range(len(pooling.SCALE_TOKENS))]
        within = a[f0][fg[b][pos_of[f0]]].sum() / max(a[f0].sum(), 1e-12)
        per_layer.append(by + [within / share if share > 0 else float("nan")])
      layers_stats.append(per_layer)
  st = np.nanmean(np.array(layers_stats), 0)
  return {
    "colour_forced_choice": hit,
    "chance": chance,
    "answer_attention": [
      {
        "image_mass": float(v[:-1].sum()),
        "by_scale": [float(x) for x in v[:-1]],
        "f0_shape_slots_x": float(v[-1]),
      }
      for v in st
    ],
  }


def describe_section(pipe, scenes, images, max_new_tokens: int = 96) -> dict:
  from puma_jax.data import synthetic as S

  answers = [
    a.strip()
    for a in pipe.chat(list(images), ["Describe the image."] * len(scenes), max_new_tokens)
  ]
  truth = [S.description(sc) for sc in scenes]

  def first_colour(text: str) -> str | None:
    words = [w.strip(".,").lower() for w in text.split()]
    return next((w for w in words if w in S.COLORS), None)

  by_bg: dict[str, set] = {}
  for a, sc in zip(answers, scenes):
    by_bg.setdefault(sc.background, set()).add(a)
  return {
    "exact": float(np.mean([a == t for a, t in zip(answers, truth)])),
    "shape_colour": float(
      np.mean([first_colour(a) == sc.shapes[0].color for a, sc in zip(answers, scenes)])
    ),
    "background": float(
      np.mean([f"on a {sc.background} background" in a for a, sc in zip(answers, scenes)])
    ),
    "distinct": len(set(answers)),
    "distinct_within_background_max": max(len(v) for v in by_bg.values()),
    "backgrounds": len(by_bg),
    "examples": [{"true": t, "answer": a} for t, a in list(zip(truth, answers))[:4]],
  }


# -- the report -----------------------------------------------------------------------------------


def _pct(x: float) -> str:
  return f"{100 * x:.0f}%"


def markdown(r: dict) -> str:
  c, p, v = r["clip"], r["probes"], r["vae"]
  lines = [
    f"# Diagnosis of {r['release']}",
    "",
    f"{r['n']} held-out single-shape scenes; sampler DDPM {r['steps']} steps, guidance "
    f"{r['guidance']}. Definitions: `python -m puma_jax.tools.diagnose_demo --help`.",
    "",
    "## CLIP patch tokens",
    f"- variance shares: position {_pct(c['position_share'])}, image-wide "
    f"{_pct(c['image_share'])}, local {_pct(c['local_share'])}",
    f"- a token's own grid row from its feature alone: {_pct(c['own_row'])} "
    f"(chance {_pct(c['own_row_chance'])})",
    "",
    "## Probes (fitted on training scenes)",
    f"- the shape's cell from the f0 tokens: {_pct(p['cell_from_f0'])} (chance "
    f"{_pct(p['cell_chance'])})",
    f"- its colour from the f4 token: {_pct(p['colour_from_f4'])} (chance "
    f"{_pct(p['colour_chance'])})",
    "",
    "## Reconstruction",
    "| | PSNR dB | colour | cell | mirror: x corr | mirror: drawn dx / true dx px |",
    "|---|---|---|---|---|---|",
    f"| VAE | {v['psnr']:.1f} | {_pct(v['colour'])} | {_pct(v['cell'])} | | |",
  ]
  for s, d in r["decoders"].items():
    lines.append(
      f"| {s} | {d['psnr']:.1f} | {_pct(d['colour'])} | {_pct(d['cell'])} | "
      f"{d['mirror_x_corr']:+.2f} | {d['mirror_dx_drawn']:.1f} / {d['mirror_dx_true']:.1f} |"
    )
  lines += [
    "",
    "## Decoder cross-attention",
    "| scale | t | entropy | shape tokens x | own place x | query dependence |",
    "|---|---|---|---|---|---|",
  ]
  for s, d in r["decoders"].items():
    for t, a in d["cross_attention"].items():
      lines.append(
        f"| {s} | {t} | {a['entropy']:.2f} | {a.get('shape_tokens_x', float('nan')):.1f} | "
        f"{a.get('own_place_x', float('nan')):.2f} | {a['query_dependence']:.2f} |"
      )
  lines += [
    "",
    "## MLLM text-to-image (caption -> features -> decoder)",
    "| scale | features | PSNR dB | colour | cell | feature MSE (their variance) |",
    "|---|---|---|---|---|---|",
  ]
  for s, d in r.get("t2i", {}).items():
    for name in ("generated", "teacher_forced"):
      e = d[name]
      lines.append(
        f"| {s} | {name.replace('_', ' ')} | {e['psnr']:.1f} | {_pct(e['colour'])} | "
        f"{_pct(e['cell'])} | {e['feature_mse']:.3f} ({d['feature_variance']:.3f}) |"
      )
  m = r["mllm"]
  lines += [
    "",
    "## MLLM, colour questions",
    f"- forced choice: {_pct(m['colour_forced_choice'])} (chance {_pct(m['chance'])})",
    "",
    "| layer | attention on the image | f0 / f1 / f2 / f3 / f4 | f0 shape slots x |",
    "|---|---|---|---|",
  ]
  for i, a in enumerate(m["answer_attention"]):
    by = " / ".join(f"{x:.3f}" for x in a["by_scale"])
    lines.append(f"| {i} | {a['image_mass']:.2f} | {by} | {a['f0_shape_slots_x']:.2f} |")
  d = r.get("describe")
  if d:
    lines += [
      "",
      "## MLLM, describing the image",
      f"- exact: {_pct(d['exact'])}; the shape's colour named right: {_pct(d['shape_colour'])};"
      f" the background: {_pct(d['background'])}",
      f"- distinct answers: {d['distinct']} over {r['n']} scenes; at most "
      f"{d['distinct_within_background_max']} among the scenes of one background "
      f"({d['backgrounds']} backgrounds)",
      "",
      "| scene | answer |",
      "|---|---|",
    ]
    lines += [f"| {e['true']} | {e['answer']} |" for e in d["examples"]]
  return "\n".join(lines) + "\n"


def write_png(path: Path, images, vae_out, per_scale: dict, t2i: dict | None = None) -> None:
  from PIL import Image

  k = min(len(images), 12)
  rows = [images[:k], vae_out[:k]]
  for out, mirror, mout in per_scale.values():
    rows += [out[:k], mirror[:k], mout[:k]]
  for generated, forced in (t2i or {}).values():
    rows += [generated[:k], forced[:k]]
  grid = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)
  Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def diagnose(
  workdir,
  n: int = 24,
  scales=("f0", "f1"),
  steps: int = 25,
  guidance: float = 2.0,
  out=None,
  log=print,
) -> dict:
  import jax.numpy as jnp

  from puma_jax import release as release_lib
  from puma_jax.diffusion import sampler as sampler_lib
  from puma_jax.inference import pipelines
  from puma_jax.models import clip as clip_lib, pooling

  root = Path(workdir)
  rel_dir = root / "release" if (root / "release").is_dir() else root
  release = release_lib.Release.open(str(rel_dir))
  missing = [s for s in scales if s not in release.scales]
  if missing:
    raise ValueError(f"--scales: {missing} not in the release's scales {list(release.scales)}")
  settings = sampler_lib.SamplerSettings(num_steps=steps, guidance_scale=guidance, scheduler="ddpm")
  pipe = pipelines.PumaPipeline.from_release(release, settings=settings)
  size = pipe.model.config.clip.image_size
  t0 = time.time()
  images, scenes = single_shape_scenes("eval", n, size)
  train_images, train_scenes = single_shape_scenes("train", PROBE_TRAIN, size)
  clip = pipe.model.clip
  train_p = clip_lib.patch_features_uint8(clip, train_images, 32)
  test_p = clip_lib.patch_features_uint8(clip, images, 32)
  r = {"release": str(rel_dir), "n": n, "steps": steps, "guidance": guidance}
  r["clip"] = clip_section(clip, train_p, test_p)
  r["probes"] = probes_section(train_p, train_scenes, test_p, scenes)
  log(f"clip and probes ({time.time() - t0:.0f} s)")
  r["vae"], vae_out = vae_section(pipe.vae, images, scenes)
  r["decoders"], pngs = {}, {}
  mirror_p = clip_lib.patch_features_uint8(clip, images[:, :, ::-1].copy(), 32)
  # each scale's features of the scenes and of their mirror images, pooled once for both sections
  feats, mirror_feats = {}, {}
  for s in scales:
    tokens = pooling.SCALE_TOKENS[pooling.scale_index(s)]
    feats[s] = np.asarray(pooling.pool(jnp.asarray(test_p), tokens))
    mirror_feats[s] = np.asarray(pooling.pool(jnp.asarray(mirror_p), tokens))
  for s in scales:
    r["decoders"][s], pngs[s] = decoder_section(
      pipe, s, images, scenes, feats[s], mirror_feats[s], seed=1000
    )
    log(f"decoder {s} ({time.time() - t0:.0f} s)")
  r["t2i"], t2i_pngs = {}, {}
  for s in scales:
    r["t2i"][s], t2i_pngs[s] = t2i_section(pipe, s, images, scenes, feats[s], seed=1000)
    log(f"t2i {s} ({time.time() - t0:.0f} s)")
  r["mllm"] = mllm_section(pipe, images, scenes)
  r["describe"] = describe_section(pipe, scenes, images)
  log(f"mllm ({time.time() - t0:.0f} s)")
  dst = Path(out) if out else root / "diagnose"
  dst.mkdir(parents=True, exist_ok=True)
  (dst / "report.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
  (dst / "report.md").write_text(markdown(r))
  write_png(dst / "recon.png", images, vae_out, pngs, t2i_pngs)
  log(f"wrote {dst / 'report.md'}, report.json, recon.png")
  return r


FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "train_demo workdir (or a release dir)", flag_values=FLAGS)
flags.DEFINE_integer("n", 24, "held-out single-shape scenes", flag_values=FLAGS)
flags.DEFINE_list("scales", ["f0", "f1"], "decoder scales to measure", flag_values=FLAGS)
flags.DEFINE_integer("steps", 25, "sampler steps", flag_values=FLAGS)
flags.DEFINE_float("guidance", 2.0, "classifier-free guidance", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output folder (default: WORKDIR/diagnose)", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def _main(argv: list[str]) -> None:
  diagnose(FLAGS.workdir, FLAGS.n, tuple(FLAGS.scales), FLAGS.steps, FLAGS.guidance, FLAGS.out)
  print((Path(FLAGS.out) if FLAGS.out else Path(FLAGS.workdir) / "diagnose") / "report.md")


def main(argv: list[str] | None = None) -> int:
  from puma_jax import cli

  argv = sys.argv if argv is None else ["python -m puma_jax.tools.diagnose_demo", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError))


if __name__ == "__main__":
  raise SystemExit(main())
