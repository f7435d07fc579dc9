"""The training stages by `config.stage` name: loop -> registry -> stage modules."""

from __future__ import annotations

from pathlib import Path

from puma_jax.training import decoder, mllm, vae
from puma_jax.training.stage import Stage

STAGES: dict[str, type] = {
  "mllm": mllm.MLLMStage,  # PumaModel pretraining / unified tuning
  "decoder": decoder.DecoderStage,  # one scale's diffusion decoder
  "vae": vae.VAEStage,  # the VAE the decoders denoise in (tiny demo: no pretrained one)
}


def get_stage(name: str) -> type:
  """The stage class registered as `name`; an unknown name is an error listing the choices."""
  if name not in STAGES:
    raise ValueError(f"config.stage={name!r}: choose from {sorted(STAGES)}")
  return STAGES[name]


def make(config, workdir: Path | None = None) -> Stage:
  """The stage `config.stage`, built from `config` (outputs, if any, under `workdir`)."""
  return get_stage(str(config.stage))(config, workdir)
