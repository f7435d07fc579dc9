"""Shared helpers for the UNet / PUMA decoder parity tests: small diffusers UNets."""

from __future__ import annotations

import numpy as np

from tests.utils import randomize_norms

# Small diffusers UNet2DConditionModel configs, each exercising different options.
CONFIGS = {
  # SDXL's layout (plain level, then two cross-attention levels), text_time, per-block
  # transformer depth and head counts.
  "sdxl_like": dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    norm_num_groups=8,
    cross_attention_dim=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
  ),
  # SD-1.x-like: 1x1-conv projections, no added embedding, no mid block, sin/cos unflipped
  # with freq_shift 1, layers per block varying, a sample size that is not a multiple of 2.
  "conv_proj_nomid": dict(
    sample_size=10,
    block_out_channels=(16, 32),
    layers_per_block=(1, 2),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type=None,
    transformer_layers_per_block=2,
    attention_head_dim=4,
    norm_num_groups=4,
    cross_attention_dim=24,
    use_linear_projection=False,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
  ),
  # Asymmetric transformer depth per layer (with the reverse table), upcast attention,
  # all levels cross-attention, downsample padding 0, odd conv kernels, wider time embedding.
  "asym_depth": dict(
    sample_size=8,
    block_out_channels=(16, 24, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    transformer_layers_per_block=((1,), (2,), (1,)),
    reverse_transformer_layers_per_block=((1, 2), (2, 1), (1, 1)),
    attention_head_dim=(2, 3, 4),
    norm_num_groups=8,
    cross_attention_dim=16,
    use_linear_projection=True,
    upcast_attention=True,
    downsample_padding=0,
    conv_in_kernel=5,
    time_embedding_dim=48,
    mid_block_scale_factor=1.5,
  ),
}


def torch_unet(kw: dict, seed: int = 0):
  import torch
  from diffusers import UNet2DConditionModel

  torch.manual_seed(seed)
  model = UNet2DConditionModel(**kw).eval()
  randomize_norms(model, seed=seed)
  return model


def inputs(
  kw: dict, batch: int = 2, seq: int = 5, seed: int = 0, size=None, scalar_t: bool = False
):
  """Random NHWC sample, timesteps (B,), context, and the text_time inputs when configured."""
  rng = np.random.default_rng(seed)
  s = size or kw["sample_size"]
  h, w = (s, s) if isinstance(s, int) else s
  out = dict(
    sample=rng.standard_normal((batch, h, w, kw.get("in_channels", 4)), np.float32),
    timesteps=(
      np.int32(rng.integers(0, 1000))
      if scalar_t
      else rng.integers(0, 1000, (batch,)).astype(np.int32)
    ),
    context=rng.standard_normal((batch, seq, kw["cross_attention_dim"]), np.float32),
  )
  if kw.get("addition_embed_type") == "text_time":
    width = kw["projection_class_embeddings_input_dim"] - 6 * kw["addition_time_embed_dim"]
    out["text_embeds"] = rng.standard_normal((batch, width), np.float32)
    out["time_ids"] = rng.choice([0.0, 512.0, 768.0, 1024.0], (batch, 6)).astype(np.float32)
  return out


def torch_forward(model, x: dict, dtype=None) -> np.ndarray:
  """diffusers forward on NHWC numpy inputs (cast to `dtype`); NHWC float32 numpy output."""
  import torch

  dtype = dtype or torch.float32
  t = lambda k: torch.from_numpy(np.asarray(x[k])).to(dtype)
  added = None
  if "text_embeds" in x:
    added = {"text_embeds": t("text_embeds"), "time_ids": t("time_ids")}
  with torch.no_grad():
    out = model(
      t("sample").permute(0, 3, 1, 2),
      torch.from_numpy(np.asarray(x["timesteps"])).long(),
      encoder_hidden_states=t("context"),
      added_cond_kwargs=added,
    ).sample
  return out.float().permute(0, 2, 3, 1).numpy()


def rel_rms(actual, expected) -> float:
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.sqrt(np.mean((a - e) ** 2) / np.mean(e**2)))


def jit_forward(module):
  """A jitted pure forward of an nnx module (one compile per input signature)."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda s, *a, **k: nnx.merge(graphdef, s)(*a, **k))
  return lambda *a, **k: fn(state, *a, **k)


def unet_kwargs(x: dict) -> dict:
  return {k: x[k] for k in ("text_embeds", "time_ids") if k in x}


def save_state_dict(model, directory, drop=(), rename=None, extra=None):
  """`save_pretrained`, then rewrite the weights file without `drop`, with tensors renamed and
  `extra` tensors added (to fabricate bad or PUMA-layout checkpoints)."""
  from pathlib import Path
  from safetensors.torch import load_file, save_file

  model.save_pretrained(directory)
  path = Path(directory) / "diffusion_pytorch_model.safetensors"
  sd = load_file(str(path))
  sd = {k: v for k, v in sd.items() if k not in drop}
  for old, new in (rename or {}).items():
    sd[new] = sd.pop(old)
  sd.update(extra or {})
  save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  return path
