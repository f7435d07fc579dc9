"""Reading plain PyTorch weight files (torchvision / lpips / pytorch-fid), which ship as a single
`.pth` state dict rather than an HF directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from puma_jax.convert.core import ConversionError, read_checkpoint, read_safetensors, read_torch_bin

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def weight_files(src: Path) -> list[Path]:
  src = Path(src)
  if not src.exists():
    raise ConversionError(f"source {src} does not exist")
  if src.is_file():
    return [src]
  files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in SUFFIXES)
  if not files:
    raise ConversionError(
      f"{src}: no weight file (looked for {', '.join(SUFFIXES)}); the "
      f"directory holds {sorted(p.name for p in src.iterdir())[:10]}"
    )
  return files


def read_one(path: Path) -> dict[str, np.ndarray]:
  return read_safetensors(path) if path.suffix == ".safetensors" else read_torch_bin(path)


def read_merged(src: Path) -> dict[str, np.ndarray]:
  """All tensors of a weights file, or of every weights file of a directory (names must not
  repeat across files). An HF-style directory (with an index) is read by `read_checkpoint`."""
  src = Path(src)
  if src.is_dir() and any(src.glob("*.index.json")):
    return read_checkpoint(src)
  out: dict[str, np.ndarray] = {}
  origin: dict[str, Path] = {}
  for path in weight_files(src):
    for name, arr in read_one(path).items():
      if name in out:
        raise ConversionError(
          f"tensor {name!r} is in both {origin[name]} and {path}; the source "
          "directory must hold only the files of this model (one copy each; "
          "e.g. not lpips's vgg.pth beside alex.pth)"
        )
      out[name], origin[name] = arr, path
  return out
