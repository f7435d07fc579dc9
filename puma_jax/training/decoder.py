"""The decoder stage (PUMA paper, appendix 7.1): one scale's PUMA decoder, frozen CLIP and VAE.

Per example: CLIP features of the image at the decoder's scale; 10% of them replaced by the
black image's features with the positional embedding off (the CFG unconditional input, as at
inference: docs/DESIGN.md §5); VAE latent (a draw from the latent distribution, x
scaling_factor); offset noise (0.1); uniform timesteps; MSE on the scheduler's prediction
target (`config.model.scheduler.prediction_type`: epsilon as the paper; docs/DESIGN.md §5).

Every random draw of an example comes from its own key, fold_in(step key, its index in the
global batch), so the draws do not depend on how the batch is split into microbatches or
devices: an accumulated step is the same update as one big batch.

With `data.latent_cache` (a directory `python -m puma_jax.data.prepare --decoder_config=...`
wrote: `training.latent_cache`) the training batches carry each example's VAE moments and f0
CLIP features instead of its pixels: the step skips both encoders, pools the features to its
scale and draws the latent from the moments with the same key as above.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from puma_jax import assemble, checkpoints, precision
from puma_jax.data import pipeline
from puma_jax.diffusion import sampler as sampler_lib, schedulers as S
from puma_jax.evaluation import metrics as metrics_lib
from puma_jax.models import clip as clip_lib, pooling, puma_decoder, vae as vae_lib
from puma_jax.training import data as data_lib, losses, optim, steps


class FrozenParts(nnx.Module):
  """The frozen CLIP and VAE alone, drawn first from `rngs` (as in `DecoderTrainModel`, so
  randomly initialized ones equal the stage's): what the latent cache is computed with."""

  def __init__(self, clip_cfg, vae_cfg, *, dtype, rngs):
    self.clip = clip_lib.CLIPVisionModel(clip_cfg, dtype=dtype, rngs=rngs)
    self.vae = vae_lib.AutoencoderKL(vae_cfg, dtype=dtype, rngs=rngs)


class DecoderTrainModel(FrozenParts):
  """The trainable decoder with its frozen companions (one module, so one sharded init)."""

  def __init__(self, clip_cfg, vae_cfg, dec_cfg, *, dtype, rngs, remat=False):
    super().__init__(clip_cfg, vae_cfg, dtype=dtype, rngs=rngs)
    self.decoder = puma_decoder.PumaDecoder(dec_cfg, dtype=dtype, rngs=rngs, remat=remat)


class DecoderEncoder:
  """Example -> {"clip": uint8 CLIP view, "vae": uint8 VAE view} of its (last) image."""

  def __call__(self, ex):
    if not ex.images or not ex.vae_images:
      raise ValueError(f"example {ex.key} has no image for decoder training")
    return {"clip": ex.images[-1], "vae": ex.vae_images[-1]}


def example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
  """One key per example: fold_in(key, the example's index in the global batch)."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, index)


def _check_same_config(stored, configured, field: str, path: str, model_field: str) -> None:
  """A frozen part loaded from a module dir must be the configured one, field for field: the
  decoder is trained (and exported) with `config.model`'s description of it."""
  a, b = stored.to_dict(), configured.to_dict()
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  if diff:
    shown = ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} configured" for k in diff[:4])
    raise ValueError(
      f"config.{field}={path}: its config differs from config.{model_field} ({shown})"
    )


class DecoderStage:
  """Trains `config.scale`'s decoder (see `training.stage.Stage` for the members)."""

  progress_keys = ("grad_norm",)
  frozen = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("clip"), nnx.PathContains("vae")))

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path | None = None):
    self.config = config
    self.workdir = workdir  # sample images go to workdir/samples
    m = config.model
    self.clip_cfg = clip_lib.CLIPVisionConfig.from_dict(m.clip.to_dict())
    self.vae_cfg = vae_lib.VAEConfig.from_dict(m.vae.to_dict())
    self.dec_cfg = puma_decoder.PumaDecoderConfig.from_dict(m.decoder.to_dict())
    self.sched = S.SchedulerConfig(**m.scheduler.to_dict())
    self.scale = str(config.scale)
    self.tokens = pooling.SCALE_TOKENS[pooling.scale_index(self.scale)]
    if self.dec_cfg.num_tokens != self.tokens:
      raise ValueError(
        f"config.scale={self.scale} has {self.tokens} tokens but "
        f"config.model.decoder.num_tokens={self.dec_cfg.num_tokens}"
      )
    if self.dec_cfg.mapping_dim != self.clip_cfg.hidden_size:
      raise ValueError(
        f"config.model.decoder.mapping_dim={self.dec_cfg.mapping_dim} must equal "
        f"the CLIP width config.model.clip.hidden_size={self.clip_cfg.hidden_size}"
      )
    if self.vae_cfg.latent_channels != self.dec_cfg.unet.in_channels:
      raise ValueError("config.model.vae.latent_channels must equal the decoder UNet's in_channels")
    self.dtype = jnp.dtype(precision.resolve(str(config.precision)))
    self.loads_pretrained = bool(config.init.clip or config.init.vae or config.init.decoder)
    self.latent_cache = str(config.data.get("latent_cache", "") or "")
    self._cache_meta = None  # the cache's metadata, read (and checked) by train_data
    self._sampler = None  # built (and compiled) at the first evaluation, then given new weights

  def build(self, rngs):
    return DecoderTrainModel(
      self.clip_cfg,
      self.vae_cfg,
      self.dec_cfg,
      dtype=self.dtype,
      rngs=rngs,
      remat=bool(self.config.remat),
    )

  def build_frozen(self, rngs):
    """The frozen parts alone (`FrozenParts`), as `build` initializes them."""
    return FrozenParts(self.clip_cfg, self.vae_cfg, dtype=self.dtype, rngs=rngs)

  def meta(self) -> dict:
    return {
      "stage": "decoder",
      "scale": self.scale,
      "decoder": self.dec_cfg.to_dict(),
      "clip": self.clip_cfg.to_dict(),
      "vae": self.vae_cfg.to_dict(),
      # The schedule it learns: export records it with the decoder for sampling.
      "scheduler": S.to_dict(self.sched),
    }

  def load_pretrained(self, model) -> None:
    """CLIP and VAE from converted dirs; the decoder from a converted puma-decoder dir, or from
    an SDXL UNet (sdxl-unet dir) as the paper initializes it (mapping layer stays random)."""
    self.load_frozen(model)
    c = self.config.init
    if c.decoder:
      family, _ = checkpoints.load_config(c.decoder)
      src = checkpoints.load_module(c.decoder, family=family)
      if family == "puma-decoder":
        assemble._copy(model.decoder, src, c.decoder)
      else:
        assemble._copy(model.decoder.unet, src, c.decoder)

  def load_frozen(self, model) -> None:
    """CLIP and VAE from the converted dirs `config.init` names, into `model.clip` and
    `model.vae` (a `DecoderTrainModel` or `FrozenParts`)."""
    c = self.config.init
    if c.clip:
      src = checkpoints.load_module(c.clip, family="clip-vision")
      _check_same_config(src.config, self.clip_cfg, "init.clip", c.clip, "model.clip")
      assemble._copy(model.clip, src, c.clip)
    if c.vae:
      src = checkpoints.load_module(c.vae, family="vae")
      # Above all scaling_factor: the latents must be scaled as the VAE's stage measured them.
      _check_same_config(src.config, self.vae_cfg, "init.vae", c.vae, "model.vae")
      assemble._copy(model.vae, src, c.vae)

  def optimizer(self, params):
    return optim.make(self.config.optim, params)

  def train_data(self, split: str = "train"):
    self.check_image_sizes()
    dcfg = self.config.data
    same = bool(self.config.train.same_data_on_hosts)
    if split == "train" and self.latent_cache:
      from puma_jax.training import latent_cache

      meta = self._cache_meta = latent_cache.check_config(self)
      names = list(pipeline.active_sources(dcfg))
      return data_lib.host_data(
        dcfg,
        split,
        None,
        same,
        readers=latent_cache.readers(self.latent_cache, meta, names),
        decode=lambda name: latent_cache.Decode(name, meta["shapes"]),
      )
    return data_lib.host_data(dcfg, split, self.example_encoder(), same)

  def check_image_sizes(self) -> None:
    """`data.image` must give the CLIP and VAE views this stage's models take."""
    dcfg = self.config.data
    if int(dcfg.image.clip_size) != self.clip_cfg.image_size:
      raise ValueError(
        f"data.image.clip_size={dcfg.image.clip_size} must equal the CLIP "
        f"image_size={self.clip_cfg.image_size}"
      )
    want = self.dec_cfg.unet.sample_size * self.vae_cfg.downsample_factor
    if int(dcfg.image.vae_size) != want:
      raise ValueError(
        f"data.image.vae_size={dcfg.image.vae_size} must be the decoder's image "
        f"size unet.sample_size x VAE downsampling = {want}"
      )

  def check_frozen(self, frozen) -> None:
    """Called by the loop with the run's frozen parameters (fresh or restored): a latent cache
    made with other CLIP or VAE weights is refused."""
    if self.latent_cache:
      from puma_jax.training import latent_cache

      meta = self._cache_meta or latent_cache.check_config(self)
      latent_cache.check_weights(self.latent_cache, meta, self, frozen)

  def example_encoder(self) -> DecoderEncoder:
    """Example -> the image views a training batch holds (also what the latent cache encodes)."""
    return DecoderEncoder()

  def device_arrays(self, host_batch: dict) -> dict:
    return host_batch

  def features(self, model, clip_uint8, tokens: int | None = None):
    """The decoder's conditioning: CLIP patch features pooled to `tokens` (this scale's)."""
    patches = clip_lib.patch_features(model.clip, clip_lib.normalize_uint8(clip_uint8))
    return jax.lax.stop_gradient(pooling.pool(patches, tokens or self.tokens))

  def blank_features(self, model):
    """Features of the black image (1, tokens, D): CFG's unconditional input."""
    return jax.lax.stop_gradient(clip_lib.black_features(model.clip, self.tokens))

  def moments(self, model, images_uint8):
    """The VAE's latent distribution (mean, logvar) of uint8 images."""
    images = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    return jax.lax.stop_gradient(model.vae.encode_moments(images))

  def latents(self, keys, mean, logvar):
    """Scaled VAE latents, one draw mean + std x N(0, 1) per example key (as
    `AutoencoderKL.sample_latent`, which draws a whole batch from one key)."""
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
    lat = (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar) * eps).astype(mean.dtype)
    return jax.lax.stop_gradient(lat * self.vae_cfg.scaling_factor)

  def train_step(self, graphdef, tx):
    sched, cfg = self.sched, self.config
    drop_p, offset = float(cfg.cfg_drop_prob), float(cfg.noise_offset)
    min_snr = float(cfg.get("min_snr_gamma", 0.0))  # older configs: no weighting
    if min_snr < 0:
      raise ValueError(f"min_snr_gamma={min_snr} must be >= 0 (0: plain MSE)")
    ac = jnp.asarray(S.alphas_cumprod(sched))
    n = int(cfg.train.grad_accum_steps)
    cached = bool(self.latent_cache)

    def draw_one(key, latent):
      # q_sample draws a batch from one key: give it a batch of one per example key.
      d = S.q_sample(sched, key, latent[None].astype(jnp.float32), noise_offset=offset)
      return jax.tree.map(lambda x: x[0], d)

    def loss_fn(params, mb, frozen, rest, key):
      model = nnx.merge(graphdef, frozen, params, rest)
      keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(key, mb["_index"]))
      k_drop, k_lat, k_noise = keys[:, 0], keys[:, 1], keys[:, 2]
      if cached:  # the cache's f0 features hold this compute dtype's values, as float32
        feats = pooling.pool(mb["clip_f0"].astype(self.dtype), self.tokens)
        moments = (mb["vae_mean"].astype(self.dtype), mb["vae_logvar"].astype(self.dtype))
      else:
        feats = self.features(model, mb["clip"])
        moments = self.moments(model, mb["vae"])
      drop = jax.vmap(lambda k: jax.random.uniform(k, ()))(k_drop) < drop_p
      feats = jnp.where(drop[:, None, None], self.blank_features(model), feats)
      latents = self.latents(k_lat, *moments)
      draw = jax.vmap(draw_one)(k_noise, latents)
      pred = model.decoder(
        draw.noisy, draw.timesteps, feats, use_pos_embed=1.0 - drop.astype(jnp.float32)
      )
      weights = None
      if min_snr > 0:
        weights = losses.min_snr_weights(ac, draw.timesteps, min_snr, sched.prediction_type)
      loss = losses.diffusion_loss(pred, draw.target, weights)
      return loss, {"diffusion_mse": loss, "dropped": jnp.mean(drop.astype(jnp.float32))}

    return steps.mean_loss_step(loss_fn, int(cfg.seed), n, "vae_mean" if cached else "clip", tx)

  def summarize(self, summed: dict, n_steps: int) -> dict:
    return {
      k: float(summed[k]) / n_steps for k in ("loss", "grad_norm", "diffusion_mse", "dropped")
    }

  def flops_per_token(self) -> None:
    return None  # diffusion steps are counted in images/s (`throughput`)

  def throughput(self, global_batch: int, steps_per_s: float) -> dict:
    return {"images_per_s": global_batch * steps_per_s}

  def evaluate(self, graphdef, state, frozen, rest, mesh) -> dict:
    """Reconstructs a few held-out images with the current decoder (CFG sampling with the
    configured sampler, steps and guidance), writes `samples/step_N.png` (inputs above, samples
    below) and returns their mean absolute pixel error and mean PSNR (dB; this scale's
    reconstruction PSNR, CLIP features -> decoder -> VAE, on uint8 images)."""
    from PIL import Image

    model = nnx.merge(graphdef, frozen, state.params, rest)
    batch = next(self.train_data("eval"))
    n = min(int(self.config.train.sample_images), len(batch["clip"]))
    clip_u8, target = jnp.asarray(batch["clip"][:n]), np.asarray(batch["vae"][:n])
    feats = self.features(model, clip_u8)
    blank = self.blank_features(model)
    if self._sampler is None:
      t = self.config.train
      settings = sampler_lib.SamplerSettings(
        num_steps=int(t.sample_steps),
        guidance_scale=float(t.sample_guidance),
        scheduler=str(t.sample_scheduler),
      )
      self._sampler = sampler_lib.DecoderSampler(
        model.decoder, model.vae, settings, scheduler_config=self.sched
      )
    else:
      self._sampler.set_weights(model.decoder)  # the VAE is frozen
    samp = self._sampler
    images = sampler_lib.to_uint8(
      samp(feats, jnp.broadcast_to(blank, feats.shape), sampler_lib.sample_keys(0, n))
    )
    step = int(state.step)
    if jax.process_index() == 0 and self.workdir is not None:
      out = Path(self.workdir) / "samples"
      out.mkdir(parents=True, exist_ok=True)
      grid = np.concatenate([np.concatenate(list(target), 1), np.concatenate(list(images), 1)], 0)
      Image.fromarray(grid).save(out / f"step_{step}.png")
    psnr = metrics_lib.psnr(images / 255.0, target / 255.0)
    return {
      "sample_abs_error": float(
        np.abs(images.astype(np.float32) - target.astype(np.float32)).mean() / 255
      ),
      # Capped: an exact sample would make the mean infinite.
      "sample_psnr": float(np.mean(np.minimum(np.asarray(psnr), 100.0))),
    }
