"""Reconstruction pipeline: CLIP features at a scale -> decoder -> VAE, and its CLI."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax import reconstruct
from puma_jax.diffusion import sampler as SM
from puma_jax.features import synthetic_image
from puma_jax.models import clip, pooling
from puma_jax.models import vae as V
from tests.test_sampler import ToyDecoder
from tests.utils import rel_err


def _parts(tokens=16):
  cm = clip.CLIPVisionModel(clip.tiny(), rngs=nnx.Rngs(0))
  dec = ToyDecoder(0, n=tokens, d=cm.config.hidden_size)
  vae = V.AutoencoderKL(V.tiny_config(), rngs=nnx.Rngs(1))
  return cm, dec, vae


def test_reconstructor_toy_decoder():
  cm, dec, vae = _parts(16)
  rec = reconstruct.Reconstructor(cm, dec, vae, "f2", SM.SamplerSettings(num_steps=3))
  imgs = [synthetic_image(40, seed=i) for i in range(2)]
  pix = clip.preprocess_pil(imgs, 32)
  want = pooling.multi_granular(clip.patch_features(cm, jnp.asarray(pix)))[2]
  assert rel_err(rec.features(imgs), want) < 1e-5
  black = clip.preprocess_pil([np.zeros((32, 32, 3), np.uint8)], 32)
  black_want = pooling.multi_granular(clip.patch_features(cm, jnp.asarray(black)))[2]
  assert rel_err(rec.uncond, black_want) < 1e-5
  out = rec(imgs, seed=5, samples_per_image=2)
  assert out.shape == (4, 16, 16, 3)
  # The same as driving the sampler directly with the same per-sample keys.
  direct = rec.sampler(jnp.repeat(want, 2, axis=0), rec.uncond, SM.sample_keys(5, 4))
  assert rel_err(out, direct) < 1e-5
  assert rel_err(out[0], out[1]) > 1e-3  # two samples of one image differ (seeded per sample)


def test_scale_decoder_mismatch():
  cm, dec, vae = _parts(16)
  with pytest.raises(ValueError, match=r"num_tokens=16 \(scale f2\)"):
    reconstruct.Reconstructor(cm, dec, vae, "f0")
  with pytest.raises(ValueError, match="unknown scale"):
    reconstruct.Reconstructor(cm, dec, vae, "f9")


def test_output_paths():
  assert [p.name for p in reconstruct.output_paths("a/out.png", 1)] == ["out.png"]
  assert [p.name for p in reconstruct.output_paths("a/out.png", 2)] == ["out_0.png", "out_1.png"]
