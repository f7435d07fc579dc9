"""PUMA decoders in the public layout: `stable-diffusion-xl-base-1.0/unet_{N}/`.

Each is a diffusers `UNet2DConditionModel` directory whose weights also hold
`mapping_layer.{weight,bias}` and, for N = 256, `embed_img_pos`. The public loader passes
`mapping_dim=1024, mapping_dim1=2048, num_tokens=N, use_embeds=(N == 256)` as arguments, so
config.json may lack them: each is taken from config.json when present, else from the tensors
(mapping_layer's and embed_img_pos's shapes), else from the folder name `unet_N`; any
disagreement between these sources is an error naming both. PUMA's UNet forces
`addition_embed_type=None` whatever config.json says, and so do we.
"""

from __future__ import annotations

import re
from pathlib import Path

from puma_jax.convert import unet as unet_convert
from puma_jax.convert import config_check
from puma_jax.convert.core import ConversionError, Rule, identity, linear, read_json
from puma_jax.models.puma_decoder import PumaDecoderConfig

FAMILY = "puma-decoder"

_PUMA_FIELDS = ("mapping_dim", "mapping_dim1", "num_tokens", "use_embeds")

read_tensors = unet_convert.read_tensors


def _folder_tokens(src: Path) -> int | None:
  m = re.fullmatch(r"unet_(\d+)", Path(src).absolute().name)
  return int(m.group(1)) if m else None


def config_from_sources(
  cfg: dict, shapes: dict, src: Path, where: str = "config.json"
) -> PumaDecoderConfig:
  """Resolves the PUMA fields from config.json, tensor shapes and the folder name."""
  d = dict(cfg)
  d["addition_embed_type"] = None  # PUMA's UNet ignores it (see the module docstring)
  u = unet_convert.config_from_diffusers(d, where, extra_ignored=_PUMA_FIELDS)
  ctx = u.context_dims[0]
  m = shapes.get("mapping_layer.weight")  # torch (out, in)
  pos = shapes.get("embed_img_pos")
  folder = _folder_tokens(src)

  own = config_check.check_fields(
    PumaDecoderConfig, {k: cfg[k] for k in _PUMA_FIELDS if k in cfg}, where
  )
  mapping_dim1 = own.get("mapping_dim1", m[0] if m else ctx)
  mapping_dim = own.get("mapping_dim", m[1] if m else mapping_dim1)
  if "num_tokens" in own:
    num_tokens, origin = own["num_tokens"], f"{where} num_tokens"
  elif pos is not None:
    num_tokens, origin = int(pos[1]), f"tensor embed_img_pos {tuple(pos)}"
  elif folder is not None:
    num_tokens, origin = folder, f"folder name {Path(src).name}"
  else:
    raise ConversionError(
      f"{src}: cannot tell the decoder's token count: {where} has no "
      "num_tokens, there is no embed_img_pos tensor, and the folder is not "
      "named unet_N"
    )
  if folder is not None and folder != num_tokens:
    raise ConversionError(
      f"{src}: folder name {Path(src).name} says {folder} tokens, but {origin} says {num_tokens}"
    )
  use_embeds = own.get("use_embeds", num_tokens == 256)
  return config_check.build(
    PumaDecoderConfig,
    dict(
      unet=u,
      mapping_dim=int(mapping_dim),
      mapping_dim1=int(mapping_dim1),
      num_tokens=num_tokens,
      use_embeds=use_embeds,
    ),
    where,
  )


def load_config(src: Path) -> PumaDecoderConfig:
  src = Path(src)
  path = src / "config.json"
  cfg = read_json(path)
  shapes = {
    k: tuple(v.shape)
    for k, v in read_tensors(src).items()
    if k in ("mapping_layer.weight", "embed_img_pos")
  }
  return config_from_sources(cfg, shapes, src, str(path))


def check_tensors(config: PumaDecoderConfig, tensors: dict, src: Path) -> None:
  """Scale mismatches, named before the generic strict mapping reports them less clearly."""
  what = f"puma-decoder {src}"
  pos = tensors.get("embed_img_pos")
  if pos is not None:
    if not config.use_embeds:
      n = pos.shape[1] if pos.ndim == 3 else "?"
      raise ConversionError(
        f"{what}: the checkpoint has embed_img_pos {tuple(pos.shape)} (a {n}-token decoder "
        f"with positional embedding), but the config is a {config.num_tokens}-token decoder "
        "without one; load it as its own scale"
      )
    want = (1, config.num_tokens, config.mapping_dim1)
    if tuple(pos.shape) != want:
      raise ConversionError(
        f"{what}: embed_img_pos has shape {tuple(pos.shape)}, but a "
        f"{config.num_tokens}-token decoder needs {want}: the checkpoint "
        "is for another scale"
      )
  m = tensors.get("mapping_layer.weight")
  if m is not None and not config.has_mapping_layer:
    raise ConversionError(
      f"{what}: the checkpoint has mapping_layer.weight {tuple(m.shape)}, "
      f"but the config has mapping_dim == mapping_dim1 == "
      f"{config.mapping_dim} (no mapping layer)"
    )


def rules(config: PumaDecoderConfig) -> list[Rule]:
  table = unet_convert.rules(config.unet, prefix="unet.")
  table += [
    Rule("mapping_layer.weight", "mapping_layer.kernel", linear),
    Rule("mapping_layer.bias", "mapping_layer.bias", identity),
    Rule("embed_img_pos", "embed_img_pos", identity),
    # An SDXL `text_time` embedding left in the file: PUMA's module never builds it
    # (addition_embed_type is forced to None), so its loader drops these too.
    Rule("add_embedding.{rest*}", None),
  ]
  return table
