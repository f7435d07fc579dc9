"""CLI: python -m puma_jax.convert FAMILY --src=DIR --dst=DIR
     python -m puma_jax.convert puma-release --src=SNAPSHOT --dst=RELEASE (see its --help)

Exit status 0 on success; 2 with a one-line reason on bad input (nothing partial is left in an
existing destination).
"""

from __future__ import annotations

import importlib
import sys
import time

from absl import app, flags

from puma_jax import cli
from puma_jax.checkpoints import CheckpointError
from puma_jax.convert import COMMANDS, CONVERTERS, ConversionError, convert

# Own flag set: convert and convert.export (same flag names) are imported side by side.
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "src", None, "local HF/diffusers directory (or weights file)", flag_values=FLAGS, required=True
)
flags.DEFINE_string(
  "dst", None, "output directory for the converted model", flag_values=FLAGS, required=True
)

PROG = "python -m puma_jax.convert"
EXPECTED = (ConversionError, CheckpointError, ValueError, FileNotFoundError)


def family_arg(argv: list[str]) -> str:
  """The one positional argument, a family of `CONVERTERS` (shared with convert.export)."""
  if len(argv) != 2:
    raise app.UsageError(
      f"expected one FAMILY argument ({', '.join(sorted(CONVERTERS))}), got {argv[1:]}"
    )
  if argv[1] not in CONVERTERS:
    raise app.UsageError(f"unknown family {argv[1]!r}; choose from {sorted(CONVERTERS)}")
  return argv[1]


def _main(argv: list[str]) -> int:
  family = family_arg(argv)
  t0 = time.time()
  out = convert(family, FLAGS.src, FLAGS.dst)
  print(f"converted {family} {FLAGS.src} -> {out} in {time.time() - t0:.1f}s")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  argv = sys.argv if argv is None else [PROG, *argv]
  if len(argv) > 1 and argv[1] in COMMANDS:  # a command with flags of its own
    return importlib.import_module(COMMANDS[argv[1]]).main(argv[2:])
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__, expected=EXPECTED, positional=True)


if __name__ == "__main__":
  sys.exit(main())
