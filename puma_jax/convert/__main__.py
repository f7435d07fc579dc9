"""CLI: python -m puma_jax.convert FAMILY --src=DIR --dst=DIR
     python -m puma_jax.convert puma-release --src=SNAPSHOT --dst=RELEASE (puma_release.py)

Exit status 0 on success; 2 with a one-line reason on bad input (nothing partial is left in an
existing destination).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from puma_jax.convert import COMMANDS, CONVERTERS, ConversionError, convert
from puma_jax.checkpoints import CheckpointError


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in COMMANDS:
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
  p = argparse.ArgumentParser(prog="python -m puma_jax.convert", description=__doc__)
  p.add_argument("family", choices=sorted([*CONVERTERS, *COMMANDS]),
                 help="weight family to convert (puma-release: a whole release, see its --help)")
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
