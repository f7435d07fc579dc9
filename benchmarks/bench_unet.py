"""UNet forward: jitted JAX vs diffusers (PyTorch eager) on this CPU, same run.

    python -m benchmarks.bench_unet [--size=64] [--batch=2] [--repeats=5]

A mid-size SDXL-shaped UNet (plain level + two cross-attention levels, head dim 64, no
`text_time`, a 256-token context like PUMA's f0 decoder) with random weights. The parent process
builds the diffusers model once and saves it; each side then runs in its own child process, so
that each one's peak resident memory (ru_maxrss) is its own. Both sides get the same inputs;
the outputs are compared too. Reports median wall time per forward (after one warm-up call,
which for JAX includes compilation) and the JAX / PyTorch ratio.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags

from puma_jax import cli

CONFIG = dict(
  sample_size=64,
  block_out_channels=(128, 256, 512),
  layers_per_block=2,
  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
  transformer_layers_per_block=(1, 2, 2),
  attention_head_dim=(2, 4, 8),
  norm_num_groups=32,
  cross_attention_dim=512,
  use_linear_projection=True,
)


def _inputs(args):
  rng = np.random.default_rng(0)
  return dict(
    sample=rng.standard_normal((args.batch, args.size, args.size, 4), np.float32),
    timesteps=np.full((args.batch,), 501, np.int32),
    context=rng.standard_normal((args.batch, 256, 512), np.float32),
  )


def _time(fn, repeats):
  out = fn()  # warm-up (JAX: compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, float(np.median(times))


def run_torch(args, src):
  import torch
  from diffusers import UNet2DConditionModel

  torch.set_num_threads(os.cpu_count())
  model = UNet2DConditionModel.from_pretrained(src).eval()
  x = _inputs(args)
  s = torch.from_numpy(x["sample"]).permute(0, 3, 1, 2).contiguous()
  t = torch.from_numpy(x["timesteps"]).long()
  c = torch.from_numpy(x["context"])

  def fn():
    with torch.no_grad():
      return model(s, t, encoder_hidden_states=c).sample

  t0 = time.perf_counter()
  out, sec = _time(fn, args.repeats)
  return out.permute(0, 2, 3, 1).numpy(), sec, time.perf_counter() - t0


def run_jax(args, src):
  import jax
  from flax import nnx
  from puma_jax.convert import import_module

  model, _ = import_module("sdxl-unet", src)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, s, t, c: nnx.merge(graphdef, st)(s, t, c))
  x = {k: jax.numpy.asarray(v) for k, v in _inputs(args).items()}
  first = time.perf_counter()
  fwd(state, x["sample"], x["timesteps"], x["context"]).block_until_ready()
  compile_s = time.perf_counter() - first
  out, sec = _time(
    lambda: fwd(state, x["sample"], x["timesteps"], x["context"]).block_until_ready(), args.repeats
  )
  return np.asarray(out), sec, compile_s


def child(args):
  src = Path(args.src)
  out, sec, extra = (run_torch if args.side == "torch" else run_jax)(args, src)
  np.save(src / f"out_{args.side}.npy", out)
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps({"sec": sec, "extra": extra, "peak_mib": peak_mib}))


FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 64, "latent side")
flags.DEFINE_integer("batch", 2, "batch size")
flags.DEFINE_integer("repeats", 5, "timed runs (median reported)")
flags.DEFINE_enum("side", None, ["jax", "torch"], "internal: run one side in this process")
flags.DEFINE_string("src", None, "internal: the parent's diffusers directory")


def main(argv):
  args = FLAGS
  if args.side:
    return child(args)
  import torch
  from diffusers import UNet2DConditionModel

  torch.manual_seed(0)
  model = UNet2DConditionModel(**CONFIG)
  n_params = sum(p.numel() for p in model.parameters())
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    del model
    res = {}
    for side in ("torch", "jax"):
      cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_unet",
        f"--side={side}",
        f"--src={d}",
        f"--size={args.size}",
        f"--batch={args.batch}",
        f"--repeats={args.repeats}",
      ]
      r = subprocess.run(cmd, capture_output=True, text=True, check=True)
      res[side] = json.loads(r.stdout.strip().splitlines()[-1])
    a, b = np.load(Path(d) / "out_jax.npy"), np.load(Path(d) / "out_torch.npy")
    err = float(np.abs(a - b).max() / np.abs(b).max())
  print(
    f"UNet forward, {n_params / 1e6:.1f}M params, batch {args.batch}, latents "
    f"{args.size}x{args.size}, context 256x512, {os.cpu_count()} CPU cores"
  )
  print(
    f"  diffusers eager: {res['torch']['sec']:.3f} s/forward, peak RSS "
    f"{res['torch']['peak_mib']:.0f} MiB"
  )
  print(
    f"  JAX jit:         {res['jax']['sec']:.3f} s/forward, peak RSS "
    f"{res['jax']['peak_mib']:.0f} MiB (first call incl. compile {res['jax']['extra']:.1f} s)"
  )
  print(
    f"  ratio JAX / PyTorch: {res['jax']['sec'] / res['torch']['sec']:.2f}x; "
    f"output rel err {err:.1e}"
  )


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
