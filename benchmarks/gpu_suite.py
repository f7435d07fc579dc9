"""The sections of benchmarks/gpu_suite.sh; each runs in its own process (JAX and PyTorch never
share the GPU's memory) and writes one JSON file; `report` prints them side by side.

  python -m benchmarks.gpu_suite SECTION --out=DIR [--tiny]

Sections:
  mllm           MLLM training step (forward, backward, AdamW) of a LLaMA-3-shaped PumaModel
                 (width 4096, GQA 32/8 heads, SwiGLU 14336, vocab 128256 + 226, CLIP ViT-L/14)
                 with as many layers as fit (LAYERS, default 10, then 8, 6 on out-of-memory),
                 packed rows of the pretraining-like synthetic mix at seq 2048, bfloat16
                 compute; step time and MFU with XLA attention and with cuDNN flash attention.
  decoder_jax    real-size PUMA f0 decoder (SDXL UNet, 256 tokens) training step at 1024x1024:
                 frozen SDXL VAE encode, noise, UNet forward/backward (remat), AdamW; images/s.
  decoder_torch  the same step in diffusers/PyTorch (bf16 autocast, gradient checkpointing).
  sample_jax     50-step CFG sample + VAE decode, 1024x1024, JAX bfloat16; seconds.
  sample_torch   the same in diffusers, float16.
  report         the ratios.
`--tiny`: toy sizes on any device (the CPU smoke test of the suite).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

from puma_jax import cli

TOKENS = 256  # the f0 decoder's feature tokens


def timed(fn, steps: int) -> float:
  """Median seconds of `steps` calls after one compile/warm-up call; fn returns what to wait on."""
  import jax

  jax.block_until_ready(fn())
  out = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return statistics.median(out)


def device_info() -> dict:
  import jax

  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind}


# ----------------------------------------------------------------------------------------------
# MLLM step


def _mllm_config(layers: int, tiny: bool):
  from puma_jax.models import clip as clip_lib, llama, puma
  from puma_jax.tokenizer import ByteTokenizer

  if tiny:
    return puma.tiny()
  s = ByteTokenizer().special
  llm = llama.llama3_8b(
    num_hidden_layers=layers, vocab_size=128256 + 226, scan_layers=True, remat_policy="full"
  )
  return puma.PumaConfig(
    llm=llm,
    clip=clip_lib.vit_l14(),
    img_start_id=s.img_start,
    img_end_id=s.img_end,
    pos0_id=s.pos0,
    pad_id=s.pad,
    router=True,
  )


def _packed_batches(seq_len: int, rows: int, image_size: int, n: int):
  import jax.numpy as jnp
  from puma_jax.data import config as data_config
  from puma_jax.data import pipeline
  from puma_jax.data.rows import MLLMEncoder
  from puma_jax.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  c = data_config.get_config("synthetic")
  for name in ("edit", "conditional"):  # pretraining: pairs, grounding, text, chat
    c.sources[name].weight = 0.0
  c.image.clip_size = image_size
  c.batch_size, c.pack, c.num_threads = rows, True, 4
  enc = MLLMEncoder(tok.encode, tok.special, seq_len, 2, image_size)
  it = iter(pipeline.build(c, encode=enc, host_index=0, host_count=1))
  out = []
  for _ in range(n):
    b = next(it)
    b.pop("num_images")
    out.append({k: jnp.asarray(v) for k, v in b.items()})
  return out, it.metrics()


def _mllm_step_fn(cfg, dtype):
  import jax
  import optax
  from flax import nnx
  from puma_jax.training import losses, mllm
  from puma_jax.models import clip as clip_lib, puma

  model = puma.PumaModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))
  graphdef, frozen, params, rest = nnx.split(model, mllm.MLLMStage.frozen, nnx.Param, ...)
  tx = optax.adamw(1e-5)
  opt = tx.init(params)
  objective = mllm.objective(
    graphdef, frozen, rest, {"text_weight": 0.02, "image_weight": 1.0, "router_weight": 0.1}
  )

  def step(params, opt, batch):
    def loss(p):
      b = dict(batch, images=clip_lib.normalize_uint8(batch["images"]))
      b["_normalizers"] = losses.mllm_normalizers(b)
      return objective(p, b)[0]

    lv, g = jax.value_and_grad(loss)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, lv

  return jax.jit(step, donate_argnums=(0, 1)), params, opt


def _stepper(fn, state: dict, batches: list):
  """A no-argument call running one step on the next batch (state carried in `state`)."""

  def run():
    b = batches[state["i"] % len(batches)]
    state["i"] += 1
    state["p"], state["o"], lv = fn(state["p"], state["o"], b)
    return lv

  return run


def section_mllm(args) -> dict:
  import jax
  import jax.numpy as jnp
  from puma_jax import perf
  from puma_jax.models import layers as L

  tiny = args.tiny
  seq_len, rows = (512, 2) if tiny else (2048, int(os.environ.get("ROWS", "4")))
  dtype = jnp.float32 if tiny else jnp.bfloat16
  want = [int(os.environ.get("LAYERS", "10"))]
  want += [n for n in (8, 6) if n < want[0]]
  dev = jax.devices()[0]
  impls = ["xla"]
  if (
    L.choose_attention(
      jnp.zeros((1, 128, 1, 128), jnp.bfloat16), jnp.zeros((1, 128, 1, 128), jnp.bfloat16)
    )
    == "cudnn"
  ):
    impls.append("cudnn")
  for layers in [2] if tiny else want:
    cfg = _mllm_config(layers, tiny)
    batches, dmetrics = _packed_batches(seq_len, rows, cfg.clip.image_size, 3)
    real = statistics.mean(int((b["segment_ids"] > 0).sum()) for b in batches)
    res = {
      "layers": cfg.llm.num_hidden_layers,
      "seq_len": seq_len,
      "rows": rows,
      "real_token_fraction": real / (rows * seq_len),
      "examples_per_row": dmetrics.get("data/examples_per_row"),
      "flops_per_token": perf.flops_per_token(cfg, seq_len),
    }
    try:
      for impl in impls:
        L.set_attention_impl(impl)
        fn, params, opt = _mllm_step_fn(cfg, dtype)
        run = _stepper(fn, {"p": params, "o": opt, "i": 0}, batches)
        del params, opt  # donated to the step; `run` holds the live state
        t = timed(run, 1 if tiny else 5)
        peak = perf.peak_flops(dev.device_kind, "float32" if tiny else "bfloat16")
        res[impl] = {
          "step_s": t,
          "real_tokens_per_s": real / t,
          "mfu": perf.mfu(res["flops_per_token"], real / t, 1, peak),
        }
        del fn, run
      return res
    except Exception as e:  # noqa: BLE001 - only out-of-memory moves on to fewer layers
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      print(f"mllm: {layers} layers do not fit ({str(e)[:120]}); trying fewer", flush=True)
  raise RuntimeError("mllm: not even 6 layers fit this device")


# ----------------------------------------------------------------------------------------------
# Decoder training and sampling


def _decoder_configs(tiny: bool):
  from puma_jax.models import puma_decoder, vae

  if tiny:
    # two UNet levels, one block each: the graph (hence the CPU compile time) stays small
    small = dict(
      block_out_channels=(32, 64),
      layers_per_block=1,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      transformer_layers_per_block=(1, 1),
      attention_head_dim=(2, 4),
    )
    return puma_decoder.tiny_config(num_tokens=16, **small), vae.tiny_config(), 2
  return (
    puma_decoder.puma_decoder_config(TOKENS),
    vae.sdxl_vae_config(),
    int(os.environ.get("DEC_BATCH", "2")),
  )


def section_decoder_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from puma_jax.diffusion import schedulers as S
  from puma_jax.models import puma_decoder, vae as vae_lib

  dcfg, vcfg, batch = _decoder_configs(args.tiny)
  dtype = jnp.float32 if args.tiny else jnp.bfloat16
  dec = puma_decoder.PumaDecoder(dcfg, dtype=dtype, rngs=nnx.Rngs(0), remat=not args.tiny)
  vae = vae_lib.AutoencoderKL(vcfg, dtype=dtype, rngs=nnx.Rngs(1))
  dg, params = nnx.split(dec)
  vg, vstate = nnx.split(vae)
  tx = optax.adamw(1e-5)
  opt = tx.init(params)
  size = dcfg.unet.sample_size * vcfg.downsample_factor
  r = np.random.RandomState(0)
  images = jnp.asarray(r.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
  feats = jnp.asarray(r.randn(batch, dcfg.num_tokens, dcfg.mapping_dim), jnp.float32)
  sched = S.SchedulerConfig()

  @jax.jit  # data as arguments: closed-over arrays would be constant-folded through the VAE
  def step(params, opt, key, images, feats):
    k1, k2 = jax.random.split(key)
    lat = jax.lax.stop_gradient(
      nnx.merge(vg, vstate).sample_latent(k1, images) * vcfg.scaling_factor
    )
    draw = S.q_sample(sched, k2, lat.astype(jnp.float32), noise_offset=0.1)

    def loss(p):
      pred = nnx.merge(dg, p)(draw.noisy, draw.timesteps, feats, use_pos_embed=1.0)
      return jnp.mean(jnp.square(pred.astype(jnp.float32) - draw.target))

    lv, g = jax.value_and_grad(loss)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, lv

  state = {"p": params, "o": opt, "i": 0}

  def run():
    state["i"] += 1
    state["p"], state["o"], lv = step(
      state["p"], state["o"], jax.random.key(state["i"]), images, feats
    )
    return lv

  t = timed(run, 1 if args.tiny else 5)
  return {"batch": batch, "size": size, "step_s": t, "images_per_s": batch / t}


def _torch_modules(dcfg, vcfg, device, dtype):
  import dataclasses
  import inspect
  import torch
  import diffusers

  if device == "cpu":
    # torch sizes its CPU thread pool by the host's cores, not this process's share of them
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1, 4))

  def kwargs(cls, cfg):
    ok = set(inspect.signature(cls.__init__).parameters)
    return {
      k: (list(v) if isinstance(v, tuple) else v)
      for k, v in dataclasses.asdict(cfg).items()
      if k in ok
    }

  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**kwargs(diffusers.UNet2DConditionModel, dcfg.unet))
  vae = diffusers.AutoencoderKL(**kwargs(diffusers.AutoencoderKL, vcfg))
  lin = torch.nn.Linear(dcfg.mapping_dim, dcfg.mapping_dim1)
  return unet.to(device, dtype), vae.to(device, dtype), lin.to(device, dtype)


def section_decoder_torch(args) -> dict:
  import torch
  import torch.nn.functional as F
  import diffusers

  dcfg, vcfg, batch = _decoder_configs(args.tiny)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  unet, vae, lin = _torch_modules(dcfg, vcfg, dev, torch.float32)
  vae.requires_grad_(False)
  if not args.tiny:
    unet.enable_gradient_checkpointing()
  params = list(unet.parameters()) + list(lin.parameters())
  opt = torch.optim.AdamW(params, lr=1e-5, fused=dev == "cuda")
  sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  size = dcfg.unet.sample_size * vcfg.downsample_factor
  g = torch.Generator(device="cpu").manual_seed(0)
  images = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(dev)
  feats = torch.randn(batch, dcfg.num_tokens, dcfg.mapping_dim, generator=g).to(dev)
  auto = torch.autocast(dev, dtype=torch.bfloat16, enabled=not args.tiny)

  def run():
    with auto:
      with torch.no_grad():
        lat = vae.encode(images).latent_dist.sample() * vcfg.scaling_factor
      noise = torch.randn_like(lat) + 0.1 * torch.randn(
        lat.shape[0], lat.shape[1], 1, 1, device=dev
      )
      t = torch.randint(0, 1000, (batch,), device=dev)
      pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=lin(feats)).sample
      loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev == "cuda":
      torch.cuda.synchronize()
    return None

  run()
  out = []
  for _ in range(1 if args.tiny else 5):
    t0 = time.perf_counter()
    run()
    out.append(time.perf_counter() - t0)
  t = statistics.median(out)
  return {"batch": batch, "size": size, "step_s": t, "images_per_s": batch / t}


def section_sample_jax(args) -> dict:
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from puma_jax.diffusion import sampler as SM
  from puma_jax.models import puma_decoder, vae as vae_lib

  dcfg, vcfg, _ = _decoder_configs(args.tiny)
  steps = 4 if args.tiny else 50
  dtype = jnp.float32 if args.tiny else jnp.bfloat16
  dec = puma_decoder.PumaDecoder(dcfg, dtype=dtype, rngs=nnx.Rngs(0))
  vae = vae_lib.AutoencoderKL(vcfg, dtype=dtype, rngs=nnx.Rngs(1))
  smp = SM.DecoderSampler(dec, vae, SM.SamplerSettings(num_steps=steps))
  f = jnp.asarray(np.random.RandomState(0).randn(1, dcfg.num_tokens, dcfg.mapping_dim), jnp.float32)
  t = timed(lambda: smp(f, f * 0, SM.sample_keys(0, 1)), 1 if args.tiny else 3)
  return {"steps": steps, "seconds": t, "dtype": str(jnp.dtype(dtype))}


def section_sample_torch(args) -> dict:
  import torch
  import diffusers

  dcfg, vcfg, _ = _decoder_configs(args.tiny)
  steps = 4 if args.tiny else 50
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.float16 if dev == "cuda" else torch.float32
  unet, vae, lin = _torch_modules(dcfg, vcfg, dev, dtype)
  sched = diffusers.DDPMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
  )
  s = dcfg.unet.sample_size
  g = torch.Generator(device="cpu").manual_seed(0)
  feats = torch.randn(1, dcfg.num_tokens, dcfg.mapping_dim, generator=g).to(dev, dtype)

  @torch.no_grad()
  def sample():
    ctx = torch.cat([lin(feats), lin(feats * 0)])  # both CFG branches in one batch
    sched.set_timesteps(steps)
    x = torch.randn(1, unet.config.in_channels, s, s, generator=g).to(dev, dtype)
    for t in sched.timesteps:
      eps = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
      c, u = eps.chunk(2)
      x = sched.step(u + 2.0 * (c - u), t, x).prev_sample
    img = vae.decode(x / vcfg.scaling_factor).sample
    if dev == "cuda":
      torch.cuda.synchronize()
    return img

  sample()
  out = []
  for _ in range(1 if args.tiny else 3):
    t0 = time.perf_counter()
    sample()
    out.append(time.perf_counter() - t0)
  return {"steps": steps, "seconds": statistics.median(out), "dtype": str(dtype)}


# ----------------------------------------------------------------------------------------------


def report(out: Path) -> None:
  def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None

  m, dj, dt, sj, st = (
    load(n) for n in ("mllm", "decoder_jax", "decoder_torch", "sample_jax", "sample_torch")
  )
  dev = next((r["device"] for r in (m, dj, sj) if r), {})
  print(f"== gpu_suite on {dev.get('device_kind', '?')} ({dev.get('platform', '?')})")
  if m:
    print(
      f"MLLM step: {m['layers']} LLaMA-3-shaped layers, {m['rows']} packed rows x "
      f"{m['seq_len']}, real-token fraction {m['real_token_fraction']:.2f}, "
      f"{m['examples_per_row']:.2f} examples/row"
    )
    for impl in ("xla", "cudnn"):
      if impl in m:
        r = m[impl]
        mfu = "n/a (unknown peak)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(
          f"  attention {impl:5s}: step {r['step_s'] * 1e3:8.1f} ms, "
          f"{r['real_tokens_per_s']:10.0f} real tok/s, MFU {mfu}"
        )
    if "cudnn" in m:
      print(f"  cuDNN vs XLA step time: {m['xla']['step_s'] / m['cudnn']['step_s']:.2f}x faster")
    else:
      print("  cuDNN attention not available on this device")
  if dj and dt:
    print(
      f"decoder training {dj['size']}px batch {dj['batch']}: JAX {dj['images_per_s']:.2f} "
      f"img/s, diffusers {dt['images_per_s']:.2f} img/s: "
      f"{dj['images_per_s'] / dt['images_per_s']:.2f}x"
    )
  if sj and st:
    print(
      f"{sj['steps']}-step CFG sample: JAX {sj['dtype']} {sj['seconds']:.2f} s, diffusers "
      f"{st['dtype']} {st['seconds']:.2f} s: {st['seconds'] / sj['seconds']:.2f}x faster"
    )
  for name, r in (("decoder_torch", dt), ("sample_torch", st)):
    if r is None:
      print(f"{name}: no result (diffusers/torch missing or the section failed; see above)")


SECTIONS = {
  "mllm": section_mllm,
  "decoder_jax": section_decoder_jax,
  "decoder_torch": section_decoder_torch,
  "sample_jax": section_sample_jax,
  "sample_torch": section_sample_torch,
}


FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "folder for the sections' JSON results")
flags.DEFINE_bool("tiny", False, "toy sizes on any device (the CPU smoke test)")


class _Args:
  def __init__(self, section):
    self.section, self.tiny = section, FLAGS.tiny
    self.out = Path(FLAGS.out)


def main(argv):
  if len(argv) != 2 or argv[1] not in (*SECTIONS, "report"):
    raise app.UsageError(f"give one section of {sorted(SECTIONS) + ['report']}; got {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out (the results folder) is required")
  args = _Args(argv[1])
  args.out.mkdir(parents=True, exist_ok=True)
  if args.section == "report":
    report(args.out)
    return
  t0 = time.perf_counter()
  res = SECTIONS[args.section](args)
  if not args.section.endswith("_torch"):
    res["device"] = device_info()
  res["wall_s"] = time.perf_counter() - t0
  (args.out / f"{args.section}.json").write_text(json.dumps(res, indent=1))
  print(f"{args.section}: done in {res['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__, positional=True))
