"""Data pipeline throughput: examples/s per CPU core for decode + augment + tokenize.

  python benchmarks/bench_data.py [--n=400] [--size=512] [--workers=0]

Stages are timed on the same records one after another (single thread: "per core" is
examples / CPU-second of this process), then the whole grain pipeline (read, parse, mix,
preprocess, encode, batch) on the synthetic set and on a JPEG WebDataset shard written here.
A byte-level tokenizer stands in for the LLaMA tokenizer (pass --hf_tokenizer=DIR to time a
real one). The last line compares one tiny-config batch against a tiny CLIP forward pass.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

from puma_jax import cli  # noqa: E402
from puma_jax.data import config as data_config  # noqa: E402
from puma_jax.data import imaging, parse, pipeline, transforms  # noqa: E402


def cpu_timed(fn, items):
  t0, c0 = time.perf_counter(), time.process_time()
  out = [fn(x) for x in items]
  return out, time.perf_counter() - t0, time.process_time() - c0


def natural_image(rng, h, w):
  """Smooth colour fields plus texture: JPEG sizes like photos, unlike uniform noise."""
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  base = (
    np.stack(
      [
        np.sin(6 * xx + rng.uniform(0, 6)),
        np.cos(5 * yy + rng.uniform(0, 6)),
        np.sin(4 * (xx + yy)),
      ],
      -1,
    )
    * 90
    + 128
  )
  return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def write_shard(path, n, size, rng):
  with tarfile.open(path, "w") as tar:
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(natural_image(rng, size, int(size * 1.33))).save(buf, "JPEG", quality=90)
      for name, data in (
        (f"{i:06d}.jpg", buf.getvalue()),
        (f"{i:06d}.txt", f"a photo number {i} of a scene".encode()),
      ):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 300, "JPEGs to write and time")
flags.DEFINE_integer("size", 512, "short side of the JPEGs")
flags.DEFINE_integer("workers", 0, "grain worker processes")
flags.DEFINE_string("hf_tokenizer", "", "HF tokenizer directory to time instead of bytes")


def main(argv):
  args = FLAGS
  tokenize = lambda s: list(s.encode())  # noqa: E731
  if args.hf_tokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(args.hf_tokenizer)
    tokenize = lambda s: hf.encode(s, add_special_tokens=False)  # noqa: E731
  rng = np.random.default_rng(0)
  tmp = tempfile.mkdtemp()
  shard = os.path.join(tmp, "bench-000.tar")
  write_shard(shard, args.n, args.size, rng)
  from puma_jax.data import sources

  src = sources.WebDatasetSource(shard)
  raws = [src[i] for i in range(len(src))]
  mb = sum(len(r["image"]) for r in raws) / 1e6
  print(
    f"{args.n} JPEGs {args.size}x{int(args.size * 1.33)}, {mb:.1f} MB; "
    f"single thread, CPU seconds of this process"
  )

  rows = []
  decoded, w, c = cpu_timed(lambda r: imaging.decode_image(r["image"]), raws)
  rows.append(("decode JPEG", w, c))
  opt224 = transforms.ImageOptions(clip_size=224)
  opt_dec = transforms.ImageOptions(clip_size=224, vae_size=512, min_resolution=512)
  p = parse.Parser("pairs", "bench")
  exs, w, c = cpu_timed(p, raws)
  rows.append(("decode + parse (pairs)", w, c))
  _, w, c = cpu_timed(transforms.Preprocess(opt224), exs)
  rows.append(("crop + CLIP 224 resize", w, c))
  _, w, c = cpu_timed(transforms.Preprocess(opt_dec), exs)
  rows.append(("crop + CLIP 224 + VAE 512", w, c))
  _, w, c = cpu_timed(lambda e: transforms.tokenize_example(e, tokenize), exs)
  rows.append(("tokenize caption", w, c))
  enc = transforms.ArrayEncoder(opt224, max_images=2)
  pre = [transforms.Preprocess(opt224, tokenize)(e) for e in exs]
  _, w, c = cpu_timed(enc, pre)
  rows.append(("encode to arrays", w, c))
  full = transforms.Preprocess(opt224, tokenize)
  _, w, c = cpu_timed(lambda r: enc(full(p(r))), raws)
  rows.append(("decode+augment+tokenize+encode", w, c))
  for cond in ("canny", "inpaint", "colorize"):
    pc = parse.Parser(
      "conditional", "bench", parse.ParseOptions(cond_types=(cond,), derive_short_side=512)
    )
    _, w, c = cpu_timed(lambda r: full(pc(r)), raws)
    rows.append((f"conditional {cond} (512) end to end", w, c))
  for name, _, c in rows:
    print(f"  {name:38s} {args.n / c:8.1f} ex/s/core   ({1e3 * c / args.n:6.2f} ms CPU/ex)")

  # Whole pipeline, in-process (num_threads=1) unless --workers.
  def run_pipeline(cfg, batches, readers=None):
    cfg.num_threads, cfg.num_workers = 1, args.workers
    it = iter(pipeline.build(cfg, tokenize=tokenize, host_index=0, host_count=1, readers=readers))
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(it)
    return time.perf_counter() - t0, time.process_time() - c0

  print("whole pipeline (grain, batch 16):")
  for preset in ("tiny", "synthetic"):
    cfg = data_config.get_config(preset)
    cfg.batch_size = 16
    w, c = run_pipeline(cfg, 10)
    print(
      f"  synthetic preset {preset:9s} clip {cfg.image.clip_size:3d}: "
      f"{160 / w:7.1f} ex/s wall, {160 / c:7.1f} ex/s/core, {1e3 * w / 10:6.1f} ms/batch"
    )
  cfg = data_config.get_config("synthetic")
  cfg.sources = {"photos": data_config.source("pairs", format="webdataset", paths=shard)}
  cfg.batch_size = 16
  w, c = run_pipeline(cfg, 8)
  print(
    f"  webdataset JPEG {args.size}px -> clip 224:   {128 / w:7.1f} ex/s wall, "
    f"{128 / c:7.1f} ex/s/core, {1e3 * w / 8:6.1f} ms/batch"
  )

  # Does it keep the tiny model fed? Compare with a tiny CLIP forward on the same batch size.
  import jax
  from flax import nnx

  from puma_jax.models import clip

  model = clip.CLIPVisionModel(clip.tiny(), rngs=nnx.Rngs(0))
  gd, st = nnx.split(model)
  f = jax.jit(lambda st, x: nnx.merge(gd, st)(x))
  x = np.zeros((16, 32, 32, 3), np.float32)
  jax.block_until_ready(f(st, x))
  t0 = time.perf_counter()
  for _ in range(10):
    jax.block_until_ready(f(st, x))
  enc_ms = 1e3 * (time.perf_counter() - t0) / 10
  cfg = data_config.get_config("tiny")
  cfg.batch_size = 16
  w, _ = run_pipeline(cfg, 10)
  print(
    f"tiny preset batch 16: data {1e3 * w / 10:.1f} ms/batch vs tiny CLIP forward "
    f"{enc_ms:.1f} ms/batch (the train step adds the LLM forward+backward on top)"
  )


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
