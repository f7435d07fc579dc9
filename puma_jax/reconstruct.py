"""Image reconstruction through PUMA's multi-granular features: image -> CLIP features at scale
k -> decoder k (CFG DDPM sampling) -> VAE -> image.

  python -m puma_jax.reconstruct --decoder=DIR --clip=DIR --vae=DIR --scale=f0 \
      --image=IN.png --out=OUT.png [--seed=0 --steps=50 --guidance=2.0 --batch=1]

DIRs are converted model directories (`python -m puma_jax.convert {puma-decoder,clip-vision,vae}
...`). `--batch=N` draws N reconstructions of each image in one batch (seeds differ per sample;
sample b of seed s is the same image whatever the batch size); with more than one output image,
files are written as OUT_0.png, OUT_1.png, ... (image-major).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax.diffusion import sampler as SM
from puma_jax.diffusion import schedulers as S
from puma_jax.models import clip as clip_lib
from puma_jax.models import pooling


class Reconstructor:
  """`rec(images, seed)` -> reconstructions (B * samples, H, W, 3) floats in about [-1, 1].

  `images`: PIL images or uint8 HWC arrays. CLIP preprocessing is the public PUMA transform
  (`clip.preprocess_pil`); features are the final-layer patch tokens pooled to `scale`.
  """

  def __init__(self, clip_model: clip_lib.CLIPVisionModel, decoder: nnx.Module, vae: nnx.Module,
               scale: str, settings: SM.SamplerSettings = SM.SamplerSettings(),
               scheduler_config: S.SchedulerConfig | None = None):
    self.scale = scale
    idx = pooling.scale_index(scale)
    self.tokens = pooling.SCALE_TOKENS[idx]
    have = getattr(decoder.config, "num_tokens", None)
    if have is not None and have != self.tokens:
      match = [n for n, t in zip(pooling.SCALE_NAMES, pooling.SCALE_TOKENS) if t == have]
      raise ValueError(f"scale {scale} has {self.tokens} tokens but the decoder was trained for "
                       f"num_tokens={have}" + (f" (scale {match[0]})" if match else ""))
    grid = clip_model.config.grid
    if (grid * grid) % self.tokens or grid % int(round(self.tokens ** 0.5)):
      raise ValueError(f"the CLIP patch grid {grid}x{grid} cannot be pooled to {self.tokens} "
                       f"tokens (scale {scale})")
    self.image_size = clip_model.config.image_size
    self.sampler = SM.DecoderSampler(decoder, vae, settings, scheduler_config)
    cgraph, cstate = nnx.split(clip_model)
    tokens = self.tokens

    @jax.jit
    def features(cstate, pixels):
      patches = clip_lib.patch_features(nnx.merge(cgraph, cstate), pixels)
      return pooling.pool(patches, tokens)

    self._features = lambda pixels: features(cstate, jnp.asarray(pixels))
    self.uncond = clip_lib.black_features(clip_model, tokens)

  def features(self, images: Sequence) -> jax.Array:
    """(B, tokens, D) features of `images` at this scale."""
    return self._features(clip_lib.preprocess_pil(images, self.image_size))

  def __call__(self, images: Sequence, seed: int = 0, samples_per_image: int = 1) -> jax.Array:
    feats = self.features(images)
    feats = jnp.repeat(feats, samples_per_image, axis=0)
    keys = SM.sample_keys(seed, feats.shape[0])
    return self.sampler(feats, self.uncond, keys)


def load(decoder_dir: str, clip_dir: str, vae_dir: str, scale: str,
         settings: SM.SamplerSettings = SM.SamplerSettings(),
         scheduler_config: S.SchedulerConfig | None = None, dtype=jnp.float32) -> Reconstructor:
  from puma_jax import checkpoints
  clip_model = checkpoints.load_module(clip_dir, dtype=dtype, family="clip-vision")
  decoder = checkpoints.load_module(decoder_dir, dtype=dtype, family="puma-decoder")
  vae = checkpoints.load_module(vae_dir, dtype=dtype, family="vae")
  return Reconstructor(clip_model, decoder, vae, scale, settings, scheduler_config)


def output_paths(out: str, n: int) -> list[Path]:
  p = Path(out)
  if n == 1:
    return [p]
  return [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(n)]


def main(argv=None) -> int:
  import argparse
  from PIL import Image
  ap = argparse.ArgumentParser(prog="python -m puma_jax.reconstruct", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--decoder", required=True, help="converted puma-decoder directory")
  ap.add_argument("--clip", required=True, help="converted clip-vision directory")
  ap.add_argument("--vae", required=True, help="converted vae directory")
  ap.add_argument("--scale", default="f0", choices=pooling.SCALE_NAMES)
  ap.add_argument("--image", required=True, action="append", help="input image (repeatable)")
  ap.add_argument("--out", required=True, help="output .png")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--guidance", type=float, default=2.0)
  ap.add_argument("--batch", type=int, default=1, help="reconstructions per input image")
  ap.add_argument("--scheduler", default="ddpm", choices=sorted(S.SCHEDULERS))
  ap.add_argument("--scheduler_config", default="",
                  help="diffusers scheduler_config.json (default: SDXL base's values)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = ap.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    ap.error("--batch and --steps must be >= 1")
  sched_cfg = (S.from_diffusers_config(json.loads(Path(args.scheduler_config).read_text()))
               if args.scheduler_config else None)
  settings = SM.SamplerSettings(num_steps=args.steps, guidance_scale=args.guidance,
                                scheduler=args.scheduler)
  try:
    rec = load(args.decoder, args.clip, args.vae, args.scale, settings, sched_cfg,
               jnp.dtype(args.dtype))
    images = [Image.open(p) for p in args.image]
  except (ValueError, OSError) as e:
    print(f"error: {e}")
    return 2
  t0 = time.perf_counter()
  out = jax.block_until_ready(rec(images, args.seed, args.batch))
  dt = time.perf_counter() - t0
  paths = output_paths(args.out, out.shape[0])
  for path, img in zip(paths, SM.to_uint8(out.astype(jnp.float32))):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
  print(f"scale {args.scale} ({rec.tokens} tokens), {args.steps} {args.scheduler} steps, "
        f"guidance {args.guidance}: {out.shape[0]} image(s) of {out.shape[1]}x{out.shape[2]} "
        f"in {dt:.1f}s (with compilation) -> {', '.join(map(str, paths))}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
