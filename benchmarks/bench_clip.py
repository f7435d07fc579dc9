"""ViT-L/14 forward: jitted JAX vs PyTorch eager (transformers) on this machine, same run.

  python -m benchmarks.bench_clip [--batches=1,8] [--repeats=5] [--config=vit_l14|tiny]

Both models hold the same random weights (converted through our CLI path in memory). Timings
alternate between the two frameworks so that load from other processes hits both alike; the
median of `repeats` runs is reported, and the ratio JAX / PyTorch (below 1 = JAX faster).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import flags
from flax import nnx

from puma_jax import cli
from puma_jax.convert import import_module
from puma_jax.models import clip


FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "8"], "batch sizes, comma-separated")
flags.DEFINE_integer("repeats", 5, "timed runs per batch size (median reported)")
flags.DEFINE_enum("config", "vit_l14", ["vit_l14", "tiny"], "CLIP config")
flags.DEFINE_integer("threads", os.cpu_count(), "PyTorch threads")


def main(argv):
  args = FLAGS
  torch.set_num_threads(args.threads)
  cfg = getattr(clip, args.config)()
  hf_cfg = transformers.CLIPVisionConfig(**{k: v for k, v in cfg.to_dict().items()})
  torch.manual_seed(0)
  hf = transformers.CLIPVisionModel(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model, _ = import_module("clip-vision", d)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  print(
    f"# {args.config}: {jax.devices()[0].platform}, {os.cpu_count()} cores, "
    f"torch threads {torch.get_num_threads()}, jax {jax.__version__}, "
    f"torch {torch.__version__}"
  )
  print("| batch | JAX jit (ms) | PyTorch eager (ms) | JAX / PyTorch | max rel diff |")
  print("|---|---|---|---|---|")
  for b in map(int, args.batches):
    x = np.random.RandomState(b).randn(b, cfg.image_size, cfg.image_size, 3).astype(np.float32)
    xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yj = fwd(state, xj).block_until_ready()  # compile
    with torch.inference_mode():
      yt = hf(xt).last_hidden_state.numpy()
    tj, tt = [], []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      fwd(state, xj).block_until_ready()
      tj.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      with torch.inference_mode():
        hf(xt)
      tt.append(time.perf_counter() - t0)
    mj, mt = statistics.median(tj) * 1e3, statistics.median(tt) * 1e3
    diff = float(np.abs(np.asarray(yj) - yt).max() / np.abs(yt).max())
    print(f"| {b} | {mj:.1f} | {mt:.1f} | {mj / mt:.2f} | {diff:.1e} |")


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
