"""Full HF `CLIPModel` (both towers + projections) -> `clip`, for CLIP-I / CLIP-T.

    python -m puma_jax.convert clip --src=clip-vit-base-patch32 --dst=DIR

Every tensor of the checkpoint is read (`logit_scale` included); the tokenizer files of the
source directory (vocab.json, merges.txt, ...) are copied beside the weights so that
`puma_jax.evaluation.clip_tokenizer.load(DIR)` works from the converted directory alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from puma_jax.convert import clip as clip_vision
from puma_jax.convert import config_check
from puma_jax.convert.core import (
  ConversionError,
  Rule,
  identity,
  linear,
  read_checkpoint,
  read_json,
)
from puma_jax.models import layers
from puma_jax.models.clip_text import CLIPConfig, CLIPTextConfig

FAMILY = "clip"

_TEXT_FIELDS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "max_position_embeddings",
  "hidden_act",
  "layer_norm_eps",
  "pad_token_id",
  "bos_token_id",
  "eos_token_id",
  "projection_dim",
)

# transformers' CLIPVisionConfig defaults (ViT-B/32). A config.json written by an old
# transformers may list only the fields that differ from them; our CLIPVisionConfig defaults are
# PUMA's ViT-L/14, so the gaps are filled with HF's values, not ours.
HF_VISION_DEFAULTS = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  num_channels=3,
  image_size=224,
  patch_size=32,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  projection_dim=512,
)

TOKENIZER_FILES = (
  "vocab.json",
  "merges.txt",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
)


def config_from_hf(hf: dict, where: str = "config.json") -> CLIPConfig:
  hf = dict(hf)
  for tower in ("text_config", "vision_config"):
    if hf.get(tower) is None and hf.get(tower + "_dict") is not None:  # pre-4.21 configs
      hf[tower] = hf[tower + "_dict"]
  if hf.get("text_config") is None or hf.get("vision_config") is None:
    raise ConversionError(
      f"{where}: not a full CLIPModel config (needs text_config and "
      "vision_config); for a vision tower alone use `clip-vision`"
    )
  for tower in ("text_config", "vision_config"):
    if not isinstance(hf[tower], dict):
      raise ConversionError(f"{where}: {tower} is a JSON {type(hf[tower]).__name__}, not an object")
  text = config_check.check_fields(
    CLIPTextConfig,
    {k: v for k, v in hf["text_config"].items() if k in _TEXT_FIELDS and v is not None},
    f"{where}:text_config",
  )
  act = text.get("hidden_act", "quick_gelu")
  if act not in layers.ACTIVATIONS:
    raise ConversionError(f"{where}:text_config: unsupported hidden_act={act!r}")
  eos = text.get("eos_token_id", CLIPTextConfig.eos_token_id)
  if isinstance(eos, list):
    raise ConversionError(f"{where}:text_config: a list eos_token_id={eos} is not supported")
  text_cfg = config_check.build(CLIPTextConfig, text, f"{where}:text_config")
  vision = {**HF_VISION_DEFAULTS, **{k: v for k, v in hf["vision_config"].items() if v is not None}}
  vision_cfg = clip_vision.config_from_hf(vision, f"{where}:vision_config")
  return config_check.build(
    CLIPConfig,
    dict(
      text_config=text_cfg, vision_config=vision_cfg, projection_dim=hf.get("projection_dim", 512)
    ),
    where,
  )


def load_config(src: Path) -> CLIPConfig:
  path = Path(src) / "config.json"
  return config_from_hf(read_json(path), str(path))


def rules(config: CLIPConfig) -> list[Rule]:
  table = [
    Rule(r.source, "vision_model." + r.target, r.hook)
    for r in clip_vision.rules(config.vision_config)
    if r.target is not None
  ]
  table.append(Rule("vision_model.embeddings.position_ids", None))
  t, L = "text_model.", "text_model.encoder.layers.{i}."
  table += [
    Rule(t + "embeddings.token_embedding.weight", t + "embeddings.token_embedding.embedding"),
    Rule(t + "embeddings.position_embedding.weight", t + "embeddings.position_embedding.embedding"),
    Rule(t + "embeddings.position_ids", None),  # a buffer in older checkpoints
    Rule(t + "final_layer_norm.weight", t + "final_layer_norm.scale"),
    Rule(t + "final_layer_norm.bias", t + "final_layer_norm.bias"),
  ]
  for ln in ("layer_norm1", "layer_norm2"):
    table += [Rule(L + ln + ".weight", L + ln + ".scale"), Rule(L + ln + ".bias", L + ln + ".bias")]
  for lin in ("self_attn.{p}_proj", "mlp.{p}"):
    table += [
      Rule(L + lin + ".weight", L + lin + ".kernel", linear),
      Rule(L + lin + ".bias", L + lin + ".bias", identity),
    ]
  table += [
    Rule("visual_projection.weight", "visual_projection.kernel", linear),
    Rule("text_projection.weight", "text_projection.kernel", linear),
    Rule("logit_scale", "logit_scale"),
  ]
  return table


def read_tensors(src: Path):
  return read_checkpoint(src)


def copy_extras(src: Path, dst: Path) -> None:
  if not src.is_dir():
    return
  for name in TOKENIZER_FILES:
    if (src / name).exists():
      shutil.copy2(src / name, dst / name)
