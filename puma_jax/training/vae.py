"""The VAE stage: trains an AutoencoderKL (encoder and decoder) to reconstruct images.

PUMA itself keeps a pretrained SDXL VAE frozen (PUMA paper, appendix 7.1); this stage exists
for machines without one (the tiny demo, docs/DESIGN.md §5): the decoders then denoise in the
latent space of a VAE trained here.

Objective per example, pixels in [-1, 1]:
  recon(decode(z), x) + kl_weight x KL(N(mean, var) || N(0, 1)),   z = mean + std x N(0, 1)
`recon` is `loss.recon`: "mse" (default) or "l1", the mean over pixels. MSE is the default: it
is what PSNR measures, and on the synthetic scenes (small flat shapes on a flat background) an
L1 pulls every pixel towards the median, the background: L1 runs of the demo blurred the shapes
into faint blobs where MSE keeps their colours. The KL is the mean over latent elements; its
small weight (1e-6, the order of the SD VAE's) keeps the posterior a distribution the decoder
stage can draw from (`AutoencoderKL.sample_latent`) without costing reconstruction; it does not
hold the latents at unit scale. The decoder stage multiplies latents by the config's
`scaling_factor`: set it to 1 / the latent std this stage reports at eval (`eval/latent_std`),
as configs/vae.py's demo variant does (docs/DESIGN.md §5).

Every random draw of an example comes from fold_in(step key, its index in the global batch), so
an accumulated step equals one big batch (as in the decoder stage).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from puma_jax import precision
from puma_jax.diffusion import sampler as sampler_lib
from puma_jax.evaluation import metrics as metrics_lib
from puma_jax.models import vae as vae_lib
from puma_jax.training import data as data_lib, optim, steps
from puma_jax.training.decoder import example_keys

RECON_LOSSES = ("l1", "mse")


class VAETrainModel(nnx.Module):
  """The VAE under `vae` (param paths `vae.encoder...`, as in the decoder stage's model)."""

  def __init__(self, vae_cfg, *, dtype, rngs):
    self.vae = vae_lib.AutoencoderKL(vae_cfg, dtype=dtype, rngs=rngs)


class VAEEncoder:
  """Example -> {"vae": uint8 VAE view} of its (last) image."""

  def __call__(self, ex):
    if not ex.vae_images:
      raise ValueError(
        f"example {ex.key} has no VAE view (set data.image.vae_size to the VAE's image size)"
      )
    return {"vae": ex.vae_images[-1]}


def to_pixels(images_uint8: jax.Array) -> jax.Array:
  """uint8 -> [-1, 1] float32 (the decoder stage's VAE input scaling)."""
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def kl_to_standard(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per element."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


class VAEStage:
  """Trains the VAE of `config.model.vae` (see `training.stage.Stage` for the members)."""

  progress_keys = ("recon", "kl")
  frozen = nnx.Nothing  # everything is trained
  loads_pretrained = False  # always from random weights (a pretrained VAE needs no training)

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path | None = None):
    self.config = config
    self.workdir = workdir  # reconstruction grids go to workdir/samples
    self.vae_cfg = vae_lib.VAEConfig.from_dict(config.model.vae.to_dict())
    self.recon = str(config.loss.recon)
    if self.recon not in RECON_LOSSES:
      raise ValueError(f"config.loss.recon={self.recon!r}: choose from {RECON_LOSSES}")
    self.kl_weight = float(config.loss.kl_weight)
    if self.kl_weight < 0:
      raise ValueError(f"config.loss.kl_weight={self.kl_weight} must be >= 0")
    self.dtype = jnp.dtype(precision.resolve(str(config.precision)))
    self._eval_fn = None

  def build(self, rngs):
    return VAETrainModel(self.vae_cfg, dtype=self.dtype, rngs=rngs)

  def meta(self) -> dict:
    return {"stage": "vae", "vae": self.vae_cfg.to_dict()}

  def load_pretrained(self, model) -> None:
    del model  # nothing to load: `loads_pretrained` is False

  def optimizer(self, params):
    return optim.make(self.config.optim, params)

  def train_data(self, split: str = "train"):
    dcfg = self.config.data
    size = int(dcfg.image.vae_size)
    if size <= 0 or size % self.vae_cfg.downsample_factor:
      raise ValueError(
        f"data.image.vae_size={size} must be a positive multiple of the VAE's downsampling "
        f"factor {self.vae_cfg.downsample_factor}"
      )
    return data_lib.host_data(dcfg, split, VAEEncoder(), bool(self.config.train.same_data_on_hosts))

  def device_arrays(self, host_batch: dict) -> dict:
    return {"vae": host_batch["vae"]}

  def losses(self, vae, images_uint8, keys):
    """(recon, kl, latent mean) of a batch; `keys` one per example for the latent draw."""
    x = to_pixels(images_uint8)
    mean, logvar = vae.encode_moments(x)
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
    z = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar) * eps
    err = vae.decode(z.astype(mean.dtype)).astype(jnp.float32) - x
    recon = jnp.mean(jnp.abs(err)) if self.recon == "l1" else jnp.mean(jnp.square(err))
    return recon, jnp.mean(kl_to_standard(mean, logvar)), mean

  def train_step(self, graphdef, tx):
    kl_weight = self.kl_weight

    def loss_fn(params, mb, frozen, rest, key):
      model = nnx.merge(graphdef, frozen, params, rest)
      recon, kl, mean = self.losses(model.vae, mb["vae"], example_keys(key, mb["_index"]))
      loss = recon + kl_weight * kl
      # Second moment (not std): the microbatch means add up to the batch's.
      m2 = jnp.mean(jnp.square(mean.astype(jnp.float32)))
      return loss, {"recon": recon, "kl": kl, "latent_m2": m2}

    n = int(self.config.train.grad_accum_steps)
    return steps.mean_loss_step(loss_fn, int(self.config.seed), n, "vae", tx)

  def summarize(self, summed: dict, n_steps: int) -> dict:
    out = {k: float(summed[k]) / n_steps for k in ("loss", "grad_norm", "recon", "kl")}
    out["latent_rms"] = float(np.sqrt(float(summed["latent_m2"]) / n_steps))
    return out

  def flops_per_token(self) -> None:
    return None  # counted in images/s (`throughput`)

  def throughput(self, global_batch: int, steps_per_s: float) -> dict:
    return {"images_per_s": global_batch * steps_per_s}

  def evaluate(self, graphdef, state, frozen, rest, mesh) -> dict:
    """Held-out reconstructions through the mean latent (`train.eval_batches` batches of the
    eval split): `psnr` (dB, mean over images, on uint8-rounded outputs as any consumer sees
    them), `latent_std` (std of the latent means: the decoder stage's 1 / scaling_factor),
    `latent_mean`; writes `samples/step_N.png` (inputs above, reconstructions below)."""
    from PIL import Image

    if self._eval_fn is None:

      def run(params, frozen, rest, images):
        vae = nnx.merge(graphdef, frozen, params, rest).vae
        mean = vae.encode(to_pixels(images))
        return vae.decode(mean), mean

      self._eval_fn = jax.jit(run)
    data = self.train_data("eval")
    psnrs, latents, first = [], [], None
    for _ in range(max(1, int(self.config.train.eval_batches))):
      target = next(data)["vae"]
      out, mean = self._eval_fn(state.params, frozen, rest, jnp.asarray(target))
      recon = sampler_lib.to_uint8(out)
      psnrs.append(np.asarray(metrics_lib.psnr(recon / 255.0, target / 255.0)))
      latents.append(np.asarray(mean, np.float32))
      if first is None:
        first = (target, recon)
    psnr = np.concatenate(psnrs)
    lat = np.concatenate(latents)
    step = int(state.step)
    if jax.process_index() == 0 and self.workdir is not None:
      n = min(int(self.config.train.sample_images), len(first[0]))
      out_dir = Path(self.workdir) / "samples"
      out_dir.mkdir(parents=True, exist_ok=True)
      rows = [np.concatenate(list(x[:n]), 1) for x in first]
      Image.fromarray(np.concatenate(rows, 0)).save(out_dir / f"step_{step}.png")
    return {
      # An exact reconstruction has infinite PSNR; cap it so the mean stays a number.
      "psnr": float(np.mean(np.minimum(psnr, 100.0))),
      "latent_std": float(lat.std()),
      "latent_mean": float(lat.mean()),
    }
