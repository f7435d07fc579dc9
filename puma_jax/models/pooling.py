"""PUMA's multi-granular image features: f0..f4 by average pooling of the patch grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

SCALE_NAMES = ("f0", "f1", "f2", "f3", "f4")
SCALE_TOKENS = (256, 64, 16, 4, 1)  # f0 (finest) .. f4 (coarsest)
SCALE_GRIDS = (16, 8, 4, 2, 1)


def scale_index(name: str) -> int:
  if name not in SCALE_NAMES:
    raise ValueError(f"unknown scale {name!r}; scales are {SCALE_NAMES}")
  return SCALE_NAMES.index(name)


def pool(patch_tokens: jax.Array, tokens: int) -> jax.Array:
  """Average-pools (B, N, D) row-major grid tokens down to `tokens` (a square) tokens."""
  b, n, d = patch_tokens.shape
  g = math.isqrt(n)
  t = math.isqrt(tokens)
  if g * g != n:
    raise ValueError(f"patch tokens must form a square grid; got {n} tokens")
  if t * t != tokens or g % t:
    raise ValueError(f"cannot pool a {g}x{g} grid to {tokens} tokens")
  k = g // t
  x = patch_tokens.reshape(b, t, k, t, k, d)
  return x.mean(axis=(2, 4), dtype=jnp.float32).astype(patch_tokens.dtype).reshape(b, t * t, d)


def multi_granular(
  patch_tokens: jax.Array, tokens: Sequence[int] = SCALE_TOKENS
) -> list[jax.Array]:
  """[f0, f1, f2, f3, f4] from (B, 256, D) patch tokens (class token already dropped).

  Each scale is an average pooling with kernel = stride = 16 / sqrt(tokens), flattened
  row-major. Other grids work if every requested token count divides them.
  """
  if patch_tokens.ndim != 3:
    raise ValueError(f"patch_tokens must be (batch, tokens, dim); got shape {patch_tokens.shape}")
  return [pool(patch_tokens, t) for t in tokens]
