"""Diffusion: schedulers as pure JAX functions and the CFG sampler (PUMA's decoder inference)."""

from puma_jax.diffusion.schedulers import (
  DDIM,
  DDPM,
  DPMSolverMultistep,
  EulerDiscrete,
  SchedulerConfig,
  Schedule,
  add_noise,
  from_diffusers_config,
  q_sample,
)

__all__ = [
  "DDIM",
  "DDPM",
  "DPMSolverMultistep",
  "EulerDiscrete",
  "SchedulerConfig",
  "Schedule",
  "add_noise",
  "from_diffusers_config",
  "q_sample",
]
