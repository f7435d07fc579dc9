"""SDXL UNet: a diffusers `UNet2DConditionModel` directory (config.json + weights).

Weights: `diffusion_pytorch_model.safetensors` (or sharded, or `.bin`), or the `fp16` variant
file names (`diffusion_pytorch_model.fp16.safetensors`, ...) that the hub's SDXL repo ships.
Fields of config.json that select features this implementation does not have (class embeddings,
encoder_hid_proj, GLIGEN, ...) raise `ConversionError` naming the field, unless they hold
diffusers' default (the feature off).
"""

from __future__ import annotations

from pathlib import Path

from puma_jax.convert import config_check
from puma_jax.convert.core import (
  WEIGHT_FILES,
  ConversionError,
  Rule,
  conv1x1_as_linear,
  conv2d,
  identity,
  linear,
  public_config,
  read_checkpoint,
  read_indexed,
  read_json,
)
from puma_jax.models.unet import UNetConfig

FAMILY = "sdxl-unet"

_FIELDS = (
  "sample_size",
  "in_channels",
  "out_channels",
  "center_input_sample",
  "flip_sin_to_cos",
  "freq_shift",
  "down_block_types",
  "mid_block_type",
  "up_block_types",
  "block_out_channels",
  "layers_per_block",
  "downsample_padding",
  "mid_block_scale_factor",
  "act_fn",
  "norm_num_groups",
  "norm_eps",
  "cross_attention_dim",
  "transformer_layers_per_block",
  "reverse_transformer_layers_per_block",
  "attention_head_dim",
  "num_attention_heads",
  "use_linear_projection",
  "upcast_attention",
  "addition_embed_type",
  "addition_time_embed_dim",
  "projection_class_embeddings_input_dim",
  "time_embedding_dim",
  "conv_in_kernel",
  "conv_out_kernel",
)

# Fields whose only supported value is diffusers' default (the feature switched off).
_MUST_BE = {
  "only_cross_attention": (False,),
  "dual_cross_attention": (False,),
  "class_embed_type": (None,),
  "num_class_embeds": (None,),
  "class_embeddings_concat": (False,),
  "encoder_hid_dim": (None,),
  "encoder_hid_dim_type": (None,),
  "time_embedding_type": ("positional",),
  "time_embedding_act_fn": (None,),
  "timestep_post_act": (None,),
  "time_cond_proj_dim": (None,),
  "resnet_time_scale_shift": ("default",),
  "resnet_skip_time_act": (False,),
  "resnet_out_scale_factor": (1, 1.0),
  "attention_type": ("default",),
  "mid_block_only_cross_attention": (None, False),
  "cross_attention_norm": (None,),
  # Dropout is an identity at inference; a non-zero rate would make training differ.
  "dropout": (0, 0.0),
}
# Public fields irrelevant to the computation (private `_*` keys are dropped first).
_IGNORED = ("addition_embed_type_num_heads",)


def config_from_diffusers(d: dict, where: str = "config.json", *, extra_ignored=()) -> UNetConfig:
  d = public_config(d)
  for key, allowed in _MUST_BE.items():
    if (
      key in d
      and d[key] not in allowed
      and not (isinstance(d[key], list) and all(v in allowed for v in d[key]))
    ):
      raise ConversionError(
        f"{where}: unsupported {key}={d[key]!r} (supported: {' or '.join(map(repr, allowed))})"
      )
  unknown = sorted(set(d) - set(_FIELDS) - set(_MUST_BE) - set(_IGNORED) - set(extra_ignored))
  if unknown:
    raise ConversionError(f"{where}: unknown UNet config field(s) {unknown}")
  kw = {k: d[k] for k in _FIELDS if k in d}
  if kw.get("norm_num_groups", 32) is None:
    raise ConversionError(f"{where}: norm_num_groups=None (no output norm) is not supported")
  return config_check.build(UNetConfig, kw, where)


def load_config(src: Path) -> UNetConfig:
  path = Path(src) / "config.json"
  return config_from_diffusers(read_json(path), str(path))


def _norm(src: str, dst: str) -> list[Rule]:
  return [Rule(src + ".weight", dst + ".scale"), Rule(src + ".bias", dst + ".bias")]


def _lin(src: str, dst: str, hook=linear, bias: bool = True) -> list[Rule]:
  out = [Rule(src + ".weight", dst + ".kernel", hook)]
  return out + [Rule(src + ".bias", dst + ".bias", identity)] if bias else out


def _conv(src: str, dst: str) -> list[Rule]:
  return _lin(src, dst, conv2d)


def rules(config: UNetConfig, prefix: str = "") -> list[Rule]:
  """Name table; `prefix` is prepended to our side (PUMA's decoder nests the UNet as `unet.`)."""
  p = prefix
  proj = linear if config.use_linear_projection else conv1x1_as_linear()
  r, R = "{b*}.resnets.{j}.", p + "{b*}.resnets.{j}."
  a, A = "{b*}.attentions.{j}.", p + "{b*}.attentions.{j}."
  t, T = a + "transformer_blocks.{k}.", A + "transformer_blocks.{k}."
  table = _conv("conv_in", p + "conv_in") + _conv("conv_out", p + "conv_out")
  table += _norm("conv_norm_out", p + "conv_norm_out")
  table += _lin("time_embedding.linear_{n}", p + "time_embedding.linear_{n}")
  if config.addition_embed_type == "text_time":
    table += _lin("add_embedding.linear_{n}", p + "add_embedding.linear_{n}")
  table += _norm(r + "norm{n}", R + "norm{n}")
  for c in ("conv1", "conv2", "conv_shortcut"):
    table += _conv(r + c, R + c)
  table += _lin(r + "time_emb_proj", R + "time_emb_proj")
  table += _norm(a + "norm", A + "norm")
  table += _lin(a + "proj_in", A + "proj_in", proj) + _lin(a + "proj_out", A + "proj_out", proj)
  table += _norm(t + "norm{n}", T + "norm{n}")
  for qkv in ("to_q", "to_k", "to_v"):
    table += _lin(t + "attn{n}." + qkv, T + "attn{n}." + qkv, bias=False)
  table += _lin(t + "attn{n}.to_out.0", T + "attn{n}.to_out")
  table += _lin(t + "ff.net.0.proj", T + "ff.proj") + _lin(t + "ff.net.2", T + "ff.out")
  table += _conv("{b*}.downsamplers.0.conv", p + "{b*}.downsampler.conv")
  table += _conv("{b*}.upsamplers.0.conv", p + "{b*}.upsampler.conv")
  return table


_VARIANT_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


def read_tensors(src: Path) -> dict:
  """diffusers weights; the `fp16` variant names (single or sharded) when the plain ones are
  absent, as in the hub's SDXL repository."""
  src = Path(src)
  if (
    not src.is_dir()
    or any(src.glob("*.index.json"))
    or any((src / f).exists() for f in WEIGHT_FILES)
  ):
    return read_checkpoint(src)
  for name in _VARIANT_FILES:
    if (src / name).exists():
      return read_checkpoint(src / name)
  for index_path in sorted(src.glob("*.index.fp16.json")):
    return read_indexed(index_path, src, read_file=read_checkpoint)
  return read_checkpoint(src)  # raises, listing what the directory holds
