"""Export a converted (or trained) puma_jax model directory back to the HF layout.

    python -m puma_jax.convert.export llama --src=OUT_DIR --dst=HF_DIR [--dtype=bfloat16]

A family supports export by defining `export_hf(module, dst, *, src_dir, dtype,
max_shard_bytes)` in its `puma_jax.convert.<family>` module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from puma_jax.convert.core import ConversionError, write_safetensors

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def np_dtype(name: str):
  if name not in _DTYPES:
    raise ConversionError(f"export: unsupported dtype {name!r}; choose from {sorted(_DTYPES)}")
  return _DTYPES[name]


def write_sharded(tensors: Mapping[str, np.ndarray], dst: Path,
                  max_shard_bytes: int = 5 * 2**30, prefix: str = "model") -> list[str]:
  """`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus
  `model.safetensors.index.json` (HF's names) when the total exceeds `max_shard_bytes`."""
  dst = Path(dst)
  total = sum(int(np.asarray(a).nbytes) for a in tensors.values())
  if total <= max_shard_bytes:
    write_safetensors(tensors, dst / f"{prefix}.safetensors")
    return [f"{prefix}.safetensors"]
  groups: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors):
    n = int(np.asarray(tensors[name]).nbytes)
    if groups[-1] and size + n > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += n
  files, weight_map = [], {}
  for i, names in enumerate(groups):
    fname = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    write_safetensors({k: tensors[k] for k in names}, dst / fname)
    weight_map.update({k: fname for k in names})
    files.append(fname)
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (dst / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return files


def export(family: str, src, dst, *, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30):
  from puma_jax import checkpoints
  from puma_jax.convert import family_module
  fam = family_module(family)
  if not hasattr(fam, "export_hf"):
    raise ConversionError(f"export: family {family!r} has no export to the HF layout")
  from puma_jax import fileio
  try:
    # An HF directory (config.json, .bin weights, tokenizer files) is never written into: the
    # export goes to a temporary sibling, renamed to `dst` once complete.
    fileio.check_output_dir(dst, "export", src)
    module = checkpoints.load_module(src, family=fam.FAMILY)
    with fileio.staged_output(dst, "export", src) as tmp:
      fam.export_hf(module, tmp, src_dir=Path(src), dtype=dtype,
                    max_shard_bytes=max_shard_bytes)
  except fileio.OutputError as e:
    raise ConversionError(str(e)) from None
  return Path(dst).absolute()


def main(argv=None) -> int:
  from puma_jax.checkpoints import CheckpointError
  from puma_jax.convert import CONVERTERS
  p = argparse.ArgumentParser(prog="python -m puma_jax.convert.export", description=__doc__)
  p.add_argument("family", choices=sorted(CONVERTERS))
  p.add_argument("--src", required=True, help="converted puma_jax model directory")
  p.add_argument("--dst", required=True, help="output HF directory")
  p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
  p.add_argument("--max_shard_gb", type=float, default=5.0)
  args = p.parse_args(argv)
  try:
    out = export(args.family, args.src, args.dst, dtype=args.dtype,
                 max_shard_bytes=int(args.max_shard_gb * 2**30))
  except (ConversionError, CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"exported {args.family} {args.src} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
