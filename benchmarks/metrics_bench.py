"""Throughput of the metric networks at their real sizes (seeded random weights, no files needed).

  python benchmarks/metrics_bench.py [--batch=8] [--only=lpips,clip,dino,fid] [--dtype=float32]

Reports compile time and steady-state images/s for: LPIPS (AlexNet, 256x256 pairs), CLIP-I
(ViT-B/32, 256x256 -> 224 pairs), CLIP-T (ViT-B/32 image + 77-token text), DINO (ViT-S/16,
256x256 -> 224 pairs) and FID features (Inception-v3, 256x256 -> 299).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from puma_jax import cli  # noqa: E402
from puma_jax.evaluation import fid, metrics  # noqa: E402
from puma_jax.models import clip_text, inception, lpips, vit  # noqa: E402


def random_module(build, seed: int = 0):
  """Real-size module with seeded NumPy weights (jax.random init compiles per shape: slow)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  rs = np.random.RandomState(seed)

  def fill(path, v):
    if len(v.shape) >= 2:
      return (rs.randn(*v.shape) / np.sqrt(np.prod(v.shape[:-1]))).astype(np.float32)
    base = 1.0 if any(k in str(path[-1]) for k in ("scale", "var")) else 0.0
    return np.asarray(base + 0.05 * rs.randn(*v.shape), np.float32)

  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(params)))
  return nnx.merge(graphdef, params, rest)


def bench(name, fn, args, n_images, iters=5):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  dt = (time.perf_counter() - t0) / iters
  print(
    f"{name:10s} first call {compile_s:6.1f}s   {1e3 * dt:8.1f} ms/batch   "
    f"{n_images / dt:8.1f} images/s   out {tuple(np.shape(out))}",
    flush=True,
  )


FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "images per batch")
flags.DEFINE_string("only", "lpips,clip,dino,fid", "metrics to time, comma-separated")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")


def main(argv):
  args = FLAGS
  b, dtype, only = args.batch, jnp.dtype(args.dtype), set(args.only.split(","))
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.uniform(0, 1, (b, 256, 256, 3)).astype(np.float32))
  y = jnp.asarray(rs.uniform(0, 1, (b, 256, 256, 3)).astype(np.float32))
  print(f"devices: {jax.devices()}; batch {b}; compute dtype {dtype}")
  if "lpips" in only:
    s = metrics.LPIPSMetric(random_module(lambda: lpips.LPIPS(dtype=dtype, rngs=nnx.Rngs(0))))
    bench("LPIPS", s, (x, y), b)
  if "clip" in only:
    s = metrics.CLIPScorer(
      random_module(lambda: clip_text.CLIPModel(clip_text.vit_b32(), dtype=dtype, rngs=nnx.Rngs(0)))
    )
    bench("CLIP-I", s._clip_i, (x, y), b)
    ids = jnp.asarray(rs.randint(0, 49406, (b, 77)), jnp.int32).at[:, 20].set(49407)
    bench("CLIP-T", s._clip_t, (x, ids, jnp.ones_like(ids)), b)
  if "dino" in only:
    s = metrics.DINOScorer(
      random_module(lambda: vit.ViTModel(vit.dino_vits16(), dtype=dtype, rngs=nnx.Rngs(0)))
    )
    bench("DINO", s, (x, y), b)
  if "fid" in only:
    s = fid.InceptionFeatures(
      random_module(lambda: inception.FIDInceptionV3(dtype=dtype, rngs=nnx.Rngs(0)))
    )
    bench("FID feats", s, (x,), b)


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
