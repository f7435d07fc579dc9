"""puma_jax: PUMA (multi-granular unified multimodal LLM) in JAX / Flax NNX."""

__version__ = "0.1.0"
