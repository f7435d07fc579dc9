"""One way to run a command-line entry point: absl flags, `--help` exits 0, bad input exits 2.

Every `python -m ...` command of the package (and of benchmarks/) ends with

    if __name__ == "__main__":
      sys.exit(cli.run(main, doc=__doc__, expected=(ConversionError, ValueError)))

`main(argv)` receives what absl leaves after the flags: the program name, then the positional
arguments, if the command takes any (`positional=True`; otherwise `run` rejects them, so that a
stray word is never silently ignored). An `expected` error (bad input the user can fix) becomes
one line `error: ...` on stderr and exit status 2, as does a bad or missing flag and an
`app.UsageError`; anything else keeps its traceback. `--help` prints the docstring and the
flags on stdout and exits 0.

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


def run(
  main: Callable[[list[str]], int | None],
  argv: Sequence[str] | None = None,
  *,
  flag_values: flags.FlagValues | None = None,
  doc: str | None = None,
  expected: Expected = (ValueError,),
  positional: bool = False,
) -> int:
  """Parses `argv` (default `sys.argv`; argv[0] is the program) into `flag_values` (default
  `flags.FLAGS`), calls `main` with the remaining arguments and returns the exit status.

  `expected` may be a function returning the tuple, for entry points that import the modules
  defining their exceptions lazily (to keep `--help` fast). Unless `positional` is set (the
  command takes a subcommand or a family name, which `main` checks), any positional argument
  is a usage error: exit 2 before `main` runs.
  """
  quiet_tensorflow()
  fv = flags.FLAGS if flag_values is None else flag_values
  argv = list(sys.argv if argv is None else argv)
  options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  if any(a in _HELP for a in options):
    try:
      print(usage(argv[0], fv, doc), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has gone, which is fine
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  # absl only sends its records to stderr once its handler is installed (app.run does this).
  logging.use_absl_handler()
  # Every in-process call starts again from the defaults, also after a call whose parse failed
  # half-way (absl leaves the flags parsed until then set, and repeatable ones would append).
  fv.unparse_flags()
  try:
    argv = config_args(argv, fv)
    args = fv(argv)
  except (flags.Error, ConfigArgError) as e:
    return _fail(e)
  if not positional and len(args) > 1:
    return _fail(app.UsageError(f"unexpected arguments: {args[1:]}"))
  try:
    code = main(args)
  except app.UsageError as e:
    return _fail(e)
  except Exception as e:
    if isinstance(e, expected() if callable(expected) else expected):
      return _fail(e)
    raise
  return 0 if code is None else int(code)


def quiet_tensorflow() -> None:
  """Keeps TensorFlow's C++ INFO lines off the console (it is imported only for TensorBoard's
  summary writer, under clu, and computes nothing here). `TF_ENABLE_ONEDNN_OPTS=0` silences the
  "oneDNN custom operations are on" notice, which ignores `TF_CPP_MIN_LOG_LEVEL`. Both are
  defaults: a value the user set is kept. Effective only before TensorFlow is imported, which
  every entry point does after `run` starts."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class ConfigArgError(ValueError):
  """A config file that cannot be found or an override naming no field of the config."""


def _config_flag_names(fv: flags.FlagValues) -> list[str]:
  return [name for name in fv if type(fv[name].parser).__name__ == "ConfigFileFlagParser"]


def resolve_config_path(value: str) -> str:
  """`PATH[:ARG]` of a config flag, with PATH found in the current directory, else beside the
  package (the repository root) or in its `configs/` (so `--config=pretrain.py:tiny` works
  from any directory)."""
  path, colon, arg = value.partition(":")
  if os.path.exists(path):
    return value
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tried = [os.path.join(root, path), os.path.join(root, "configs", path)]
  for cand in tried:
    if os.path.isfile(cand):
      return cand + colon + arg
  raise ConfigArgError(
    f"config file {path!r} not found in the current directory, {root} or "
    f"{tried[1].rsplit(os.sep, 1)[0]}"
  )


def _leaf_paths(node, prefix: str = "") -> list[str]:
  from ml_collections import ConfigDict

  out = []
  for k in node.keys():
    v = node[k]
    p = f"{prefix}{k}"
    out += _leaf_paths(v, p + ".") if isinstance(v, (ConfigDict, dict)) else [p]
  return out


def _did_you_mean(path: str, config) -> str:
  import difflib

  leaves = _leaf_paths(config)
  leaf = path.rsplit(".", 1)[-1]
  near = difflib.get_close_matches(path, leaves, n=1, cutoff=0.6)
  if not near:  # `train.steps` -> `train.total_steps`: the name inside a longer one
    near = sorted(
      (p for p in leaves if leaf and leaf in p.rsplit(".", 1)[-1]),
      key=lambda p: (not p.startswith(path.rsplit(".", 1)[0]), len(p)),
    )[:1]
  if not near:
    near = difflib.get_close_matches(path, leaves, n=1, cutoff=0.3)
  return f"; did you mean {near[0]}?" if near else ""


def config_args(argv: list[str], fv: flags.FlagValues) -> list[str]:
  """Checks the config flags of `argv` before absl parses them: the config file is resolved
  (`resolve_config_path`) and every `--config.a.b=...` override must name a field of the
  config, else one ConfigArgError naming the full path and the nearest field. (Parsing would
  raise an AttributeError through several chained tracebacks instead.)"""
  names = _config_flag_names(fv)
  if not names:
    return argv
  from ml_collections import ConfigDict
  from ml_collections.config_flags import config_flags

  out = list(argv)
  for name in names:
    idx = [i for i, a in enumerate(out) if a.startswith(f"--{name}=")]
    if not idx and fv[name].default is None:
      continue  # an optional config flag left unset (default_as_str would read "None")
    value = out[idx[-1]].split("=", 1)[1] if idx else fv[name].default_as_str
    value = value.strip("'\"") if value else value
    if not value:
      continue
    resolved = resolve_config_path(value)
    if resolved != value:
      if idx:
        out[idx[-1]] = f"--{name}={resolved}"
      else:  # the default path, relative to the repository root
        out.insert(1, f"--{name}={resolved}")
    overrides = [a for a in out if a.startswith((f"--{name}.", f"--no{name}."))]
    if not overrides:
      continue
    config = config_flags.ConfigFileFlagParser(name, lock_config=False).parse(resolved)
    for a in overrides:
      path = a.split("=", 1)[0].split(".", 1)[1]
      node = config
      for part in path.split("."):
        if isinstance(node, (ConfigDict, dict)) and part in node:
          node = node[part]
        else:
          raise ConfigArgError(
            f"--{name}.{path}: {path} is not a field of the config "
            f"{resolved}{_did_you_mean(path, config)}"
          )
  if out != list(argv) and sys.argv[1:] == list(argv)[1:]:
    sys.argv[:] = out  # ml_collections reads the overrides from sys.argv itself
  return out


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
