"""Multi-granular CLIP features of images: the five PUMA scales.

  python -m puma_jax.features --config=configs/clip.py:tiny [--image=a.png --image=b.jpg]
      [--config.checkpoint=CONVERTED_DIR] [--out=features.npz]

Without --image a built-in synthetic picture is used; without a checkpoint the encoder has
seeded random weights (no pretrained weights can be downloaded here).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from puma_jax import checkpoints, cli, sharding
from puma_jax.models import clip, pooling

_CONFIG = config_flags.DEFINE_config_file("config", "configs/clip.py:tiny", "CLIP config file.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file(s); default: a synthetic image.")
_OUT = flags.DEFINE_string("out", "", "Optional .npz file for the features f0..f4.")


def synthetic_image(size: int = 256, seed: int = 0) -> np.ndarray:
  """A deterministic picture: a coloured disc and square on a gradient (uint8 HWC)."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  img = np.stack([xx, yy, 1 - xx], -1) * 0.5
  cy, cx, r = rng.uniform(0.3, 0.7, 3) * [1, 1, 0.5]
  img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 1, 3)
  y0, x0 = rng.randint(0, size // 2, 2)
  img[y0 : y0 + size // 4, x0 : x0 + size // 4] = rng.uniform(0, 1, 3)
  return (img * 255).astype(np.uint8)


def load_encoder(cfg, mesh=None) -> clip.CLIPVisionModel:
  dtype = jnp.dtype(cfg.dtype)
  if cfg.checkpoint:
    return checkpoints.load_module(cfg.checkpoint, dtype=dtype, mesh=mesh, family="clip-vision")
  model_cfg = clip.CLIPVisionConfig.from_dict(cfg.model.to_dict())
  return sharding.init_sharded(
    lambda: clip.CLIPVisionModel(model_cfg, dtype=dtype, rngs=nnx.Rngs(cfg.seed)), mesh
  )


def load_image_files(paths, max_bytes: int = 256 << 20) -> list:
  """Decoded PIL images of `paths`; a missing, non-regular, oversized, non-image or truncated
  file raises ValueError naming it (decoding is forced here, not at first use)."""
  import io

  from PIL import Image

  from puma_jax import fileio

  out = []
  for p in paths:
    try:
      data = fileio.read_regular(p, max_bytes)
    except OSError as e:
      raise ValueError(f"--image {p}: {e.strerror or e}") from None
    try:
      img = Image.open(io.BytesIO(data))
      img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise ValueError(f"--image {p}: not a readable image ({type(e).__name__}: {e})") from None
    out.append(img)
  return out


def main(argv):
  cfg = _CONFIG.value
  files = load_image_files(_IMAGES.value)  # before the encoder: a bad file fails fast
  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  model = load_encoder(cfg, mesh)
  size = model.config.image_size
  if files:
    images = files
  else:
    images = [synthetic_image(seed=i) for i in range(cfg.batch_size)]
  pixels = clip.preprocess_pil(images, size)
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, pixels):
    return pooling.multi_granular(clip.patch_features(nnx.merge(graphdef, state), pixels))

  with sharding.use_mesh(mesh):
    t0 = time.perf_counter()
    feats = jax.block_until_ready(encode(state, pixels))
    t1 = time.perf_counter()
    feats = jax.block_until_ready(encode(state, pixels))
    t2 = time.perf_counter()
  print(
    f"encoder: {sharding.count_params(model):,} parameters, "
    f"{'converted ' + cfg.checkpoint if cfg.checkpoint else 'random weights'}; "
    f"{len(images)} image(s) at {size}x{size}; mesh {dict(mesh.shape)}"
  )
  for name, f in zip(pooling.SCALE_NAMES, feats):
    f = np.asarray(f, np.float32)
    print(f"  {name}: shape {f.shape}  mean {f.mean():+.4f}  std {f.std():.4f}")
  print(f"first call (compile + run) {t1 - t0:.2f}s, second call {1e3 * (t2 - t1):.1f} ms")
  if _OUT.value:
    np.savez(_OUT.value, **{n: np.asarray(f) for n, f in zip(pooling.SCALE_NAMES, feats)})
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__, expected=(ValueError, OSError)))
