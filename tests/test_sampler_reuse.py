"""One compiled sampler across evaluations: new weights, no recompilation, same images as a
sampler built from those weights."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax.diffusion import sampler as SM
from puma_jax.models import puma_decoder, vae as V

SMALL = dict(
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
  transformer_layers_per_block=(1, 1),
  attention_head_dim=(2, 4),
  sample_size=8,
)


def test_set_weights_reuses_the_compiled_sampler():
  cfg = puma_decoder.tiny_config(num_tokens=4, **SMALL)
  dec = puma_decoder.PumaDecoder(cfg, rngs=nnx.Rngs(0))
  vae = V.AutoencoderKL(V.tiny_config(), rngs=nnx.Rngs(1))
  smp = SM.DecoderSampler(dec, vae, SM.SamplerSettings(num_steps=2))
  f = jnp.asarray(np.random.RandomState(0).randn(1, 4, cfg.mapping_dim), jnp.float32)
  keys = SM.sample_keys(0, 1)
  before = smp(f, f * 0, keys)
  trained = puma_decoder.PumaDecoder(cfg, rngs=nnx.Rngs(5))  # "after more steps"
  smp.set_weights(trained)
  after = smp(f, f * 0, keys)
  assert smp._run._cache_size() == 1
  fresh = SM.DecoderSampler(trained, vae, SM.SamplerSettings(num_steps=2))(f, f * 0, keys)
  np.testing.assert_allclose(after, fresh, atol=1e-6)
  assert not np.allclose(after, before)
  other = puma_decoder.PumaDecoder(
    puma_decoder.tiny_config(num_tokens=4, **dict(SMALL, layers_per_block=2)), rngs=nnx.Rngs(0)
  )
  with pytest.raises(ValueError, match="set_weights"):
    smp.set_weights(other)
