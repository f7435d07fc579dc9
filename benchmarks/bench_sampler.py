"""One full CFG sample (50 DDPM steps, guidance 2.0, then the VAE decode) at a mid-size PUMA
decoder config: jitted JAX (`DecoderSampler`) vs a diffusers eager loop, same weights, same run.

  python -m benchmarks.bench_sampler [--steps=50 --batch=1 --size=mid|small]

Each side runs in its own subprocess so that its peak RSS is its own; the parent builds random
diffusers weights once (UNet + mapping layer, VAE) and converts them for JAX, so both sides run
the same model. Reports wall time (JAX: first call incl. compilation, and a second call) and peak
resident memory, and the ratio JAX / torch of the steady-state times.
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

from absl import flags

from puma_jax import cli

SIZES = {
  # UNet levels, latent size, cross-attention width, feature width, tokens
  "small": dict(
    block_out_channels=(32, 64),
    attention_head_dim=(4, 8),
    sample_size=16,
    ctx=64,
    feat=32,
    tokens=16,
    vae=(32, 32),
  ),
  "mid": dict(
    block_out_channels=(64, 128, 256),
    attention_head_dim=(2, 4, 8),
    sample_size=32,
    ctx=256,
    feat=128,
    tokens=64,
    vae=(32, 64, 64),
  ),
}


def _unet_kwargs(s):
  n = len(s["block_out_channels"])
  down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
  up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
  return dict(
    sample_size=s["sample_size"],
    block_out_channels=s["block_out_channels"],
    layers_per_block=2,
    down_block_types=down,
    up_block_types=up,
    attention_head_dim=s["attention_head_dim"],
    cross_attention_dim=s["ctx"],
    use_linear_projection=True,
    norm_num_groups=32,
  )


def build(tmp: Path, s: dict) -> None:
  import torch
  import diffusers
  from safetensors.torch import load_file, save_file
  from puma_jax import convert

  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**_unet_kwargs(s))
  src = tmp / f"unet_{s['tokens']}"
  unet.save_pretrained(src)
  f = src / "diffusion_pytorch_model.safetensors"
  sd = load_file(str(f))
  lin = torch.nn.Linear(s["feat"], s["ctx"])
  sd["mapping_layer.weight"], sd["mapping_layer.bias"] = lin.weight.detach(), lin.bias.detach()
  save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
  n = len(s["vae"])
  vae = diffusers.AutoencoderKL(
    block_out_channels=s["vae"],
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * n,
    up_block_types=("UpDecoderBlock2D",) * n,
    norm_num_groups=32,
    scaling_factor=0.13025,
  )
  vae.save_pretrained(tmp / "vae")
  convert.convert("puma-decoder", src, tmp / "dec_jax")
  convert.convert("vae", tmp / "vae", tmp / "vae_jax")


def _peak_mib() -> float:
  """This process's peak RSS (VmHWM: per address space, so not inherited from the parent the
  way ru_maxrss is across exec)."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jax(tmp: Path, s: dict, steps: int, batch: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from puma_jax import checkpoints
  from puma_jax.diffusion import sampler as SM

  base = _peak_mib()
  dec = checkpoints.load_module(tmp / "dec_jax", family="puma-decoder")
  vae = checkpoints.load_module(tmp / "vae_jax", family="vae")
  smp = SM.DecoderSampler(dec, vae, SM.SamplerSettings(num_steps=steps))
  rng = np.random.RandomState(0)
  feats = jnp.asarray(rng.randn(batch, s["tokens"], s["feat"]).astype(np.float32))
  unc = jnp.asarray(rng.randn(1, s["tokens"], s["feat"]).astype(np.float32))
  keys = SM.sample_keys(0, batch)
  t0 = time.perf_counter()
  out = jax.block_until_ready(smp(feats, unc, keys))
  t1 = time.perf_counter()
  out = jax.block_until_ready(smp(feats, unc, SM.sample_keys(1, batch)))
  t2 = time.perf_counter()
  return dict(
    first_s=t1 - t0,
    steady_s=t2 - t1,
    peak_rss_mib=_peak_mib(),
    peak_over_imports_mib=_peak_mib() - base,
    shape=list(out.shape),
    device=str(jax.devices()[0].platform),
  )


def run_torch(tmp: Path, s: dict, steps: int, batch: int) -> dict:
  import torch
  import diffusers
  from safetensors.torch import load_file

  base = _peak_mib()
  unet = diffusers.UNet2DConditionModel.from_pretrained(tmp / f"unet_{s['tokens']}").eval()
  sd = load_file(str(tmp / f"unet_{s['tokens']}" / "diffusion_pytorch_model.safetensors"))
  lin = torch.nn.Linear(s["feat"], s["ctx"])
  lin.load_state_dict({"weight": sd["mapping_layer.weight"], "bias": sd["mapping_layer.bias"]})
  vae = diffusers.AutoencoderKL.from_pretrained(tmp / "vae").eval()
  sched = diffusers.DDPMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
  )
  g = torch.Generator().manual_seed(0)
  feats = torch.randn(batch, s["tokens"], s["feat"], generator=g)
  unc = torch.randn(1, s["tokens"], s["feat"], generator=g)

  def sample(n):
    with torch.no_grad():
      cond, uncond = lin(feats), lin(unc).expand(batch, -1, -1)
      ctx = torch.cat([cond, uncond])  # diffusers pipelines batch both CFG branches
      sched.set_timesteps(n)
      x = torch.randn(batch, 4, s["sample_size"], s["sample_size"], generator=g)
      for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
        c, u = eps.chunk(2)
        x = sched.step(u + 2.0 * (c - u), t, x, generator=g).prev_sample
      return vae.decode(x / vae.config.scaling_factor).sample

  sample(1)  # warm-up (one-time allocations, kernel selection)
  t0 = time.perf_counter()
  img = sample(steps)
  t1 = time.perf_counter()
  return dict(
    steady_s=t1 - t0,
    peak_rss_mib=_peak_mib(),
    peak_over_imports_mib=_peak_mib() - base,
    shape=list(img.shape),
    threads=torch.get_num_threads(),
  )


FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "mid", sorted(SIZES), "decoder config size")
flags.DEFINE_integer("steps", 50, "DDPM steps")
flags.DEFINE_integer("batch", 1, "images per sample call")
flags.DEFINE_enum("child", "", ["", "jax", "torch"], "internal: run one side in this process")
flags.DEFINE_string("dir", "", "internal: the parent's weights directory")


def main(argv):
  a = FLAGS
  s = SIZES[a.size]
  if a.child:
    fn = run_jax if a.child == "jax" else run_torch
    print("RESULT " + json.dumps(fn(Path(a.dir), s, a.steps, a.batch)))
    return
  with tempfile.TemporaryDirectory() as d:
    build(Path(d), s)
    res = {}
    for side in ("jax", "torch"):
      cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_sampler",
        f"--child={side}",
        f"--dir={d}",
        f"--size={a.size}",
        f"--steps={a.steps}",
        f"--batch={a.batch}",
      ]
      out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
      line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
      if not line:
        raise SystemExit(f"{side} run failed:\n{out.stderr[-3000:]}")
      res[side] = json.loads(line[0][7:])
  j, t = res["jax"], res["torch"]
  print(
    f"size={a.size} steps={a.steps} batch={a.batch} guidance=2.0 "
    f"(UNet {s['block_out_channels']}, "
    f"latent {s['sample_size']}x{s['sample_size']}, {s['tokens']} tokens)"
  )
  print(
    f"  JAX jit   : first call {j['first_s']:.2f}s (with compile), "
    f"steady {j['steady_s']:.2f}s, "
    f"peak RSS {j['peak_rss_mib']:.0f} MiB (+{j['peak_over_imports_mib']:.0f} after imports)"
  )
  print(
    f"  torch eager: {t['steady_s']:.2f}s, peak RSS {t['peak_rss_mib']:.0f} MiB "
    f"(+{t['peak_over_imports_mib']:.0f} after imports), {t['threads']} threads"
  )
  print(f"  ratio JAX/torch (steady): {j['steady_s'] / t['steady_s']:.2f}x")
  print("RESULTS " + json.dumps(res))


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
