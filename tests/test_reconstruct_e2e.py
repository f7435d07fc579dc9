"""End-to-end reconstruction parity: the JAX pipeline (converted CLIP, PUMA decoder, VAE; one
jitted CFG DDPM loop) against a PyTorch reference pipeline (transformers CLIP, diffusers UNet +
mapping layer + positional embedding, diffusers DDPMScheduler, the same CFG rule, diffusers VAE)
fed the same initial latents and the same per-step noise."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from puma_jax import convert, reconstruct
from puma_jax.diffusion import sampler as SM
from puma_jax.features import synthetic_image
from puma_jax.models import clip, pooling
from tests.unet_ref import save_state_dict
from tests.utils import randomize_norms, rel_err

import torch
import diffusers
import transformers

FEAT, CTX = 16, 32  # CLIP width (mapping_dim) and the UNet's cross-attention width


def torch_clip(seed=0):
  torch.manual_seed(seed)
  tclip = transformers.CLIPVisionModel(
    transformers.CLIPVisionConfig(
      hidden_size=FEAT,
      intermediate_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=32,
      patch_size=2,
    )
  ).eval()
  randomize_norms(tclip, seed + 1)
  return tclip


def torch_decoder(tokens, seed=0):
  """(unet, mapping, pos): a PUMA decoder as the public module computes it."""
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    cross_attention_dim=CTX,
    use_linear_projection=True,
  ).eval()
  randomize_norms(unet, seed + 2)
  mapping = torch.nn.Linear(FEAT, CTX)
  pos = torch.randn(1, tokens, CTX) * 0.5 if tokens == 256 else None
  return unet, mapping, pos


def save_public_decoder(unet, mapping, pos, dst):
  """The public layout: a diffusers UNet folder whose weights also hold the PUMA tensors."""
  extra = {
    "mapping_layer.weight": mapping.weight.detach().clone(),
    "mapping_layer.bias": mapping.bias.detach().clone(),
  }
  if pos is not None:
    extra["embed_img_pos"] = pos
  save_state_dict(unet, dst, extra=extra)
  return dst


def torch_vae(seed=0):
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    layers_per_block=1,
    scaling_factor=0.13025,
  ).eval()
  randomize_norms(vae, seed + 3)
  return vae


def _build(tmp, tokens):
  tclip = torch_clip()
  tclip.save_pretrained(tmp / "clip_src")
  unet, mapping, pos = torch_decoder(tokens)
  dec_src = save_public_decoder(unet, mapping, pos, tmp / f"unet_{tokens}")
  vae = torch_vae()
  vae.save_pretrained(tmp / "vae_src")
  dirs = {
    n: convert.convert(fam, src, tmp / f"{n}_dst")
    for n, fam, src in (
      ("clip", "clip-vision", tmp / "clip_src"),
      ("decoder", "puma-decoder", dec_src),
      ("vae", "vae", tmp / "vae_src"),
    )
  }
  return (tclip, unet, mapping, pos, vae), dirs


def torch_pipeline(parts, images, scale, keys, steps, g, monkeypatch, sched=None):
  """The PyTorch reference: parts (tclip, unet, mapping, pos, vae); `sched` a diffusers
  scheduler (default: DDPM with SDXL's values), fed the sampler's noise for `keys`."""
  tclip, unet, mapping, pos, vae = parts
  tokens = pooling.SCALE_TOKENS[pooling.scale_index(scale)]

  def feats(imgs):
    px = torch.from_numpy(clip.preprocess_pil(imgs, 32).transpose(0, 3, 1, 2).copy())
    h = tclip(pixel_values=px).last_hidden_state[:, 1:]  # before post_layernorm
    b, n, d = h.shape
    k = int(round((n / tokens) ** 0.5))
    grid = h.transpose(1, 2).reshape(b, d, 16, 16)
    return torch.nn.functional.avg_pool2d(grid, k).flatten(2).transpose(1, 2)

  sched = sched or diffusers.DDPMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
  )
  sched.set_timesteps(steps)
  shape = (8, 8, 4)
  import diffusers.schedulers.scheduling_ddpm as ddpm_mod

  box = {}
  monkeypatch.setattr(ddpm_mod, "randn_tensor", lambda s, **kw: box["n"])
  nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    cond = mapping(feats(images))
    if pos is not None:
      cond = cond + pos
    uncond = mapping(feats([np.zeros((32, 32, 3), np.uint8)])).expand_as(cond)  # no pos embed
    x = nchw(SM.initial_noise(keys, shape)) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
      c = unet(x, t, encoder_hidden_states=cond).sample
      u = unet(x, t, encoder_hidden_states=uncond).sample
      box["n"] = nchw(SM.step_noise(keys, i, shape))
      x = sched.step(u + g * (c - u), t, x).prev_sample
    img = vae.decode(x / vae.config.scaling_factor).sample
  return img.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Converted models per token count, built once per module (conversion dominates)."""
  cache = {}

  def get(tokens):
    if tokens not in cache:
      cache[tokens] = _build(tmp_path_factory.mktemp(f"models{tokens}"), tokens)
    return cache[tokens]

  return get


@pytest.mark.parametrize("scale,tokens", [("f0", 256), ("f2", 16)])
def test_reconstruction_parity(built, monkeypatch, scale, tokens):
  parts, dirs = built(tokens)
  steps = 12
  rec = reconstruct.load(
    str(dirs["decoder"]),
    str(dirs["clip"]),
    str(dirs["vae"]),
    scale,
    SM.SamplerSettings(num_steps=steps),
  )
  assert rec.sampler.scheduler.config.steps_offset == 1
  images = [synthetic_image(48, seed=i) for i in range(2)]
  ours = rec(images, seed=11)
  ref = torch_pipeline(parts, images, scale, SM.sample_keys(11, 2), steps, 2.0, monkeypatch)
  assert ours.shape == ref.shape == (2, 16, 16, 3)
  err = rel_err(ours, ref)
  print(f"reconstruction {scale}: rel_err {err:.2e}")
  assert err < 1e-3


def test_dpmpp_20_steps_parity(built, monkeypatch):
  """`--scheduler=dpmpp --steps=20`: the jitted CFG loop with the converted PUMA decoder equals
  diffusers' DPMSolverMultistepScheduler loop with the same weights and initial noise."""
  parts, dirs = built(16)
  rec = reconstruct.load(
    str(dirs["decoder"]),
    str(dirs["clip"]),
    str(dirs["vae"]),
    "f2",
    SM.SamplerSettings(num_steps=20, scheduler="dpmpp"),
  )
  images = [synthetic_image(48, seed=5)]
  ours = rec(images, seed=4)
  ref_sched = diffusers.DPMSolverMultistepScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
  )
  ref = torch_pipeline(parts, images, "f2", SM.sample_keys(4, 1), 20, 2.0, monkeypatch, ref_sched)
  err = rel_err(ours, ref)
  print(f"reconstruction dpmpp 20 steps: rel_err {err:.2e}")
  assert err < 1e-3
  # Not DDPM's images: the scheduler choice reached the loop.
  ddpm = torch_pipeline(parts, images, "f2", SM.sample_keys(4, 1), 20, 2.0, monkeypatch)
  assert rel_err(ours, ddpm) > 1e-2


def test_cli_and_scale_mismatch(built, tmp_path, capsys):
  _, dirs = built(16)
  from PIL import Image

  Image.fromarray(synthetic_image(40)).save(tmp_path / "in.png")
  args = [
    f"--decoder={dirs['decoder']}",
    f"--clip={dirs['clip']}",
    f"--vae={dirs['vae']}",
    f"--image={tmp_path / 'in.png'}",
    "--steps=2",
  ]
  assert reconstruct.main(args + ["--scale=f2", f"--out={tmp_path / 'o.png'}", "--batch=2"]) == 0
  outs = sorted(p.name for p in tmp_path.glob("o_*.png"))
  assert outs == ["o_0.png", "o_1.png"]
  assert np.asarray(Image.open(tmp_path / "o_0.png")).shape == (16, 16, 3)
  # A 16-token decoder asked for scale f0 (256 tokens): a clear error, exit code 2.
  assert reconstruct.main(args + ["--scale=f0", f"--out={tmp_path / 'x.png'}"]) == 2
  assert "num_tokens=16 (scale f2)" in capsys.readouterr().err
  info = json.loads((dirs["decoder"] / "puma_config.json").read_text())
  assert info["config"]["num_tokens"] == 16
  with pytest.raises(ValueError, match="num_tokens=16"):
    rec = reconstruct.load(str(dirs["decoder"]), str(dirs["clip"]), str(dirs["vae"]), "f2")
    rec.sampler(jnp.zeros((1, 64, FEAT)), jnp.zeros((1, 64, FEAT)), SM.sample_keys(0, 1))
