"""HF `ViTModel` checkpoints (facebook/dino-vits16) -> `dino-vit`.

    python -m puma_jax.convert dino-vit --src=HF_DIR --dst=DIR

Reads the hub layout (`encoder.layer.N.attention.attention.query.*`, which `save_pretrained`
writes) and the in-memory layout of transformers 5 (`layers.N.attention.q_proj.*`). The pooler
(`pooler.dense.*`, untrained in the DINO checkpoints and unused by the DINO score) is skipped.
`preprocessor_config.json`, when present, is copied beside the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from puma_jax.convert import config_check
from puma_jax.convert.core import ConversionError, Rule, conv2d, linear, read_json
from puma_jax.models import layers
from puma_jax.models.vit import ViTConfig

FAMILY = "dino-vit"

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
  "qkv_bias",
)


def config_from_hf(hf: dict, where: str = "config.json") -> ViTConfig:
  for key in ("image_size", "patch_size"):
    if isinstance(hf.get(key), (list, tuple)):
      if len(hf[key]) != 2:
        raise ConversionError(f"{where}: {key}={hf[key]} is not one size or a (height, width) pair")
      a, b = hf[key]
      if a != b:
        raise ConversionError(f"{where}: non-square {key}={hf[key]} is not supported")
      hf = {**hf, key: a}
  kw = config_check.check_fields(ViTConfig, {k: hf[k] for k in _FIELDS if k in hf}, where)
  act = kw.get("hidden_act", "gelu")
  if act not in layers.ACTIVATIONS:
    raise ConversionError(
      f"{where}: unsupported hidden_act={act!r}; supported: {sorted(layers.ACTIVATIONS)}"
    )
  return config_check.build(ViTConfig, kw, where)


def load_config(src: Path) -> ViTConfig:
  path = Path(src) / "config.json"
  return config_from_hf(read_json(path), str(path))


def _layer(src_layer: str, dst: str, hook_weight=linear) -> list[Rule]:
  return [
    Rule(src_layer + ".weight", dst + ".kernel", hook_weight),
    Rule(src_layer + ".bias", dst + ".bias"),
  ]


def rules(config: ViTConfig) -> list[Rule]:
  del config
  table = [
    Rule("embeddings.cls_token", "embeddings.cls_token"),
    Rule("embeddings.position_embeddings", "embeddings.position_embeddings"),
    *_layer("embeddings.patch_embeddings.projection", "embeddings.patch_embeddings", conv2d),
    Rule("layernorm.weight", "layernorm.scale"),
    Rule("layernorm.bias", "layernorm.bias"),
    Rule("pooler.dense.{p}", None),
  ]
  hub, new, t = "encoder.layer.{i}.", "layers.{i}.", "layers.{i}."
  for ln in ("layernorm_before", "layernorm_after"):
    for src in (hub, new):
      table += [
        Rule(src + ln + ".weight", t + ln + ".scale"),
        Rule(src + ln + ".bias", t + ln + ".bias"),
      ]
  pairs = [
    ("attention.attention.query", "attention.q_proj", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1", "mlp.fc1"),
    ("output.dense", "mlp.fc2", "mlp.fc2"),
  ]
  for hub_name, new_name, ours in pairs:
    table += _layer(hub + hub_name, t + ours) + _layer(new + new_name, t + ours)
  return table


def copy_extras(src: Path, dst: Path) -> None:
  """Keeps the image processor config: the DINO score reads its resampling filter and mean/std."""
  if (Path(src) / "preprocessor_config.json").exists():
    shutil.copy2(Path(src) / "preprocessor_config.json", dst / "preprocessor_config.json")
