"""How many labelled examples does it take to read the shape's colour from the demo CLIP's
features: for a model built for nothing else (`probe`), and for the demo's PumaModel trained on
that one question (`puma`)? README, "The tiny PUMA, end to end". Run by hand (seconds per probe
variant, about 3 minutes per 400 PumaModel steps on a 2-core CPU); CI runs it at toy size.

    python -m benchmarks.readout_probe --workdir=W
    python -m benchmarks.readout_probe --workdir=W --reader=puma --lr=0.002 \
        --set=model.llm.rope_theta=500000

The probe reads the 341 feature slots of an image (f4 first, as the MLLM's sequence holds them)
through what the MLLM puts in front of its LLM: the 2-layer GELU projector, a learned embedding
per slot and an RMS norm; then one attention with a learned query pools the slots and a linear
layer names the colour. It trains with AdamW (warm-up, cosine decay over `--steps`) on batches
of `--batch` single-shape training scenes of the synthetic set and is scored on held-out ones
(chance about 12%). Variants: `--features` as the CLIP gives them (`raw`), minus their mean
over the training images (`centred`), or standardized per channel (`standardized`); each
`--lr`. The CLIP is `--clip` (a converted clip-vision dir), else the demo's
(`train_demo.write_clip`, written to W/parts/clip once).

`puma` trains the PumaModel of `--config` (default configs/pretrain.py:demo, with the `--set`
overrides, its CLIP replaced by `--clip`'s and frozen) with that config's optimizer (parameter
groups, warm-up, decay, clipping; the peak lr of every group set to `--lr`) on chat rows of the
same scenes, "What colour is the {shape} at the {place}?" answered "It is {colour}.", with the
loss on the token that starts the colour word alone (what the probe is taught, nothing else),
and scored on the held-out rows by that token among the candidates' first tokens (blue and
black share theirs, so that pair counts as one answer: 7 or 8 answers, chance about 14%).

Writes W/readout.json and W/readout.md: held-out and training accuracy every `--every` steps,
with the number of labelled examples seen.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from absl import flags

from benchmarks import mllm_learning_curve

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "output directory (created)", flag_values=FLAGS, required=True)
flags.DEFINE_string("clip", "", "clip-vision dir (default: the demo CLIP)", flag_values=FLAGS)
flags.DEFINE_integer("steps", 800, "optimizer steps per variant", flag_values=FLAGS)
flags.DEFINE_integer("every", 200, "steps between scores", flag_values=FLAGS)
flags.DEFINE_integer("batch", 8, "labelled examples per step", flag_values=FLAGS)
flags.DEFINE_integer(
  "num_train", 2000, "training scenes read (single-shape ones kept)", flag_values=FLAGS
)
flags.DEFINE_multi_float("lr", [0.002], "peak learning rates", flag_values=FLAGS)
flags.DEFINE_multi_enum(
  "features", ["raw", "centred"], ["raw", "centred", "standardized"], "variants", flag_values=FLAGS
)
flags.DEFINE_integer("seed", 0, "initialization and batch order", flag_values=FLAGS)
flags.DEFINE_multi_enum("reader", ["probe"], ["probe", "puma"], "what learns", flag_values=FLAGS)
flags.DEFINE_string("config", "configs/pretrain.py:demo", "puma: MLLM config", flag_values=FLAGS)
flags.DEFINE_multi_string("set", [], "puma: config override KEY=VALUE (JSON)", flag_values=FLAGS)

WIDTH = 64  # the demo LLM's hidden size (puma.tiny())


def single_shape(split: str, num: int, size: int):
  """(uint8 images (n, S, S, 3), scenes) of the single-shape scenes among the first `num` of the
  synthetic pairs family's `split`."""
  from puma_jax.data import synthetic as S

  src = S.SyntheticSource("pairs", split, image_size=size)
  images, scenes = [], []
  for i in range(min(num, len(src))):
    scene = S.make_scene(src.seed, int(src.ids[i]))
    if len(scene.shapes) == 1:
      images.append(src[i]["image"])
      scenes.append(scene)
  return np.stack(images), scenes


def colour_ids(scenes) -> np.ndarray:
  from puma_jax.data import synthetic as S

  return np.asarray([list(S.COLORS).index(sc.shapes[0].color) for sc in scenes])


def clip_features(clip, images: np.ndarray) -> np.ndarray:
  """(n, 341, F): the five scales' tokens, f4 first, as the MLLM's sequence holds them."""
  from puma_jax.models import clip as clip_lib, puma

  return np.asarray(puma.scale_features(clip_lib.patch_features_uint8(clip, images)))


def transform(kind: str, xtr: np.ndarray, xte: np.ndarray):
  """The `--features` variant, its statistics from the training features."""
  if kind == "raw":
    return xtr, xte
  flat = xtr.reshape(-1, xtr.shape[-1])
  mean = flat.mean(0)
  std = flat.std(0) if kind == "standardized" else 1.0
  return (xtr - mean) / std, (xte - mean) / std


def train_probe(xtr, ytr, xte, yte, *, lr: float, steps: int, every: int, batch: int, seed: int):
  """[(step, held-out accuracy, training accuracy)] every `every` steps."""
  import jax
  import jax.numpy as jnp
  import optax

  num_classes = int(max(ytr.max(), yte.max())) + 1
  slots, f = xtr.shape[1:]
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  lecun = lambda k, shape: jax.random.normal(k, shape) / np.sqrt(shape[0])
  params = {
    "fc1": lecun(ks[0], (f, WIDTH)),
    "fc2": lecun(ks[1], (WIDTH, WIDTH)),
    "slot": jax.random.normal(ks[2], (slots, WIDTH)) * 0.02,
    "key": lecun(ks[3], (WIDTH, WIDTH)),
    "query": lecun(ks[4], (WIDTH, 1))[:, 0],
    "out": lecun(ks[5], (WIDTH, num_classes)),
  }

  def logits(p, x):
    e = jax.nn.gelu(x @ p["fc1"], approximate=False) @ p["fc2"] + p["slot"]
    e = e * jax.lax.rsqrt((e * e).mean(-1, keepdims=True) + 1e-6)
    w = jax.nn.softmax((e @ p["key"]) @ p["query"] / np.sqrt(WIDTH), axis=-1)
    return jnp.einsum("bs,bsd->bd", w, e) @ p["out"]

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps // 2), steps), 1e-4)
  state = opt.init(params)

  @jax.jit
  def step(p, s, x, y):
    g = jax.grad(loss)(p, x, y)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  acc = jax.jit(lambda p, x, y: (jnp.argmax(logits(p, x), -1) == y).mean())
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(1, steps + 1):
    b = rng.integers(len(ytr), size=batch)
    params, state = step(params, state, jnp.asarray(xtr[b]), jnp.asarray(ytr[b]))
    if i % every == 0:
      rows.append((i, float(acc(params, xte, yte)), float(acc(params, xtr, ytr))))
  return rows


def train_puma(
  train, test, *, clip_dir: str, config: str, overrides: dict, lr, steps, every, batch, seed
):
  """The `puma` reader: [(step, held-out accuracy, training accuracy)] every `every` steps.
  `train` / `test`: (images, scenes)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from puma_jax.data import synthetic as S
  from puma_jax.inference import pipelines
  from puma_jax.tools import diagnose_demo as D, train_demo
  from puma_jax.training import mllm, optim

  groups = train_demo.load_config(config, overrides).optim.lr_groups
  cfg = train_demo.load_config(
    config,
    {
      **overrides,
      "init.clip": clip_dir,
      "optim.total_steps": steps,
      **{f"optim.lr_groups.{g}": lr for g in groups},
    },
  )
  cfg.optim.warmup_steps = min(int(cfg.optim.warmup_steps), steps // 2)
  stage = mllm.MLLMStage(cfg)
  model = stage.build(nnx.Rngs(seed))
  stage.load_pretrained(model)  # the CLIP
  encode, decode, special = stage._tokenizer
  pipe = pipelines.PumaPipeline(model, encode=encode, decode=decode, special=special)
  colours = list(S.COLORS)

  def rows(images, scenes, answers):
    qs = [D.colour_question(sc) for sc in scenes]
    b = D._stack(D.chat_rows(pipe, images, qs, [f"It is {c}." for c in answers]))
    b["image_features"] = model.encode_images(b.pop("images"))
    return b

  # the colour's first token: where two answers that differ only in the colour first differ
  probe = rows(train[0][:1].repeat(len(colours), 0), train[1][:1] * len(colours), colours)
  tgt, mask = np.asarray(probe["text_target"]), np.asarray(probe["text_mask"]).astype(bool)
  sup = [tgt[i][mask[i]] for i in range(len(colours))]
  short = min(len(x) for x in sup)
  at = int(np.argmax((np.stack([x[:short] for x in sup]) != sup[0][:short]).any(0)))
  first_token = {c: int(sup[i][at]) for i, c in enumerate(colours)}

  def data(images, scenes):
    b = rows(images, scenes, [sc.shapes[0].color for sc in scenes])
    mask = np.asarray(b["text_mask"]).astype(bool)
    pos = np.argmax(mask, -1) + at  # the position whose target is the colour's first token
    label = np.asarray([first_token[sc.shapes[0].color] for sc in scenes])
    found = np.take_along_axis(np.asarray(b["text_target"]), pos[:, None], 1)[:, 0]
    if not (found == label).all():
      raise ValueError(
        f"colour token not at answer offset {at} in {int((found != label).sum())} rows"
      )
    length = int(np.asarray(b["segment_ids"] > 0).sum(-1).max())
    keys = ("tokens", "image_index", "image_token", "positions", "segment_ids")
    b = {k: b[k][:, :length] for k in keys} | {"image_features": b["image_features"]}
    allowed = np.zeros((len(scenes), int(cfg.model.llm.vocab_size)), bool)
    for i, sc in enumerate(scenes):
      allowed[i, [first_token[c] for c in colours if c != sc.background]] = True
    return b, jnp.asarray(pos), jnp.asarray(label), jnp.asarray(allowed)

  tr, te = data(*train), data(*test)
  graphdef, params, frozen, rest = optim.split_trainable(model, mllm.MLLMStage.frozen)
  tx, _ = optim.make(cfg.optim, params)
  opt_state = tx.init(params)

  def logits_at(params, b, pos):
    out = nnx.merge(graphdef, frozen, params, rest)(b)["logits"]
    return jnp.take_along_axis(out, pos[:, None, None], 1)[:, 0]

  def loss(params, b, pos, label):
    lp = jax.nn.log_softmax(logits_at(params, b, pos), -1)
    return -jnp.take_along_axis(lp, label[:, None], 1).mean()

  @jax.jit
  def step(params, opt_state, b, pos, label):
    g = jax.grad(loss)(params, b, pos, label)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def hits(params, b, pos, label, allowed):
    lo = jnp.where(allowed, logits_at(params, b, pos), -jnp.inf)
    return jnp.argmax(lo, -1) == label

  def accuracy(params, d, n):
    b, *arrays = d  # arrays: pos, label, allowed
    out = [
      hits(params, {k: v[a : a + 32] for k, v in b.items()}, *(x[a : a + 32] for x in arrays))
      for a in range(0, min(n, len(arrays[1])), 32)
    ]
    return float(np.mean(np.concatenate([np.asarray(o) for o in out])))

  rng = np.random.default_rng(seed)
  n_train = len(tr[2])
  out = []
  for i in range(1, steps + 1):
    idx = rng.integers(n_train, size=batch)
    b = {k: v[idx] for k, v in tr[0].items()}
    params, opt_state = step(params, opt_state, b, tr[1][idx], tr[2][idx])
    if i % every == 0:
      out.append((i, accuracy(params, te, 10**9), accuracy(params, tr, 256)))
  return out


def markdown(result: dict) -> str:
  lines = [
    f"Batch {result['batch']}; {result['num_train']} training / {result['num_eval']} held-out "
    f"single-shape scenes; puma: `{result['config']}` with {json.dumps(result['overrides'])}.",
    "",
    "| reader | features | lr | step | examples seen | held-out | training |",
    "|---|---|---|---|---|---|---|",
  ]
  for run in result["runs"]:
    for step, held, train in run["rows"]:
      lines.append(
        f"| {run['reader']} | {run['features']} | {run['lr']:g} | {step} | "
        f"{step * result['batch']} | {100 * held:.1f}% | {100 * train:.1f}% |"
      )
  return "\n".join(lines) + "\n"


def run(
  workdir,
  *,
  clip_dir: str,
  steps,
  every,
  batch,
  num_train,
  lrs,
  features=("raw", "centred"),
  readers=("probe",),
  config: str = "configs/pretrain.py:demo",
  overrides: dict | None = None,
  seed: int = 0,
  say=print,
) -> dict:
  from puma_jax import checkpoints
  from puma_jax.tools import train_demo

  if steps < 1 or every < 1 or steps % every:
    raise ValueError(f"--steps={steps} must be a positive multiple of --every={every}")
  w = Path(workdir).absolute()
  clip_path = Path(clip_dir) if clip_dir else w / "parts" / "clip"
  if not clip_dir and not clip_path.is_dir():
    train_demo.write_clip(clip_path, 0)
  clip = checkpoints.load_module(clip_path, family="clip-vision")
  size = clip.config.image_size
  train, test = single_shape("train", num_train, size), single_shape("eval", 10**9, size)
  result = {
    "clip": str(clip_path),
    "batch": batch,
    "num_train": len(train[1]),
    "num_eval": len(test[1]),
    "config": config,
    "overrides": overrides or {},
    "runs": [],
  }
  if "probe" in readers:
    xtr, xte = clip_features(clip, train[0]), clip_features(clip, test[0])
    ytr, yte = colour_ids(train[1]), colour_ids(test[1])
    flat = xtr.reshape(-1, xtr.shape[-1])
    result["mean_norm"] = float(np.linalg.norm(flat.mean(0)))
    result["spread"] = float(np.sqrt(((flat - flat.mean(0)) ** 2).sum(-1).mean()))
    say(f"features: mean norm {result['mean_norm']:.2f}, spread {result['spread']:.2f}")
    for kind in features:
      a, b = transform(kind, xtr, xte)
      for lr in lrs:
        rows = train_probe(a, ytr, b, yte, lr=lr, steps=steps, every=every, batch=batch, seed=seed)
        result["runs"].append({"reader": "probe", "features": kind, "lr": lr, "rows": rows})
        say(f"probe {kind} lr {lr:g}: " + ", ".join(f"{s} {100 * h:.0f}%" for s, h, _ in rows))
  if "puma" in readers:
    for lr in lrs:
      rows = train_puma(
        train,
        test,
        clip_dir=str(clip_path),
        config=config,
        overrides=overrides or {},
        lr=lr,
        steps=steps,
        every=every,
        batch=batch,
        seed=seed,
      )
      result["runs"].append({"reader": "puma", "features": "raw", "lr": lr, "rows": rows})
      say(f"puma lr {lr:g}: " + ", ".join(f"{s} {100 * h:.0f}%" for s, h, _ in rows))
  w.mkdir(parents=True, exist_ok=True)
  (w / "readout.json").write_text(json.dumps(result, indent=1))
  (w / "readout.md").write_text(markdown(result))
  return result


def _main(argv: list[str]) -> None:
  run(
    FLAGS.workdir,
    clip_dir=FLAGS.clip,
    steps=FLAGS.steps,
    every=FLAGS.every,
    batch=FLAGS.batch,
    num_train=FLAGS.num_train,
    lrs=FLAGS.lr,
    features=FLAGS.features,
    readers=FLAGS.reader,
    config=FLAGS.config,
    overrides=mllm_learning_curve.parse_overrides(FLAGS.set),
    seed=FLAGS.seed,
  )


def main(argv: list[str] | None = None) -> int:
  from puma_jax import cli

  argv = sys.argv if argv is None else ["python -m benchmarks.readout_probe", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError))


if __name__ == "__main__":
  raise SystemExit(main())
