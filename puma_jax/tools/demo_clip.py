"""A stand-in for a pretrained CLIP: the demo's tiny CLIP trained contrastively on the synthetic
captions.

    python -m puma_jax.tools.demo_clip --out=DIR [--steps=400 --batch=128 --seed=0]

PUMA reads images through a pretrained CLIP-L (PUMA paper, section 3.1); none can be downloaded
here, and the demo's CLIP (`random_clip`) has random weights. Measured
(docs/DESIGN.md §11, `benchmarks/readout_probe`): its features hold the shape's colour only in
directions with under 0.5% of their variance, and a reader taught nothing but that colour needs
about 6,000 labelled examples to name it. This trains the same network the way CLIP was trained
(Radford et al., 2021): image and caption embeddings matched by a symmetric InfoNCE loss over
the batch, on the synthetic pairs family's training captions ("a small red circle at the top
left on a white background"). Ours, for the demo:

- the image embedding is the mean of the final patch tokens (post-layernorm, projected), the
  tokens PUMA reads (`clip.patch_features`), rather than the class token, so the loss shapes
  exactly what the MLLM and the decoders see (the class token is never read);
- the vision tower's position embedding stays the fixed 2-D sin-cos code of `random_clip`
  (frozen), so the decoders keep a code of each token's place;
- the text tower is a small `clip_text.CLIPTextModel` over a word vocabulary of the captions
  (the caption grammar has about 30 words); it is dropped after training.

DIR receives the vision tower as a clip-vision module dir (what `init.clip` reads) and
`demo_clip.json`: the losses, and image-to-caption retrieval on held-out pairs (top-1 among
`--batch` held-out captions; chance 1/batch) before and after training.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import flags

PAD, BOS, EOS = 0, 1, 2  # the word vocabulary's special ids; words follow
TEXT_WIDTH = 64  # the text tower's width (the vision tower's: clip.tiny())
EMBED = 64  # the shared embedding's width
WARMUP = 50  # linear warmup steps of the learning rate
RECORD = "demo_clip.json"  # the training record written beside the vision tower (`train`)


def pairs(split: str, image_size: int, num: int | None = None):
  """(uint8 images (n, S, S, 3), captions) of the synthetic pairs family's `split`."""
  from puma_jax.data import synthetic as S

  src = S.SyntheticSource("pairs", split, image_size=image_size)
  n = len(src) if num is None else min(num, len(src))
  images = np.stack([src[i]["image"] for i in range(n)])
  captions = [S.caption(S.make_scene(src.seed, int(src.ids[i])))[0] for i in range(n)]
  return images, captions


def vocabulary(captions: list[str]) -> dict[str, int]:
  words = sorted({w for c in captions for w in c.split()})
  return {w: i + 3 for i, w in enumerate(words)}


def tokenize(captions: list[str], vocab: dict[str, int], length: int) -> np.ndarray:
  """(n, length) int32: BOS, the words, EOS, then PAD. A word outside `vocab` or a caption
  longer than `length` - 2 words is an error naming it."""
  out = np.full((len(captions), length), PAD, np.int32)
  for i, c in enumerate(captions):
    words = c.split()
    unknown = [w for w in words if w not in vocab]
    if unknown:
      raise ValueError(f"caption {c!r}: words {unknown} are not in the vocabulary")
    if len(words) + 2 > length:
      raise ValueError(f"caption {c!r} has {len(words)} words; at most {length - 2} fit")
    out[i, : len(words) + 2] = [BOS, *(vocab[w] for w in words), EOS]
  return out


def _model(vision, vocab_size: int, length: int, seed: int):
  import jax.numpy as jnp
  from flax import nnx

  from puma_jax.models import clip as clip_lib, clip_text

  tcfg = clip_text.CLIPTextConfig(
    vocab_size=vocab_size,
    hidden_size=TEXT_WIDTH,
    intermediate_size=2 * TEXT_WIDTH,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=length,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
    projection_dim=EMBED,
  )

  class Contrastive(nnx.Module):
    def __init__(self, rngs):
      self.vision = vision
      self.text = clip_text.CLIPTextModel(tcfg, rngs=rngs)
      self.vision_proj = nnx.Linear(vision.config.hidden_size, EMBED, use_bias=False, rngs=rngs)
      self.text_proj = nnx.Linear(TEXT_WIDTH, EMBED, use_bias=False, rngs=rngs)
      self.log_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))  # CLIP's init

    def embed(self, pixels, tokens):
      v = self.vision.post_layernorm(clip_lib.patch_features(self.vision, pixels).mean(1))
      t = self.text.pooled(self.text(tokens, (tokens != PAD).astype(jnp.int32)), tokens)
      v, t = self.vision_proj(v), self.text_proj(t)
      norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
      return norm(v), norm(t)

    def logits(self, pixels, tokens):
      v, t = self.embed(pixels, tokens)
      return jnp.exp(jnp.minimum(self.log_scale[...], np.log(100.0))) * v @ t.T  # CLIP's clamp

  return Contrastive(nnx.Rngs(seed))


# The demo CLIP's position code: RMS of each entry (about the patch embedding's). docs/DESIGN.md §5
CLIP_POSITION_RMS = 2.0


def random_clip(seed: int):
  """The demo's shared CLIP, standing in for a pretrained one (none can be downloaded here):
  the tiny CLIP of puma.tiny() with seeded random weights, except its position embedding, a
  fixed 2-D sin-cos code of each patch's place (`layers.grid_position_code`, entry RMS
  `CLIP_POSITION_RMS`; the class token's row zero). Random position embeddings are small beside
  the patch embedding and the random layers mix the tokens: measured, such a CLIP's tokens are
  1% position in variance, and no decoder learned where to draw from them (docs/DESIGN.md §5)."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from puma_jax.models import clip as clip_lib, layers
  from puma_jax.tools import tiny_release

  cfg = clip_lib.tiny()
  model = tiny_release.random_module(lambda: clip_lib.CLIPVisionModel(cfg, rngs=nnx.Rngs(0)), seed)
  grid = cfg.image_size // cfg.patch_size
  code = layers.grid_position_code(grid, grid, cfg.hidden_size, cells=grid)
  code = code * (CLIP_POSITION_RMS * np.sqrt(2.0))  # the code's entries have RMS 1/sqrt(2)
  table = np.concatenate([np.zeros((1, cfg.hidden_size), np.float32), code])
  model.embeddings.position_embedding.embedding[...] = jnp.asarray(table)
  return model


def _frozen(path, value) -> bool:
  """The vision tower's position embedding (the sin-cos place code) is not trained."""
  return path[0] == "vision" and "position_embedding" in path


def train(
  dst: str | Path,
  *,
  seed: int = 0,
  steps: int = 400,
  batch: int = 128,
  lr: float = 2e-3,
  warmup: int = WARMUP,
  log_every: int = 50,
  say=print,
) -> dict:
  """Trains `random_clip(seed)` contrastively and writes its vision tower to `dst`
  (which must not exist yet) with `demo_clip.json`; returns that record."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from puma_jax import checkpoints
  from puma_jax.models import clip as clip_lib

  if steps < 1 or batch < 2 or warmup < 0:
    raise ValueError(f"demo_clip: steps={steps} >= 1, batch={batch} >= 2, warmup={warmup} >= 0")
  dst = Path(dst)
  if dst.exists():
    raise ValueError(f"demo_clip: {dst} already exists; refusing to overwrite it")
  vision = random_clip(seed)
  size = vision.config.image_size
  images, captions = pairs("train", size)
  test_images, test_captions = pairs("eval", size)
  if len(images) < batch or len(test_images) < batch:
    raise ValueError(
      f"demo_clip: batch={batch} exceeds the synthetic pairs ({len(images)} training, "
      f"{len(test_images)} held-out)"
    )
  vocab = vocabulary(captions + test_captions)
  length = max(len(c.split()) for c in captions + test_captions) + 2
  tokens = tokenize(captions, vocab, length)
  test_tokens = tokenize(test_captions, vocab, length)
  model = _model(vision, len(vocab) + 3, length, seed)
  trainable = nnx.All(nnx.Param, nnx.Not(_frozen))
  graphdef, params, rest = nnx.split(model, trainable, ...)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
  tx = optax.adamw(sched, weight_decay=0.05)
  opt_state = tx.init(params)

  def loss_fn(params, pixels, toks):
    lg = nnx.merge(graphdef, params, rest).logits(pixels, toks)
    labels = jnp.arange(lg.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return 0.5 * (ce(lg, labels).mean() + ce(lg.T, labels).mean())

  @jax.jit
  def step(params, opt_state, pixels, toks):
    loss, grads = jax.value_and_grad(loss_fn)(params, pixels, toks)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def top1(params, pixels, toks):
    lg = nnx.merge(graphdef, params, rest).logits(pixels, toks)
    return (jnp.argmax(lg, 1) == jnp.arange(lg.shape[0])).mean()

  def retrieval(params) -> float:
    hits = [
      float(
        top1(
          params, clip_lib.normalize_uint8(test_images[a : a + batch]), test_tokens[a : a + batch]
        )
      )
      for a in range(0, len(test_images) - batch + 1, batch)
    ]
    return float(np.mean(hits))

  record = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "vocab": len(vocab)}
  record["retrieval_before"] = retrieval(params)
  rng = np.random.default_rng(seed)
  t0, losses = time.perf_counter(), []
  for i in range(1, steps + 1):
    idx = rng.choice(len(images), batch, replace=False)
    pixels = clip_lib.normalize_uint8(jnp.asarray(images[idx]))
    params, opt_state, loss = step(params, opt_state, pixels, jnp.asarray(tokens[idx]))
    if i % log_every == 0 or i == steps:
      losses.append((i, float(loss)))
      say(f"[demo_clip] step {i}/{steps} loss {float(loss):.3f} ({time.perf_counter() - t0:.0f}s)")
  record["losses"] = losses
  record["retrieval_after"] = retrieval(params)
  record["seconds"] = round(time.perf_counter() - t0, 1)
  say(
    f"[demo_clip] held-out image->caption top-1 among {batch}: "
    f"{100 * record['retrieval_before']:.1f}% before, {100 * record['retrieval_after']:.1f}% after"
  )
  trained = nnx.merge(graphdef, params, rest).vision
  checkpoints.save_module(
    dst,
    "clip-vision",
    trained.config,
    trained,
    source=f"puma_jax.tools.demo_clip (contrastive on the synthetic captions, seed {seed}, "
    f"{steps} steps of {batch})",
  )
  (dst / RECORD).write_text(json.dumps(record, indent=1) + "\n")
  return record


FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "module dir to write (must not exist)", flag_values=FLAGS)
flags.DEFINE_integer("steps", 400, "optimizer steps", flag_values=FLAGS)
flags.DEFINE_integer(
  "batch", 128, "image-caption pairs per step (the InfoNCE batch)", flag_values=FLAGS
)
flags.DEFINE_float("lr", 2e-3, "peak learning rate (AdamW, cosine decay)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "the random CLIP's seed (random_clip)", flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)


def _main(argv: list[str]) -> None:
  train(FLAGS.out, seed=FLAGS.seed, steps=FLAGS.steps, batch=FLAGS.batch, lr=FLAGS.lr)


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  from puma_jax import cli

  argv = sys.argv if argv is None else ["python -m puma_jax.tools.demo_clip", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError))


if __name__ == "__main__":
  raise SystemExit(main())
