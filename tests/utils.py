"""Helpers for parity tests against the PyTorch references."""

from __future__ import annotations

import numpy as np


def rel_err(actual, expected) -> float:
  """max |actual - expected| relative to the magnitude of `expected`."""
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  assert a.shape == e.shape, (a.shape, e.shape)
  return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-12))


def randomize_norms(torch_module, seed: int = 0, std: float = 0.2) -> None:
  """Gives every normalization layer random affine parameters, so a swapped or missing norm
  tensor shows up in parity tests (default init is ones/zeros, which hides it)."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_module.named_parameters():
      low = name.lower()
      if "norm" in low or "ln_" in low or ".ln" in low:
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + std * torch.randn(p.shape, generator=g))


def tree_digest(root) -> dict[str, str]:
  """Relative path -> sha256 of every file under `root` (empty if absent): a test compares two
  digests to show that a refused run changed nothing already saved."""
  import hashlib
  from pathlib import Path

  root = Path(root)
  if root.is_file():
    return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
  if not root.exists():
    return {}
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }
