"""HF LLaMA (`LlamaForCausalLM`: LLaMA-2, LLaMA-3, LLaMA-3.1) <-> puma_jax `LlamaForCausalLM`.

    python -m puma_jax.convert llama --src=HF_DIR --dst=OUT_DIR
    python -m puma_jax.convert.export llama --src=OUT_DIR --dst=HF_DIR

Reads sharded or single safetensors (or .bin); the tokenizer files travel along to OUT_DIR (and
back on export). The same rule table serves both directions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from flax import nnx

from puma_jax.convert import config_check
from puma_jax.convert.core import (
  ConversionError,
  Rule,
  identity,
  linear,
  map_to_source,
  read_json,
  flatten_state,
)
from puma_jax.models import llama as llama_model
from puma_jax.models.llama import LlamaConfig

FAMILY = "llama"

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "vocab.json",
  "merges.txt",
  "chat_template.jinja",
  "chat_template.json",
  "generation_config.json",
)

_PLAIN = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "head_dim",
  "max_position_embeddings",
  "rms_norm_eps",
  "tie_word_embeddings",
  "attention_bias",
  "mlp_bias",
  "hidden_act",
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
)


def _rope_fields(hf: dict, where: str) -> dict:
  """HF's rope description: transformers 5 `rope_parameters` or the older `rope_theta` plus
  `rope_scaling` (whose type key was once `type`)."""
  for key in ("rope_parameters", "rope_scaling"):
    if not isinstance(hf.get(key) or {}, dict):
      raise ConversionError(f"{where}: {key}={hf[key]!r} is not an object")
  merged = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = merged.get("rope_type", merged.get("type", "default"))
  # Values are checked (types, finiteness, sign) by config_check when the config is built.
  out = {"rope_theta": theta, "rope_type": rope_type}
  if rope_type not in llama_model.ROPE_TYPES:
    raise ConversionError(
      f"{where}: unsupported rope_scaling.rope_type={rope_type!r}; "
      f"supported: {llama_model.ROPE_TYPES}"
    )
  if rope_type in ("linear", "llama3"):
    if "factor" not in merged:
      raise ConversionError(f"{where}: rope_scaling.factor is required for rope_type {rope_type!r}")
    out["rope_factor"] = merged["factor"]
  if rope_type == "llama3":
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      if key not in merged:
        raise ConversionError(f"{where}: rope_scaling.{key} is required for rope_type 'llama3'")
    out["rope_low_freq_factor"] = merged["low_freq_factor"]
    out["rope_high_freq_factor"] = merged["high_freq_factor"]
    out["rope_original_max_position_embeddings"] = merged["original_max_position_embeddings"]
  if merged.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConversionError(
      f"{where}: partial_rotary_factor={merged['partial_rotary_factor']} is not supported"
    )
  return out


def config_from_hf(hf: dict, where: str = "config.json") -> LlamaConfig:
  mt = hf.get("model_type", "llama")
  if mt != "llama":
    raise ConversionError(f"{where}: model_type={mt!r}; this converter reads 'llama' checkpoints")
  kw = config_check.check_fields(
    LlamaConfig, {k: hf[k] for k in _PLAIN if hf.get(k) is not None}, where
  )
  heads = kw.get("num_attention_heads")
  kv = kw.get("num_key_value_heads") or heads
  if heads and kv and heads % kv:
    raise ConversionError(
      f"{where}: num_key_value_heads={kv} does not divide num_attention_heads={heads}"
    )
  if kw.get("hidden_act", "silu") not in ("silu", "swish"):
    raise ConversionError(f"{where}: unsupported hidden_act={hf['hidden_act']!r} (LLaMA uses silu)")
  kw.update(_rope_fields(hf, where))
  return config_check.build(LlamaConfig, kw, where)


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict:
  """An HF `config.json` for `cfg`. Writes the rope description both ways (`rope_theta` +
  `rope_scaling`, which every transformers release reads, and transformers 5's
  `rope_parameters`) so older and newer loaders agree."""
  hf = {k: getattr(cfg, k) for k in _PLAIN}
  if isinstance(hf["eos_token_id"], tuple):
    hf["eos_token_id"] = list(hf["eos_token_id"])
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type in ("linear", "llama3"):
    rope["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    rope.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
    )
  hf.update(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    torch_dtype=dtype,
    rope_theta=cfg.rope_theta,
    rope_parameters=rope,
    rope_scaling=None
    if cfg.rope_type == "default"
    else {k: v for k, v in rope.items() if k != "rope_theta"},
    initializer_range=0.02,
    use_cache=True,
    pretraining_tp=1,
    attention_dropout=0.0,
  )
  return hf


def load_config(src: Path) -> LlamaConfig:
  path = Path(src) / "config.json"
  return config_from_hf(read_json(path), str(path))


def rules(config: LlamaConfig) -> list[Rule]:
  if config.scan_layers:
    raise ConversionError(
      "llama: the conversion table addresses unstacked layers; convert with "
      "scan_layers=False and use models.llama.set_scan_layers"
    )
  L, t = "model.layers.{i}.", "layers.{i}."
  table = [
    Rule("model.embed_tokens.weight", "embed_tokens.embedding"),
    Rule("model.norm.weight", "norm.scale"),
  ]
  for lin in ("self_attn.{p}_proj", "mlp.{p}_proj"):
    table += [
      Rule(L + lin + ".weight", t + lin + ".kernel", linear),
      Rule(L + lin + ".bias", t + lin + ".bias", identity),
    ]
  for norm in ("input_layernorm", "post_attention_layernorm"):
    table.append(Rule(L + norm + ".weight", t + norm + ".scale"))
  # Old checkpoints store the RoPE table as a buffer; it is recomputed from the config.
  table.append(Rule(L + "self_attn.rotary_emb.inv_freq", None))
  if config.tie_word_embeddings:
    # Some tied checkpoints still save the (identical) output matrix.
    table.append(Rule("lm_head.weight", None))
  else:
    table.append(Rule("lm_head.weight", "lm_head.kernel", linear))
  return table


def copy_extras(src: Path, dst: Path) -> None:
  for name in TOKENIZER_FILES:
    if (Path(src) / name).is_file():
      shutil.copy2(Path(src) / name, Path(dst) / name)


def hf_tensors(model: llama_model.LlamaForCausalLM, dtype=np.float32) -> dict[str, np.ndarray]:
  """The model's parameters under HF names (unstacking a scanned model)."""
  cfg = model.config
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if cfg.scan_layers:
    params = llama_model.restack(params, cfg.num_hidden_layers, to_scanned=False)
  flat = {k: np.asarray(v) for k, v in flatten_state(params).items()}
  out = map_to_source(flat, rules(cfg.replace(scan_layers=False)))
  return {k: np.ascontiguousarray(v).astype(dtype) for k, v in out.items()}


def export_hf(
  model: llama_model.LlamaForCausalLM,
  dst,
  *,
  src_dir=None,
  dtype: str = "float32",
  max_shard_bytes: int = 5 * 2**30,
) -> Path:
  """Writes an HF directory (config.json, safetensors, tokenizer files) that
  `transformers.LlamaForCausalLM.from_pretrained` loads."""
  from puma_jax.convert.export import np_dtype, write_sharded

  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  tensors = hf_tensors(model, np_dtype(dtype))
  write_sharded(tensors, dst, max_shard_bytes)
  cfg = config_to_hf(model.config, dtype)
  (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
  if src_dir is not None:
    copy_extras(Path(src_dir), dst)
  return dst
