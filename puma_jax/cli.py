"""One way to run a command-line entry point: absl flags, `--help` exits 0, bad input exits 2.

Every `python -m ...` command of the package (and of benchmarks/) ends with

    if __name__ == "__main__":
      sys.exit(cli.run(main, doc=__doc__, expected=(ConversionError, ValueError)))

`main(argv)` receives what absl leaves after the flags: the program name, then the positional
arguments. An `expected` error (bad input the user can fix) becomes one line `error: ...` on
stderr and exit status 2, as does a bad or missing flag and an `app.UsageError`; anything else
keeps its traceback. `--help` prints the docstring and the flags on stdout and exits 0.

Why not `absl.app.run` itself: it exits 1 on `--help` and on a bad flag, always ends the process
(the tests call entry points in-process and check the returned status), and parses only the
global `flags.FLAGS`, while commands that can be imported side by side (convert and
convert.export both have `--src`) keep their flags in their own `flags.FlagValues`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")

Expected = tuple[type[BaseException], ...] | Callable[[], tuple[type[BaseException], ...]]


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        flag_values: flags.FlagValues | None = None, doc: str | None = None,
        expected: Expected = (ValueError,)) -> int:
  """Parses `argv` (default `sys.argv`; argv[0] is the program) into `flag_values` (default
  `flags.FLAGS`), calls `main` with the remaining arguments and returns the exit status.

  `expected` may be a function returning the tuple, for entry points that import the modules
  defining their exceptions lazily (to keep `--help` fast).
  """
  fv = flags.FLAGS if flag_values is None else flag_values
  argv = list(sys.argv if argv is None else argv)
  options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(a in _HELP for a in options):
    try:
      print(usage(argv[0], fv, doc), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has gone, which is fine
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  # absl only sends its records to stderr once its handler is installed (app.run does this).
  logging.use_absl_handler()
  if fv.is_parsed():  # a second in-process call starts again from the defaults
    fv.unparse_flags()
  try:
    args = fv(argv)
  except flags.Error as e:
    return _fail(e)
  try:
    code = main(args)
  except app.UsageError as e:
    return _fail(e)
  except Exception as e:
    if isinstance(e, expected() if callable(expected) else expected):
      return _fail(e)
    raise
  return 0 if code is None else int(code)


def usage(prog: str, flag_values: flags.FlagValues, doc: str | None) -> str:
  """The `--help` text: the docstring (or a usage line), then this command's flags."""
  if flag_values is flags.FLAGS:
    # The global set also holds absl's own flags; show the ones the command defined.
    text = flag_values.main_module_help() or flag_values.get_help()
  else:
    text = flag_values.get_help()
  head = (doc or f"USAGE: {prog} [flags]").rstrip()
  return f"{head}\n\nflags:\n{text}" if text else head


def _fail(e: BaseException) -> int:
  msg = " ".join(str(e).split()) or type(e).__name__
  print(f"error: {msg}", file=sys.stderr)
  return 2
