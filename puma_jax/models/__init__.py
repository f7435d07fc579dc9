"""Flax NNX model families: CLIP vision, LLaMA, SDXL UNet/VAE, the PUMA decoder and PumaModel."""
