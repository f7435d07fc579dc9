"""CFG sampler: the jitted JAX loop against a PyTorch/diffusers reference loop.

The denoiser here is a small hand-written function with the PUMA decoder's interface (features
with a positional embedding that the unconditional branch switches off), written twice (JAX and
torch), so the test isolates the loop: scheduler, CFG rule, noise, VAE decode.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax.diffusion import sampler as SM
from puma_jax.diffusion import schedulers as S
from puma_jax.models import vae as V
from tests.utils import randomize_norms, rel_err

import torch
import diffusers

N, D, C, SIZE = 4, 6, 4, 8


@dataclasses.dataclass(frozen=True)
class _UNetCfg:
  sample_size: int = SIZE
  in_channels: int = C


@dataclasses.dataclass(frozen=True)
class _Cfg:
  unet: _UNetCfg = _UNetCfg()
  num_tokens: int = N


class ToyDecoder(nnx.Module):
  """eps = tanh(a * x + mean_tokens(f + pos?) @ W + sin(t / 100))."""

  def __init__(self, seed=0, n=N, d=D):
    rng = np.random.RandomState(seed)
    self.config = _Cfg(num_tokens=n)
    self.w = nnx.Param(jnp.asarray(rng.randn(d, C).astype(np.float32) * 0.5))
    self.pos = nnx.Param(jnp.asarray(rng.randn(n, d).astype(np.float32)))
    self.a = nnx.Param(jnp.asarray(rng.uniform(0.2, 0.8, C).astype(np.float32)))

  def __call__(self, sample, timesteps, features, use_pos_embed=True):
    w = jnp.asarray(use_pos_embed, jnp.float32)  # bool, or a (B,) weight (batched CFG)
    f = features + w.reshape(-1, 1, 1) * self.pos[...]
    h = f.mean(1) @ self.w[...]
    t = jnp.sin(timesteps.astype(jnp.float32) / 100.0)
    return jnp.tanh(self.a[...] * sample + h[:, None, None, :] + t[:, None, None, None])

  def torch_fn(self):
    w, pos, a = (torch.from_numpy(np.array(p[...])) for p in (self.w, self.pos, self.a))

    def f(x, t, feats, use_pos):  # x NCHW
      ff = feats + pos if use_pos else feats
      h = ff.mean(1) @ w
      tt = torch.sin(torch.as_tensor(t, dtype=torch.float32) / 100.0)
      return torch.tanh(a[None, :, None, None] * x + h[:, :, None, None] + tt)

    return f


def _reference_loop(fn, ref_sched, steps, latents, cond, uncond, g, noises=None, monkeypatch=None):
  """A diffusers-style pipeline loop in torch (NCHW); `noises[i]` is step i's variance noise."""
  ref_sched.set_timesteps(steps)
  x = torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2)) * ref_sched.init_noise_sigma
  box = {}
  if noises is not None:
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    monkeypatch.setattr(ddpm_mod, "randn_tensor", lambda shape, **kw: box["n"])
  for i, t in enumerate(ref_sched.timesteps):
    xin = ref_sched.scale_model_input(x, t)
    c = fn(xin, t, cond, True)
    u = fn(xin, t, uncond.expand_as(cond), False)
    eps = u + g * (c - u)
    if noises is not None:
      box["n"] = torch.from_numpy(np.asarray(noises[i]).transpose(0, 3, 1, 2))
    x = ref_sched.step(eps, t, x).prev_sample
  return x.numpy().transpose(0, 2, 3, 1)


def _features(b, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(b, N, D).astype(np.float32), rng.randn(1, N, D).astype(np.float32))


def test_ddpm_cfg_loop_matches_diffusers(monkeypatch):
  dec = ToyDecoder()
  cond, uncond = _features(2)
  keys = SM.sample_keys(3, 2)
  sched = S.DDPM(S.SchedulerConfig())
  schedule = sched.set_timesteps(50)
  run = jax.jit(
    lambda c, u, k: SM.sample_latents(dec, sched, schedule, c, u, k, (SIZE, SIZE, C), 2.0)
  )
  ours = run(jnp.asarray(cond), jnp.asarray(uncond), keys)
  # The same noise the jitted loop drew inside, regenerated outside.
  init = SM.initial_noise(keys, (SIZE, SIZE, C))
  noises = [SM.step_noise(keys, i, (SIZE, SIZE, C)) for i in range(50)]
  ref = _reference_loop(
    dec.torch_fn(),
    diffusers.DDPMScheduler.from_config(
      dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
      )
    ),
    50,
    init,
    torch.from_numpy(cond),
    torch.from_numpy(uncond),
    2.0,
    noises,
    monkeypatch,
  )
  print(f"ddpm cfg loop: rel_err {rel_err(ours, ref):.2e}")
  assert rel_err(ours, ref) < 1e-4
  # guidance matters, and the noise does: other settings give other latents
  other = jax.jit(
    lambda c, u, k: SM.sample_latents(dec, sched, schedule, c, u, k, (SIZE, SIZE, C), 1.0)
  )(jnp.asarray(cond), jnp.asarray(uncond), keys)
  assert rel_err(other, ref) > 1e-2


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp"])
def test_deterministic_loops_match_diffusers(name):
  dec = ToyDecoder(1)
  cond, uncond = _features(2, 1)
  keys = SM.sample_keys(0, 2)
  spacing = "trailing" if name == "ddim" else "leading"
  cfg = S.SchedulerConfig(timestep_spacing=spacing, steps_offset=1)
  # Chosen by name, as `--scheduler=NAME` does.
  sched = SM.make_scheduler(SM.SamplerSettings(scheduler=name, num_steps=20), cfg)
  schedule = sched.set_timesteps(20)
  ours = jax.jit(
    lambda c, u, k: SM.sample_latents(dec, sched, schedule, c, u, k, (SIZE, SIZE, C), 3.0)
  )(jnp.asarray(cond), jnp.asarray(uncond), keys)
  kw = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing=spacing,
  )
  ref_sched = {
    "ddim": lambda: diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **kw),
    "euler": lambda: diffusers.EulerDiscreteScheduler(**kw),
    "dpmpp": lambda: diffusers.DPMSolverMultistepScheduler(**kw),
  }[name]()
  ref = _reference_loop(
    dec.torch_fn(),
    ref_sched,
    20,
    SM.initial_noise(keys, (SIZE, SIZE, C)),
    torch.from_numpy(cond),
    torch.from_numpy(uncond),
    3.0,
  )
  assert rel_err(ours, ref) < 1e-4


def _tiny_vae_pair():
  torch.manual_seed(0)
  tv = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 8),
    norm_num_groups=4,
    layers_per_block=1,
    latent_channels=C,
  ).eval()
  randomize_norms(tv)
  from puma_jax.convert import core
  from puma_jax.convert import vae as cv

  cfg = cv.config_from_diffusers(dict(tv.config))
  model = V.AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)
  shapes = {k: (v.shape, v.dtype) for k, v in core.flatten_state(pure).items()}
  sd = {k: v.numpy() for k, v in tv.state_dict().items()}
  filled = core.map_to_target(sd, cv.rules(cfg), shapes)
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, core.unflatten_state(filled, pure)))
  return tv, nnx.merge(graphdef, params, rest)


def test_decoder_sampler_end_to_end_with_vae(monkeypatch):
  """DecoderSampler: loop + VAE decode of latents / scaling_factor, batch-invariant per key."""
  dec = ToyDecoder(2)
  tv, vae = _tiny_vae_pair()
  smp = SM.DecoderSampler(dec, vae, SM.SamplerSettings(num_steps=10))
  unbatched = SM.DecoderSampler(dec, vae, SM.SamplerSettings(num_steps=10, batch_cfg=False))
  cond, uncond = _features(3, 2)
  keys = SM.sample_keys(7, 3)
  images = smp(jnp.asarray(cond), jnp.asarray(uncond), keys)
  assert images.shape == (3, 2 * SIZE, 2 * SIZE, 3)  # tiny VAE: 2x; SDXL's: 8x
  init = SM.initial_noise(keys, (SIZE, SIZE, C))
  noises = [SM.step_noise(keys, i, (SIZE, SIZE, C)) for i in range(10)]
  lat = _reference_loop(
    dec.torch_fn(),
    diffusers.DDPMScheduler(
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      clip_sample=False,
      steps_offset=1,
    ),
    10,
    init,
    torch.from_numpy(cond),
    torch.from_numpy(uncond),
    2.0,
    noises,
    monkeypatch,
  )
  with torch.no_grad():
    ref = tv.decode(torch.from_numpy(lat.transpose(0, 3, 1, 2)) / tv.config.scaling_factor)
  assert rel_err(images, ref.sample.numpy().transpose(0, 2, 3, 1)) < 1e-4
  # Sample 1 alone, with its own key, is the same image as inside the batch.
  alone = smp(jnp.asarray(cond[1:2]), jnp.asarray(uncond), keys[1:2])
  assert rel_err(alone, images[1:2]) < 1e-5
  assert rel_err(unbatched(jnp.asarray(cond), jnp.asarray(uncond), keys), images) < 1e-5
  u8 = SM.to_uint8(images)
  assert u8.dtype == np.uint8 and u8.shape == images.shape


def test_sampler_bad_inputs():
  dec = ToyDecoder()
  vae = V.AutoencoderKL(V.tiny_config(), rngs=nnx.Rngs(0))
  smp = SM.DecoderSampler(dec, vae, SM.SamplerSettings(num_steps=2))
  cond, uncond = _features(1)
  with pytest.raises(ValueError, match="num_tokens=4"):
    smp(jnp.zeros((1, 16, D)), jnp.zeros((1, 16, D)), SM.sample_keys(0, 1))
  with pytest.raises(ValueError, match="uncond_features"):
    smp(jnp.asarray(cond), jnp.zeros((1, N, D + 1)), SM.sample_keys(0, 1))
  with pytest.raises(ValueError, match="keys"):
    smp(jnp.asarray(cond), jnp.asarray(uncond), SM.sample_keys(0, 2))
  bad_vae = V.AutoencoderKL(
    V.config_with_blocks((8,), norm_num_groups=4, latent_channels=3), rngs=nnx.Rngs(0)
  )
  with pytest.raises(ValueError, match="latent_channels=3"):
    SM.DecoderSampler(dec, bad_vae)
  with pytest.raises(ValueError, match="stochastic"):
    SM.denoise_loop(lambda x, t: x, S.DDPM(), S.DDPM().set_timesteps(2), jnp.zeros((1, 2, 2, 1)))
