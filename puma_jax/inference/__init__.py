"""Inference: text generation with a KV cache (`generate_text`)."""

from puma_jax.inference.text import generate_text  # noqa: F401
