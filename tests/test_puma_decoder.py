"""PUMA decoder: parity with a PyTorch reference of the public module, conversion, bad input."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax import checkpoints, sharding
from puma_jax.convert import ConversionError, import_module
from puma_jax.convert.__main__ import main as convert_main
from puma_jax.models import puma_decoder as pd
from tests import unet_ref
from tests.utils import rel_err

# The PUMA UNet: SDXL's layout without text_time, context width 32, features 16-d.
UNET_KW = {
  k: v
  for k, v in unet_ref.CONFIGS["sdxl_like"].items()
  if k
  not in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
}
UNET_KW["sample_size"] = 8
FEAT, CTX = 16, 32


class TorchPuma:
  """The public module's computation: unet(sample, t, mapping_layer(features) + embed_img_pos)."""

  def __init__(self, num_tokens: int, use_embeds: bool, seed: int):
    import torch

    self.unet = unet_ref.torch_unet(dict(UNET_KW, cross_attention_dim=CTX), seed=seed)
    self.mapping_layer = torch.nn.Linear(FEAT, CTX)
    # Larger than the public init (std 0.02) so that a wrong or missing one shows.
    self.embed_img_pos = torch.randn(1, num_tokens, CTX) * 0.5 if use_embeds else None

  def __call__(self, x, features, use_pos=True):
    import torch

    with torch.no_grad():
      ctx = self.mapping_layer(torch.from_numpy(features))
      if self.embed_img_pos is not None and use_pos:
        ctx = ctx + self.embed_img_pos
    return unet_ref.torch_forward(self.unet, dict(x, context=ctx.numpy()))

  def save_public(
    self, directory, config_fields: dict | None = None, addition_embed_type="text_time", drop=()
  ):
    """The public layout: diffusers UNet dir whose safetensors also hold the PUMA tensors."""
    extra = {
      "mapping_layer.weight": self.mapping_layer.weight.detach().clone(),
      "mapping_layer.bias": self.mapping_layer.bias.detach().clone(),
    }
    if self.embed_img_pos is not None:
      extra["embed_img_pos"] = self.embed_img_pos.clone()
    extra = {k: v for k, v in extra.items() if k not in drop}
    unet_ref.save_state_dict(self.unet, directory, drop=drop, extra=extra)
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    # PUMA's UNet ignores whatever addition_embed_type says.
    cfg["addition_embed_type"] = addition_embed_type
    cfg.update(config_fields or {})
    path.write_text(json.dumps(cfg))
    return directory


def _inputs(num_tokens, seed, batch=2):
  x = unet_ref.inputs(dict(UNET_KW, cross_attention_dim=CTX), batch=batch, seed=seed)
  feats = np.random.default_rng(seed).standard_normal((batch, num_tokens, FEAT), np.float32)
  return x, feats


def test_parity_256_tokens_with_positional_embedding(tmp_path):
  ref_model = TorchPuma(256, True, seed=0)
  # config.json without the PUMA fields: they come from the shapes and the folder name.
  src = ref_model.save_public(tmp_path / "unet_256")
  assert convert_main(["puma-decoder", f"--src={src}", f"--dst={tmp_path / 'out'}"]) == 0
  dec = checkpoints.load_module(tmp_path / "out", family="puma-decoder")
  c = dec.config
  assert (c.num_tokens, c.use_embeds, c.mapping_dim, c.mapping_dim1) == (256, True, FEAT, CTX)
  assert c.unet.addition_embed_type is None
  x, feats = _inputs(256, seed=1)
  fwd = unet_ref.jit_forward(dec)
  cond = ref_model(x, feats, use_pos=True)
  uncond = ref_model(x, feats, use_pos=False)
  out = fwd(x["sample"], x["timesteps"], feats)
  assert rel_err(out, cond) < 1e-4
  assert rel_err(uncond, cond) > 1e-2  # the positional embedding matters
  # Per-example weights: both CFG branches in one batch.
  out = fwd(x["sample"], x["timesteps"], feats, use_pos_embed=jnp.array([1.0, 0.0]))
  assert rel_err(out[:1], cond[:1]) < 1e-4
  assert rel_err(out[1:], uncond[1:]) < 1e-4
  # use_pos_embed=False is the mapping alone.
  np.testing.assert_allclose(
    dec.context(feats, use_pos_embed=False), dec.mapping_layer(jnp.asarray(feats)), rtol=1e-6
  )


def test_parity_16_tokens_without_positional_embedding(tmp_path):
  ref_model = TorchPuma(16, False, seed=1)
  src = ref_model.save_public(
    tmp_path / "decoder", dict(mapping_dim=FEAT, mapping_dim1=CTX, num_tokens=16, use_embeds=False)
  )
  dec, cfg = import_module("puma-decoder", src)
  assert (cfg.num_tokens, cfg.use_embeds, dec.embed_img_pos) == (16, False, None)
  x, feats = _inputs(16, seed=2)
  out = unet_ref.jit_forward(dec)(x["sample"], x["timesteps"], feats)
  assert rel_err(out, ref_model(x, feats)) < 1e-4


def test_real_size_parameter_counts():
  count = lambda cfg: sharding.count_params(
    nnx.eval_shape(lambda: pd.PumaDecoder(cfg, rngs=nnx.Rngs(0)))
  )
  assert count(pd.puma_decoder_config(16)) == 2_562_218_244 + 2_099_200
  assert count(pd.puma_decoder_config(256)) == 2_562_218_244 + 2_099_200 + 524_288
  cfg = pd.puma_decoder_config(64)
  assert (cfg.unet.sample_size, cfg.unet.in_channels, cfg.num_tokens) == (128, 4, 64)


def test_config_round_trip_and_validation():
  cfg = pd.tiny_config(256)
  assert pd.PumaDecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  with pytest.raises(ValueError, match="num_tokens=7"):
    pd.puma_decoder_config(7)
  with pytest.raises(ValueError, match="addition_embed_type"):
    pd.PumaDecoderConfig(unet=pd.unet.sdxl_unet_config())
  with pytest.raises(ValueError, match="mapping_dim1=1024"):
    pd.PumaDecoderConfig(mapping_dim1=1024)


def test_bad_features():
  dec = pd.PumaDecoder(pd.tiny_config(16), rngs=nnx.Rngs(0))
  x = np.zeros((1, 16, 16, 4), np.float32)
  with pytest.raises(ValueError, match="width 1024.*mapping_dim=16"):
    dec(x, 10, np.zeros((1, 16, 1024), np.float32))
  with pytest.raises(ValueError, match="16 tokens got features with 256 tokens"):
    dec(x, 10, np.zeros((1, 256, 16), np.float32))
  with pytest.raises(ValueError, match="batch"):
    pd.PumaDecoder(pd.tiny_config(256), rngs=nnx.Rngs(0)).context(
      np.zeros((2, 256, 16), np.float32), use_pos_embed=np.ones(3)
    )


@pytest.fixture(scope="module")
def public_256(tmp_path_factory):
  ref_model = TorchPuma(256, True, seed=2)
  return ref_model, ref_model.save_public(tmp_path_factory.mktemp("p") / "unet_256")


def test_wrong_scale_checkpoint(public_256, tmp_path):
  ref_model, src = public_256
  # Loaded as the 16-token decoder (explicit config): named, before any generic mapping error.
  cfg16 = pd.PumaDecoderConfig(
    unet=pd.unet.UNetConfig(**{**UNET_KW, "cross_attention_dim": CTX, "addition_embed_type": None}),
    mapping_dim=FEAT,
    mapping_dim1=CTX,
    num_tokens=16,
    use_embeds=False,
  )
  with pytest.raises(ConversionError, match=r"embed_img_pos \(1, 256, 32\).*16-token"):
    import_module("puma-decoder", src, config=cfg16)
  with pytest.raises(ConversionError, match=r"embed_img_pos has shape \(1, 256, 32\)"):
    import_module("puma-decoder", src, config=cfg16.replace(use_embeds=True))
  # The 256-token weights in a folder named for 16 tokens.
  wrong = ref_model.save_public(tmp_path / "unet_16")
  with pytest.raises(ConversionError, match="folder name unet_16 says 16"):
    import_module("puma-decoder", wrong)


def test_missing_tensors(public_256, tmp_path):
  ref_model, _ = public_256
  src = ref_model.save_public(tmp_path / "unet_256", drop=("embed_img_pos",))
  with pytest.raises(ConversionError, match="embed_img_pos"):
    import_module("puma-decoder", src)
  src = ref_model.save_public(tmp_path / "b" / "unet_256", drop=("mapping_layer.bias",))
  with pytest.raises(ConversionError, match=r"mapping_layer\.bias"):
    import_module("puma-decoder", src)
  assert convert_main(["puma-decoder", f"--src={src}", f"--dst={tmp_path / 'o'}"]) == 2
