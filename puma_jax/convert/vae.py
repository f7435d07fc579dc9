"""The SDXL VAE: a diffusers `AutoencoderKL` directory (`config.json` +
`diffusion_pytorch_model.safetensors`), e.g. `stable-diffusion-xl-base-1.0/vae/`.

The mid-block attention exists under two names in the wild: `to_q/to_k/to_v/to_out.0` (current
diffusers) and `query/key/value/proj_attn` (checkpoints saved before diffusers 0.14, which
diffusers still renames on load); some conversions store these weights as 1x1 convs
(O, I, 1, 1). All are accepted.
"""

from __future__ import annotations

from pathlib import Path

from puma_jax.convert import config_check
from puma_jax.convert.core import (
  ConversionError,
  Rule,
  conv1x1_as_linear,
  conv2d,
  public_config,
  read_json,
)
from puma_jax.models import layers
from puma_jax.models.vae import VAEConfig

FAMILY = "vae"

_FIELDS = (
  "in_channels",
  "out_channels",
  "down_block_types",
  "up_block_types",
  "block_out_channels",
  "layers_per_block",
  "act_fn",
  "latent_channels",
  "norm_num_groups",
  "sample_size",
  "scaling_factor",
  "shift_factor",
  "force_upcast",
  "use_quant_conv",
  "use_post_quant_conv",
  "mid_block_add_attention",
)
# Fields that do not change the computation (statistics for other latent normalizations).
_IGNORED = ("latents_mean", "latents_std")


def config_from_diffusers(d: dict, where: str = "config.json") -> VAEConfig:
  cls = d.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise ConversionError(f"{where}: _class_name={cls!r}; only AutoencoderKL is supported")
  act = config_check.check_value(VAEConfig, "act_fn", d.get("act_fn", "silu"), where)
  if act not in layers.ACTIVATIONS:
    raise ConversionError(f"{where}: unsupported act_fn={act!r}")
  for k in _IGNORED:
    if d.get(k) is not None:
      raise ConversionError(
        f"{where}: {k} is set; latent mean/std normalization (not SDXL's) is not supported"
      )
  unknown = sorted(set(public_config(d)) - set(_FIELDS) - set(_IGNORED))
  if unknown:
    raise ConversionError(f"{where}: unknown VAE config field(s) {unknown}")
  kw = {k: (tuple(d[k]) if isinstance(d[k], list) else d[k]) for k in _FIELDS if k in d}
  if isinstance(kw.get("sample_size"), tuple) and kw["sample_size"]:
    kw["sample_size"] = kw["sample_size"][0]
  return config_check.build(VAEConfig, kw, where)


def load_config(src: Path) -> VAEConfig:
  path = Path(src) / "config.json"
  return config_from_diffusers(read_json(path), str(path))


def _resnet(src: str, dst: str) -> list[Rule]:
  out = []
  for conv in ("conv1", "conv2", "conv_shortcut"):
    out += [
      Rule(f"{src}.{conv}.weight", f"{dst}.{conv}.kernel", conv2d),
      Rule(f"{src}.{conv}.bias", f"{dst}.{conv}.bias"),
    ]
  for norm in ("norm1", "norm2"):
    out += [
      Rule(f"{src}.{norm}.weight", f"{dst}.{norm}.scale"),
      Rule(f"{src}.{norm}.bias", f"{dst}.{norm}.bias"),
    ]
  return out


def _attention(src: str, dst: str) -> list[Rule]:
  out = [
    Rule(f"{src}.group_norm.weight", f"{dst}.group_norm.scale"),
    Rule(f"{src}.group_norm.bias", f"{dst}.group_norm.bias"),
  ]
  names = {
    "to_q": ("to_q", "query"),
    "to_k": ("to_k", "key"),
    "to_v": ("to_v", "value"),
    "to_out": ("to_out.0", "proj_attn"),
  }
  for ours, theirs in names.items():
    for name in theirs:
      out += [
        Rule(f"{src}.{name}.weight", f"{dst}.{ours}.kernel", conv1x1_as_linear()),
        Rule(f"{src}.{name}.bias", f"{dst}.{ours}.bias"),
      ]
  return out


def _conv(src: str, dst: str) -> list[Rule]:
  return [Rule(f"{src}.weight", f"{dst}.kernel", conv2d), Rule(f"{src}.bias", f"{dst}.bias")]


def rules(config: VAEConfig) -> list[Rule]:
  del config
  table = []
  for part in ("encoder", "decoder"):
    table += _conv(f"{part}.conv_in", f"{part}.conv_in")
    table += _conv(f"{part}.conv_out", f"{part}.conv_out")
    table += [
      Rule(f"{part}.conv_norm_out.weight", f"{part}.conv_norm_out.scale"),
      Rule(f"{part}.conv_norm_out.bias", f"{part}.conv_norm_out.bias"),
    ]
    table += _resnet(f"{part}.mid_block.resnets.{{j}}", f"{part}.mid_block.resnets.{{j}}")
    table += _attention(f"{part}.mid_block.attentions.0", f"{part}.mid_block.attention")
  table += _resnet("encoder.down_blocks.{i}.resnets.{j}", "encoder.down_blocks.{i}.resnets.{j}")
  table += _conv(
    "encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down_blocks.{i}.downsample.conv"
  )
  table += _resnet("decoder.up_blocks.{i}.resnets.{j}", "decoder.up_blocks.{i}.resnets.{j}")
  table += _conv("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.up_blocks.{i}.upsample.conv")
  table += _conv("quant_conv", "quant_conv") + _conv("post_quant_conv", "post_quant_conv")
  return table
