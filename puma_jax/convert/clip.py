"""CLIP vision tower: HF `CLIPVisionModel` / `CLIPModel` / `CLIPVisionModelWithProjection`.

Reads the vision tower; from a full `CLIPModel` directory the text tower and projections are
skipped by explicit rules (they belong to other families), so strictness still holds for every
tensor of the vision tower.
"""

from __future__ import annotations

from pathlib import Path

from puma_jax.convert import config_check
from puma_jax.convert.core import (
  ConversionError,
  Rule,
  conv2d,
  identity,
  linear,
  read_checkpoint,
  read_json,
)
from puma_jax.models.clip import CLIPVisionConfig
from puma_jax.models import layers

FAMILY = "clip-vision"

_FIELDS = (
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_channels",
  "image_size",
  "patch_size",
  "hidden_act",
  "layer_norm_eps",
  "projection_dim",
)


def config_from_hf(hf: dict, where: str = "config.json") -> CLIPVisionConfig:
  if "vision_config" in hf:  # a full CLIPModel config
    hf = hf["vision_config"]
    where = f"{where}:vision_config"
  kw = config_check.check_fields(CLIPVisionConfig, {k: hf[k] for k in _FIELDS if k in hf}, where)
  act = kw.get("hidden_act", "quick_gelu")
  if act not in layers.ACTIVATIONS:
    raise ConversionError(
      f"{where}: unsupported hidden_act={act!r}; supported: {sorted(layers.ACTIVATIONS)}"
    )
  return config_check.build(CLIPVisionConfig, kw, where)


def load_config(src: Path) -> CLIPVisionConfig:
  return config_from_hf(read_json(Path(src) / "config.json"), str(Path(src) / "config.json"))


def rules(config: CLIPVisionConfig) -> list[Rule]:
  del config
  v, L = "vision_model.", "vision_model.encoder.layers.{i}."
  t = "encoder.layers.{i}."
  table = [
    Rule(v + "embeddings.patch_embedding.weight", "embeddings.patch_embedding.kernel", conv2d),
    Rule(v + "embeddings.class_embedding", "embeddings.class_embedding"),
    Rule(v + "embeddings.position_embedding.weight", "embeddings.position_embedding.embedding"),
    Rule(v + "embeddings.position_ids", None),  # a buffer in older checkpoints
  ]
  for norm in ("pre_layrnorm", "post_layernorm"):
    table += [Rule(v + norm + ".weight", norm + ".scale"), Rule(v + norm + ".bias", norm + ".bias")]
  for ln in ("layer_norm1", "layer_norm2"):
    table += [Rule(L + ln + ".weight", t + ln + ".scale"), Rule(L + ln + ".bias", t + ln + ".bias")]
  for lin in ("self_attn.{p}_proj", "mlp.{p}"):
    table += [
      Rule(L + lin + ".weight", t + lin + ".kernel", linear),
      Rule(L + lin + ".bias", t + lin + ".bias", identity),
    ]
  # Other towers of a full CLIPModel checkpoint: not part of this family.
  table += [
    Rule("text_model.{rest*}", None),
    Rule("text_projection.weight", None),
    Rule("visual_projection.weight", None),
    Rule("logit_scale", None),
  ]
  return table


_OTHER = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "vision_model.")


def read_tensors(src: Path) -> dict:
  """Source tensors under HF's hub names (`vision_model.*`).

  transformers 5 saves a bare `CLIPVisionModel` without the `vision_model.` prefix; such names
  are given it back, so one table serves both layouts.
  """
  tensors = read_checkpoint(src)
  return {(k if k.startswith(_OTHER) else "vision_model." + k): v for k, v in tensors.items()}
