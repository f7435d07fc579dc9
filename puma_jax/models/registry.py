"""Model families by name: the strings `convert` writes and `checkpoints.load_module` reads.

A family maps to (module path, config class, model class). Model classes are built as
`Model(config, *, dtype=..., param_dtype=..., rngs=...)`.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
from flax import nnx

FAMILIES: dict[str, tuple[str, str, str]] = {
  "clip-vision": ("puma_jax.models.clip", "CLIPVisionConfig", "CLIPVisionModel"),
  "puma": ("puma_jax.models.puma", "PumaConfig", "PumaModel"),
  "llama": ("puma_jax.models.llama", "LlamaConfig", "LlamaForCausalLM"),
  "vae": ("puma_jax.models.vae", "VAEConfig", "AutoencoderKL"),
  "sdxl-unet": ("puma_jax.models.unet", "UNetConfig", "UNet2DConditionModel"),
  "puma-decoder": ("puma_jax.models.puma_decoder", "PumaDecoderConfig", "PumaDecoder"),
  "clip": ("puma_jax.models.clip_text", "CLIPConfig", "CLIPModel"),
  "alexnet": ("puma_jax.models.alexnet", "AlexNetConfig", "AlexNetFeatures"),
  "lpips-alex": ("puma_jax.models.lpips", "LPIPSConfig", "LPIPS"),
  "dino-vit": ("puma_jax.models.vit", "ViTConfig", "ViTModel"),
  "inception": ("puma_jax.models.inception", "InceptionConfig", "FIDInceptionV3"),
}


def _lookup(family: str):
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
  mod_name, cfg_name, cls_name = FAMILIES[family]
  mod = importlib.import_module(mod_name)
  return getattr(mod, cfg_name), getattr(mod, cls_name)


def config_class(family: str):
  return _lookup(family)[0]


def build(
  family: str,
  config: Any,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  rngs: nnx.Rngs | None = None,
) -> nnx.Module:
  cfg_cls, cls = _lookup(family)
  if not isinstance(config, cfg_cls):
    config = cfg_cls.from_dict(config)
  return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs or nnx.Rngs(0))
