"""CLI: python -m puma_jax.convert FAMILY --src=DIR --dst=DIR

Exit status 0 on success; 2 with a one-line reason on bad input (nothing partial is left in an
existing destination).
"""

from __future__ import annotations

import argparse
import sys
import time

from puma_jax.convert import CONVERTERS, ConversionError, convert
from puma_jax.checkpoints import CheckpointError


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m puma_jax.convert", description=__doc__)
  p.add_argument("family", choices=sorted(CONVERTERS), help="weight family to convert")
  p.add_argument("--src", required=True, help="local HF/diffusers directory (or weights file)")
  p.add_argument("--dst", required=True, help="output directory for the converted model")
  args = p.parse_args(argv)
  t0 = time.time()
  try:
    out = convert(args.family, args.src, args.dst)
  except (ConversionError, CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"converted {args.family} {args.src} -> {out} in {time.time() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
