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
from absl import flags
from flax import nnx

from puma_jax import cli
from puma_jax.diffusion import sampler as SM
from puma_jax.diffusion import schedulers as S
from puma_jax.models import clip as clip_lib
from puma_jax.models import pooling


class Reconstructor:
  """`rec(images, seed)` -> reconstructions (B * samples, H, W, 3) floats in about [-1, 1].

  `images`: PIL images or uint8 HWC arrays. CLIP preprocessing is the public PUMA transform
  (`clip.preprocess_pil`); features are the final-layer patch tokens pooled to `scale`.
  """

  def __init__(
    self,
    clip_model: clip_lib.CLIPVisionModel,
    decoder: nnx.Module,
    vae: nnx.Module,
    scale: str,
    settings: SM.SamplerSettings = SM.SamplerSettings(),
    scheduler_config: S.SchedulerConfig | None = None,
  ):
    self.scale = scale
    idx = pooling.scale_index(scale)
    self.tokens = pooling.SCALE_TOKENS[idx]
    have = getattr(decoder.config, "num_tokens", None)
    if have is not None and have != self.tokens:
      match = [n for n, t in zip(pooling.SCALE_NAMES, pooling.SCALE_TOKENS) if t == have]
      raise ValueError(
        f"scale {scale} has {self.tokens} tokens but the decoder was trained for "
        f"num_tokens={have}" + (f" (scale {match[0]})" if match else "")
      )
    grid = clip_model.config.grid
    if (grid * grid) % self.tokens or grid % int(round(self.tokens**0.5)):
      raise ValueError(
        f"the CLIP patch grid {grid}x{grid} cannot be pooled to {self.tokens} "
        f"tokens (scale {scale})"
      )
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


def load(
  decoder_dir: str,
  clip_dir: str,
  vae_dir: str,
  scale: str,
  settings: SM.SamplerSettings = SM.SamplerSettings(),
  scheduler_config: S.SchedulerConfig | None = None,
  dtype=jnp.float32,
) -> Reconstructor:
  """`scheduler_config`: None for the decoder's own (`sampler.decoder_scheduler_config`); one
  that contradicts it raises (`sampler.resolve_scheduler_config`)."""
  from puma_jax import checkpoints

  scheduler_config = SM.resolve_scheduler_config(
    SM.decoder_scheduler_config(decoder_dir), scheduler_config, f"decoder {decoder_dir}"
  )
  clip_model = checkpoints.load_module(clip_dir, dtype=dtype, family="clip-vision")
  decoder = checkpoints.load_module(decoder_dir, dtype=dtype, family="puma-decoder")
  vae = checkpoints.load_module(vae_dir, dtype=dtype, family="vae")
  return Reconstructor(clip_model, decoder, vae, scale, settings, scheduler_config)


def output_paths(out: str, n: int) -> list[Path]:
  p = Path(out)
  if n == 1:
    return [p]
  return [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(n)]


# Own flag set, so that importing this module (tests, notebooks) defines no global flags.
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "decoder", None, "converted puma-decoder directory", flag_values=FLAGS, required=True
)
flags.DEFINE_string(
  "clip", None, "converted clip-vision directory", flag_values=FLAGS, required=True
)
flags.DEFINE_string("vae", None, "converted vae directory", flag_values=FLAGS, required=True)
flags.DEFINE_enum(
  "scale", "f0", pooling.SCALE_NAMES, "feature scale to reconstruct from", flag_values=FLAGS
)
flags.DEFINE_multi_string(
  "image", None, "input image (repeatable)", flag_values=FLAGS, required=True
)
flags.DEFINE_string("out", None, "output .png", flag_values=FLAGS, required=True)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_integer("steps", 50, "sampler steps", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("guidance", 2.0, "classifier-free guidance scale", flag_values=FLAGS)
flags.DEFINE_integer(
  "batch", 1, "reconstructions per input image", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_enum("scheduler", "ddpm", sorted(S.SCHEDULERS), "sampler", flag_values=FLAGS)
flags.DEFINE_string(
  "scheduler_config",
  "",
  "diffusers scheduler_config.json (default: the one the decoder dir records, else SDXL base's;"
  " its noise levels and prediction type must be the decoder's)",
  flag_values=FLAGS,
)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype", flag_values=FLAGS)


def _main(argv: list[str]) -> int:
  from PIL import Image

  args = FLAGS
  sched_cfg = (
    S.from_diffusers_config(json.loads(Path(args.scheduler_config).read_text()))
    if args.scheduler_config
    else None
  )
  settings = SM.SamplerSettings(
    num_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler
  )
  rec = load(
    args.decoder, args.clip, args.vae, args.scale, settings, sched_cfg, jnp.dtype(args.dtype)
  )
  images = [Image.open(p) for p in args.image]
  t0 = time.perf_counter()
  out = jax.block_until_ready(rec(images, args.seed, args.batch))
  dt = time.perf_counter() - t0
  paths = output_paths(args.out, out.shape[0])
  for path, img in zip(paths, SM.to_uint8(out.astype(jnp.float32))):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
  print(
    f"scale {args.scale} ({rec.tokens} tokens), {args.steps} {args.scheduler} steps, "
    f"guidance {args.guidance}: {out.shape[0]} image(s) of {out.shape[1]}x{out.shape[2]} "
    f"in {dt:.1f}s (with compilation) -> {', '.join(map(str, paths))}"
  )
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  import sys

  argv = sys.argv if argv is None else ["python -m puma_jax.reconstruct", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=(ValueError, OSError))


if __name__ == "__main__":
  raise SystemExit(main())
