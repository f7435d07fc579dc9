"""SDXL VAE (AutoencoderKL): parity with diffusers through convert + load_module."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax import checkpoints, convert, sharding
from puma_jax.convert import core
from puma_jax.models import vae
from tests.utils import randomize_norms, rel_err

import torch
import diffusers

CONFIGS = {
  # SDXL's topology (4 levels, mid attention) at toy width
  "sdxl_small": dict(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4),
  # no quant convs, no mid attention, 3 levels, gelu, non-square latent
  "variant": dict(
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=8,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
    act_fn="gelu",
    latent_channels=3,
  ),
  # one level (no down/upsampling), 1 channel in, 2 out
  "flat": dict(
    block_out_channels=(12,),
    layers_per_block=1,
    norm_num_groups=3,
    in_channels=1,
    out_channels=2,
    latent_channels=2,
  ),
}


def _torch_vae(kw, seed):
  torch.manual_seed(seed)
  n = len(kw["block_out_channels"])
  m = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * n,
    up_block_types=("UpDecoderBlock2D",) * n,
    sample_size=32,
    scaling_factor=0.13025,
    **kw,
  ).eval()
  randomize_norms(m, seed)
  # Default init gives near-identity residual blocks: make the convs matter.
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith("bias") and "norm" not in name:
        p.copy_(0.1 * torch.randn(p.shape))
  return m


def _save(m, path, rename=None):
  m.save_pretrained(path, safe_serialization=True)
  if rename:
    f = path / "diffusion_pytorch_model.safetensors"
    tensors = {rename(k, v)[0]: rename(k, v)[1] for k, v in core.read_safetensors(f).items()}
    core.write_safetensors({k: np.array(v) for k, v in tensors.items()}, f)
  return path


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_diffusers(tmp_path, name):
  kw = CONFIGS[name]
  tm = _torch_vae(kw, seed=len(name))
  src = _save(tm, tmp_path / "src")
  dst = convert.convert("vae", src, tmp_path / "dst")
  model = checkpoints.load_module(dst, family="vae")
  assert model.config.scaling_factor == 0.13025

  rng = np.random.RandomState(0)
  hw = (24, 16) if name == "variant" else (16, 16)
  x = rng.uniform(-1, 1, (2, kw.get("in_channels", 3)) + hw).astype(np.float32)
  with torch.no_grad():
    dist = tm.encode(torch.from_numpy(x)).latent_dist
    mean_ref, logvar_ref = dist.mean.numpy(), dist.logvar.numpy()
    z = rng.randn(*mean_ref.shape).astype(np.float32)
    img_ref = tm.decode(torch.from_numpy(z)).sample.numpy()
  nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
  mean, logvar = model.encode_moments(jnp.asarray(nhwc(x)))
  assert rel_err(mean, nhwc(mean_ref)) < 1e-4
  assert rel_err(logvar, nhwc(logvar_ref)) < 1e-4
  assert rel_err(model.encode(jnp.asarray(nhwc(x))), nhwc(mean_ref)) < 1e-4
  img = model.decode(jnp.asarray(nhwc(z)))
  assert img.shape == nhwc(img_ref).shape
  print(
    f"vae {name}: encode {rel_err(mean, nhwc(mean_ref)):.2e} decode "
    f"{rel_err(img, nhwc(img_ref)):.2e}"
  )
  assert rel_err(img, nhwc(img_ref)) < 1e-4


@pytest.mark.parametrize("scheme", ["legacy", "legacy_conv1x1", "conv1x1"])
def test_attention_naming_schemes(tmp_path, scheme):
  kw = CONFIGS["sdxl_small"]
  tm = _torch_vae(kw, seed=3)
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def rename(k, v):
    if ".attentions." in k:
      if scheme.startswith("legacy"):
        for new, old in legacy.items():
          k = k.replace(f".{new}.", f".{old}.")
      if scheme.endswith("conv1x1") and k.endswith("weight") and v.ndim == 2:
        v = v[:, :, None, None]
    return k, v

  src = _save(tm, tmp_path / "src", rename)
  names = core.read_safetensors(src / "diffusion_pytorch_model.safetensors")
  assert any(("query" if scheme.startswith("legacy") else "to_q") in k for k in names)
  model, _ = convert.import_module("vae", src)
  z = np.random.RandomState(1).randn(1, 4, 4, 4).astype(np.float32)
  with torch.no_grad():
    ref = tm.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
  assert rel_err(model.decode(jnp.asarray(z.transpose(0, 2, 3, 1))), ref) < 1e-4


def test_bf16_compute(tmp_path):
  """bf16 compute (float32 parameters) stays within the error PyTorch itself makes in bf16.

  With random weights and biases this 4-level network amplifies rounding: torch's own bf16 run is
  ~4.5e-2 off its float32 run here, so the bound is relative to that, not a flat 1e-2.
  """
  tm = _torch_vae(CONFIGS["sdxl_small"], seed=5)
  dst = convert.convert("vae", _save(tm, tmp_path / "src"), tmp_path / "dst")
  m32 = checkpoints.load_module(dst)
  m16 = checkpoints.load_module(dst, dtype=jnp.bfloat16)
  z = np.random.RandomState(2).randn(1, 4, 4, 4).astype(np.float32)
  zt = torch.from_numpy(z.transpose(0, 3, 1, 2))
  with torch.no_grad():
    ref = tm.decode(zt).sample.numpy().transpose(0, 2, 3, 1)
    torch16 = (
      tm.to(torch.bfloat16).decode(zt.bfloat16()).sample.float().numpy().transpose(0, 2, 3, 1)
    )
  out16 = m16.decode(jnp.asarray(z))
  assert out16.dtype == jnp.bfloat16
  assert rel_err(m32.decode(jnp.asarray(z)), ref) < 1e-4
  assert rel_err(out16.astype(jnp.float32), ref) < max(1e-2, 1.5 * rel_err(torch16, ref))


def test_sdxl_param_count():
  abstract = nnx.eval_shape(lambda: vae.AutoencoderKL(vae.sdxl_vae_config(), rngs=nnx.Rngs(0)))
  assert sharding.count_params(abstract) == 83_653_863


def test_sharded_equals_unsharded():
  cfg = vae.small_config()
  model = vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
  ref = model(x)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = sharding.init_sharded(lambda: vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, state = nnx.split(sharded)
  with sharding.use_mesh(mesh):
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  assert rel_err(out, ref) < 1e-5


def test_sample_latent_statistics():
  model = vae.AutoencoderKL(vae.tiny_config(), rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 3), minval=-1, maxval=1)
  mean, logvar = model.encode_moments(x)
  draws = jax.vmap(lambda k: model.sample_latent(k, x))(jax.random.split(jax.random.key(2), 512))
  std = np.asarray(jnp.exp(0.5 * logvar))
  err = np.abs(np.asarray(draws.mean(0)) - np.asarray(mean)).max()
  assert err < 4 * std.max() / np.sqrt(512) + 1e-6
  assert rel_err(draws.std(0), std) < 0.2


def test_bad_inputs(tmp_path):
  model = vae.AutoencoderKL(vae.tiny_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="latent_channels=4"):
    model.decode(jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="NCHW"):
    model.decode(jnp.zeros((1, 4, 8, 8)))
  with pytest.raises(ValueError, match="in_channels=3"):
    model.encode(jnp.zeros((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="norm_num_groups"):
    vae.config_with_blocks((10,))
  with pytest.raises(ValueError, match="down_block_types"):
    vae.VAEConfig(down_block_types=("AttnDownEncoderBlock2D",) * 4)
  # A checkpoint whose config disagrees with its tensors.
  tm = _torch_vae(CONFIGS["sdxl_small"], seed=1)
  src = _save(tm, tmp_path / "src")
  cfg = json.loads((src / "config.json").read_text())
  cfg["latent_channels"] = 8
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(core.ConversionError, match="decoder.conv_in"):
    convert.import_module("vae", src)
  cfg["latents_mean"] = [0.0] * 4
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(core.ConversionError, match="latents_mean"):
    convert.import_module("vae", src)
