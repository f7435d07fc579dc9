"""Export a converted (or trained) puma_jax model directory back to the HF layout.

    python -m puma_jax.convert.export llama --src=OUT_DIR --dst=HF_DIR [--dtype=bfloat16]

A family supports export by defining `export_hf(module, dst, *, src_dir, dtype,
max_shard_bytes)` in its `puma_jax.convert.<family>` module.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from absl import flags

from puma_jax import cli
from puma_jax.convert.core import ConversionError, write_safetensors

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# Own flag set: convert and convert.export (same flag names) are imported side by side.
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "src", None, "converted puma_jax model directory", flag_values=FLAGS, required=True
)
flags.DEFINE_string("dst", None, "output HF directory", flag_values=FLAGS, required=True)
flags.DEFINE_enum(
  "dtype", "float32", sorted(_DTYPES), "dtype of the written tensors", flag_values=FLAGS
)
flags.DEFINE_float("max_shard_gb", 5.0, "largest safetensors shard, GiB", flag_values=FLAGS)


def np_dtype(name: str):
  if name not in _DTYPES:
    raise ConversionError(f"export: unsupported dtype {name!r}; choose from {sorted(_DTYPES)}")
  return _DTYPES[name]


def write_sharded(
  tensors: Mapping[str, np.ndarray],
  dst: Path,
  max_shard_bytes: int = 5 * 2**30,
  prefix: str = "model",
) -> list[str]:
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
      fam.export_hf(module, tmp, src_dir=Path(src), dtype=dtype, max_shard_bytes=max_shard_bytes)
  except fileio.OutputError as e:
    raise ConversionError(str(e)) from None
  return Path(dst).absolute()


def _main(argv: list[str]) -> int:
  from puma_jax.convert.__main__ import family_arg

  family = family_arg(argv)
  out = export(
    family, FLAGS.src, FLAGS.dst, dtype=FLAGS.dtype, max_shard_bytes=int(FLAGS.max_shard_gb * 2**30)
  )
  print(f"exported {family} {FLAGS.src} -> {out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  from puma_jax.checkpoints import CheckpointError

  argv = sys.argv if argv is None else ["python -m puma_jax.convert.export", *argv]
  return cli.run(
    _main,
    argv,
    flag_values=FLAGS,
    doc=__doc__,
    expected=(ConversionError, CheckpointError, ValueError, FileNotFoundError),
    positional=True,
  )


if __name__ == "__main__":
  sys.exit(main())
