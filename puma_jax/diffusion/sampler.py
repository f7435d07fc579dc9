"""Classifier-free-guided sampling: the whole denoising loop as one jitted `lax.fori_loop`.

PUMA's decoder inference (docs/DESIGN.md §4): DDPM from SDXL's scheduler config, 50 steps,
guidance 2.0, `eps = uncond + g * (cond - uncond)` where the unconditional branch sees the CLIP
features of an all-black image (pooled to the same scale) with the positional embedding off;
initial latents are N(0, 1) times `init_noise_sigma`; images are `vae.decode(latents /
scaling_factor)`, of size `sample_size * 8`.

Randomness is per sample: each batch element has its own key, from which its initial latent and
the variance noise of every step are drawn (`initial_noise`, `step_noise`). An image therefore
depends only on its key and inputs, not on the batch it was generated in, and a reference
implementation can be fed exactly the same noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax.diffusion import schedulers as S

# denoiser(sample (B, h, w, c), timesteps (B,), features (B, N, D), use_pos_embed: bool) -> output
Denoiser = Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]


def sample_keys(seed: int, batch: int) -> jax.Array:
  """Per-sample keys: sample b of seed s always gets fold_in(key(s), b)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch))


def example_keys(seeds) -> jax.Array:
  """One key per example from its own seed: example b gets sample_keys(seeds[b], 1)[0], so it
  is drawn alike in any batch and alone with `seed=seeds[b]`."""
  seeds = jnp.asarray(seeds, jnp.uint32)
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(seeds)


def initial_noise(keys: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """(B, *shape) N(0, 1) initial latents, one draw per key (before `init_noise_sigma`)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, dtype))(keys)


def step_noise(keys: jax.Array, i, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """(B, *shape) variance noise of step `i` (may be traced), one draw per key."""

  def one(k):
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, 1), i), shape, dtype)

  return jax.vmap(one)(keys)


def guided(
  denoiser: Denoiser,
  cond: jax.Array,
  uncond: jax.Array | None,
  guidance_scale: float,
  batched: bool = False,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """model(x, t) with CFG: uncond + g * (cond - uncond); the unconditional branch runs without
  the positional embedding. `uncond` may have batch 1 (the black image), broadcast to B.

  `batched=True` runs both branches as one call on a 2B batch, passing `use_pos_embed` as a
  (2B,) weight (1 for the conditional half, 0 for the unconditional one), which the PUMA decoder
  accepts; one larger call keeps an accelerator busier than two. With g == 1 (or no `uncond`)
  only the conditional branch runs.
  """

  def model(x, t):
    if uncond is None or guidance_scale == 1.0:
      return denoiser(x, t, cond, True)
    b = x.shape[0]
    u_feat = jnp.broadcast_to(uncond, (b,) + uncond.shape[1:]).astype(cond.dtype)
    if batched:
      pos = jnp.concatenate([jnp.ones((b,), jnp.float32), jnp.zeros((b,), jnp.float32)])
      both = denoiser(
        jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, u_feat]), pos
      )
      c, u = both[:b], both[b:]
    else:
      c = denoiser(x, t, cond, True)
      u = denoiser(x, t, u_feat, False)
    return u + guidance_scale * (c - u)

  return model


def denoise_loop(
  model: Callable[[jax.Array, jax.Array], jax.Array],
  scheduler,
  schedule: S.Schedule,
  latents: jax.Array,
  keys: jax.Array | None = None,
) -> jax.Array:
  """Runs every step of `schedule` from `latents` (already times `init_noise_sigma`) in one
  `lax.fori_loop`. `keys` (B,) feed the per-step noise of stochastic schedulers."""
  if scheduler.stochastic and keys is None:
    raise ValueError(f"{type(scheduler).__name__} is stochastic: pass per-sample `keys`")
  b = latents.shape[0]
  multistep = scheduler.multistep

  def body(i, carry):
    x, prev_x0 = carry
    t = jnp.broadcast_to(schedule.timesteps[i], (b,))
    out = model(scheduler.scale_model_input(schedule, i, x), t)
    noise = step_noise(keys, i, x.shape[1:], jnp.float32) if scheduler.stochastic else None
    history = {"prev_x0": prev_x0} if multistep else {}
    res = scheduler.step(schedule, i, out.astype(jnp.float32), x, noise, **history)
    return res.prev_sample, (res.pred_original_sample if multistep else prev_x0)

  x = latents.astype(jnp.float32)
  return jax.lax.fori_loop(0, schedule.num_steps, body, (x, jnp.zeros_like(x)))[0]


def sample_latents(
  denoiser: Denoiser,
  scheduler,
  schedule: S.Schedule,
  cond: jax.Array,
  uncond: jax.Array | None,
  keys: jax.Array,
  latent_shape: tuple[int, int, int],
  guidance_scale: float,
  batched: bool = False,
) -> jax.Array:
  """Initial noise from `keys`, then the guided loop. Returns (B, h, w, c) float32 latents."""
  if keys.shape[0] != cond.shape[0]:
    raise ValueError(f"got {keys.shape[0]} keys for a batch of {cond.shape[0]} feature sets")
  x = initial_noise(keys, tuple(latent_shape)) * scheduler.init_noise_sigma(schedule)
  return denoise_loop(
    guided(denoiser, cond, uncond, guidance_scale, batched), scheduler, schedule, x, keys
  )


def decode_latents(vae, latents: jax.Array) -> jax.Array:
  """diffusers' SDXL post-processing: vae.decode(latents / scaling_factor (+ shift_factor))."""
  c = vae.config
  z = latents / c.scaling_factor
  if c.shift_factor:
    z = z + c.shift_factor
  return vae.decode(z)


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
  """[-1, 1] NHWC floats -> uint8 (diffusers' image processor: (x/2 + 0.5) clipped, x255,
  rounded)."""
  x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
  return (x * 255).round().astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  num_steps: int = 50
  guidance_scale: float = 2.0
  scheduler: str = "ddpm"  # ddpm (the paper's, 50 steps) | ddim | euler | dpmpp (20-25)
  eta: float = 0.0  # DDIM only
  batch_cfg: bool = True  # both CFG branches in one 2B-batch call (see `guided`)


# Key of a puma-decoder dir's puma_config.json: the schedule it was trained with
# (`schedulers.to_dict`), so that every sampling path uses it (docs/DESIGN.md §4).
SCHEDULER_KEY = "scheduler"


def decoder_scheduler_config(decoder_dir) -> S.SchedulerConfig:
  """The schedule a converted decoder dir records; none recorded (the paper's decoders converted
  from PUMA's weights, dirs written before the key existed): SDXL's defaults, theirs."""
  from puma_jax import checkpoints

  info = checkpoints.load_info(decoder_dir)
  d = info.get(SCHEDULER_KEY)
  if d is None:
    return S.SchedulerConfig()
  where = f"{decoder_dir}/{checkpoints.CONFIG_FILE}: key {SCHEDULER_KEY!r}"
  if not isinstance(d, dict):
    raise ValueError(f"{where} must be an object (a scheduler config), got {d!r:.80}")
  try:
    return S.from_diffusers_config(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None


def resolve_scheduler_config(
  trained: S.SchedulerConfig, given: S.SchedulerConfig | None, where: str
) -> S.SchedulerConfig:
  """The config to sample a decoder trained with `trained` with: `given` (a caller's choice) when
  it keeps the trained noise levels and prediction type (`schedulers.TRAINED_FIELDS`; spacing and
  the like may differ), `trained` when None. A decoder sampled with another schedule than it
  learned makes wrong images without failing, so a mismatch raises, naming `where`."""
  if given is None:
    return trained
  bad = S.trained_mismatch(trained, given)
  if bad:
    raise ValueError(
      f"{where} was trained with another noise schedule than the one given "
      f"({'; '.join(bad)}); leave the scheduler config out to use the decoder's own"
    )
  return given


def make_scheduler(settings: SamplerSettings, config: S.SchedulerConfig | None = None):
  kw = {"eta": settings.eta} if settings.scheduler == "ddim" else {}
  return S.make(settings.scheduler, config or S.SchedulerConfig(), **kw)


class DecoderSampler:
  """Feature-conditioned image generation with a PUMA decoder and the VAE, one jitted call.

  `decoder` is any NNX module called as `decoder(sample, timesteps, features,
  use_pos_embed=...)` with `decoder.config.unet.sample_size` / `.in_channels`;
  `sampler(features, uncond_features, keys)` -> images (B, 8*S, 8*S, 3) in about [-1, 1].
  `latents(...)` stops before the VAE.
  """

  def __init__(
    self,
    decoder: nnx.Module,
    vae: nnx.Module,
    settings: SamplerSettings = SamplerSettings(),
    scheduler_config: S.SchedulerConfig | None = None,
    latent_size: int | None = None,
  ):
    ucfg = decoder.config.unet
    self.settings = settings
    self.scheduler = make_scheduler(settings, scheduler_config)
    self.schedule = self.scheduler.set_timesteps(settings.num_steps)
    size = latent_size or ucfg.sample_size
    self.latent_shape = (size, size, ucfg.in_channels)
    if vae.config.latent_channels != ucfg.in_channels:
      raise ValueError(
        f"the decoder's UNet takes in_channels={ucfg.in_channels} latent channels "
        f"but the VAE has latent_channels={vae.config.latent_channels}"
      )
    self._dgraph, self._dstate = nnx.split(decoder)
    self._vgraph, self._vstate = nnx.split(vae)
    self.num_tokens = getattr(decoder.config, "num_tokens", None)
    self._run = jax.jit(self._impl, static_argnames=("decode",))

  def _impl(self, dstate, vstate, schedule, features, uncond, keys, decode=True):
    decoder = nnx.merge(self._dgraph, dstate)

    def denoiser(x, t, f, pos):
      return decoder(x, t, f, use_pos_embed=pos)

    lat = sample_latents(
      denoiser,
      self.scheduler,
      schedule,
      features,
      uncond,
      keys,
      self.latent_shape,
      self.settings.guidance_scale,
      self.settings.batch_cfg,
    )
    if not decode:
      return lat
    return decode_latents(nnx.merge(self._vgraph, vstate), lat)

  def _check(self, features, uncond):
    if features.ndim != 3:
      raise ValueError(f"features must be (batch, tokens, dim); got shape {features.shape}")
    if self.num_tokens is not None and features.shape[1] != self.num_tokens:
      raise ValueError(
        f"features have {features.shape[1]} tokens but this decoder was trained "
        f"for num_tokens={self.num_tokens}"
      )
    if uncond is not None and uncond.shape[1:] != features.shape[1:]:
      raise ValueError(
        f"uncond_features shape {uncond.shape} does not match features "
        f"{features.shape} (pool the black image's features to the same scale)"
      )

  def set_weights(self, decoder: nnx.Module, vae: nnx.Module | None = None) -> None:
    """New weights for the same modules (the decoder after more training steps): the compiled
    sampler is reused, as the graph and the shapes are unchanged."""
    graph, state = nnx.split(decoder)
    if graph != self._dgraph:
      raise ValueError("set_weights: the decoder is not the module this sampler was built for")
    self._dstate = state
    if vae is not None:
      graph, state = nnx.split(vae)
      if graph != self._vgraph:
        raise ValueError("set_weights: the VAE is not the module this sampler was built for")
      self._vstate = state

  def latents(self, features, uncond_features, keys):
    self._check(features, uncond_features)
    return self._run(
      self._dstate, self._vstate, self.schedule, features, uncond_features, keys, decode=False
    )

  def __call__(self, features, uncond_features, keys):
    self._check(features, uncond_features)
    return self._run(self._dstate, self._vstate, self.schedule, features, uncond_features, keys)
