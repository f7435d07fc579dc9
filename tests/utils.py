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


def randomize_conv_net_(module, seed: int):
  """Random weights for a conv net (Inception, AlexNet), batch-norm affine parameters and
  running statistics included, so that a misread or dropped norm tensor cannot hide behind the
  default ones/zeros. Returns `module`."""
  import torch
  from torch import nn

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
      elif isinstance(m, (nn.Conv2d, nn.Linear)):
        # He-style scale so that activations neither vanish nor explode over 40+ layers.
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return module


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
