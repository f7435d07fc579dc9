"""puma_jax.cli: the shared entry-point runner (flags, --help, exit codes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app, flags

from puma_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def _flags():
  fv = flags.FlagValues()
  flags.DEFINE_string("src", None, "source", flag_values=fv, required=True)
  flags.DEFINE_integer("n", 1, "count", flag_values=fv)
  return fv


def test_positional_args_and_flags_reach_main():
  fv, seen = _flags(), []
  assert (
    cli.run(
      lambda argv: seen.append((argv, fv.src, fv.n)),
      ["prog", "fam", "--src=a", "--n=3"],
      flag_values=fv,
      positional=True,
    )
    == 0
  )
  # A second in-process call starts from the defaults, not from the first call's values.
  assert (
    cli.run(
      lambda argv: seen.append((argv, fv.src, fv.n)) or 7, ["prog", "--src=b"], flag_values=fv
    )
    == 7
  )
  assert seen == [(["prog", "fam"], "a", 3), (["prog"], "b", 1)]


def test_run_keeps_tensorflow_quiet_but_respects_the_user(monkeypatch):
  # Every entry point goes through cli.run before it imports TensorFlow (for TensorBoard).
  monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
  seen = []
  fv = flags.FlagValues()
  assert cli.run(lambda argv: seen.append(dict(os.environ)), ["prog"], flag_values=fv) == 0
  assert seen[0]["TF_ENABLE_ONEDNN_OPTS"] == "0"
  assert seen[0]["TF_CPP_MIN_LOG_LEVEL"] == "1"  # the user's value is kept


@pytest.mark.parametrize(
  "argv, match",
  [
    (["prog"], "--src must have a value"),
    (["prog", "--src=a", "--n=x"], "--n=x"),
    (["prog", "--src=a", "--nope=1"], "nope"),
  ],
)
def test_bad_flags_exit_2_with_one_line(argv, match, capsys):
  assert cli.run(lambda argv: 0, argv, flag_values=_flags()) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_positional_arguments_exit_2_unless_the_command_takes_them(capsys):
  ran = []
  assert cli.run(ran.append, ["prog", "--src=a", "stray"], flag_values=_flags()) == 2
  err = capsys.readouterr().err
  assert not ran and err == "error: unexpected arguments: ['stray']\n"
  assert cli.run(ran.append, ["prog", "--src=a", "sub"], flag_values=_flags(), positional=True) == 0
  assert ran == [["prog", "sub"]]


def test_expected_errors_exit_2_and_others_propagate(capsys):
  def boom(exc):
    def main(argv):
      raise exc

    return main

  fv = _flags()
  assert cli.run(boom(ValueError("bad\nvalue")), ["p", "--src=a"], flag_values=fv) == 2
  assert capsys.readouterr().err == "error: bad value\n"
  assert cli.run(boom(app.UsageError("extra")), ["p", "--src=a"], flag_values=fv, expected=()) == 2
  assert (
    cli.run(boom(KeyError("k")), ["p", "--src=a"], flag_values=fv, expected=lambda: (KeyError,))
    == 2
  )
  with pytest.raises(RuntimeError):
    cli.run(boom(RuntimeError("bug")), ["p", "--src=a"], flag_values=fv)


def test_help_exits_0_on_stdout(capsys):
  assert (
    cli.run(lambda argv: 1 / 0, ["prog", "--help"], flag_values=_flags(), doc="Usage: prog --src=X")
    == 0
  )
  out = capsys.readouterr().out
  assert out.startswith("Usage: prog --src=X") and "--src: source" in out


def test_module_help_and_bad_input_exit_codes():
  """Through a real `python -m` process, on an entry point that uses the global FLAGS."""
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "puma_jax.data.prepare", *a],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  r = run("--help")
  assert r.returncode == 0 and "--records_per_file" in r.stdout, r.stderr
  r = run("--format=synthetic", "--family=edit")
  assert r.returncode == 2 and r.stderr.strip().startswith("error: flag --dst"), r.stderr


@pytest.mark.parametrize(
  "argv, match",
  [
    (["nope", "--src=a", "--dst=b"], "unknown family 'nope'"),
    (["--src=a", "--dst=b"], "expected one FAMILY argument"),
    (["vae", "llama", "--src=a", "--dst=b"], "expected one FAMILY argument"),
    (["vae", "--dst=b"], "--src"),
  ],
)
def test_convert_cli_usage_errors(argv, match, capsys):
  from puma_jax.convert.__main__ import main

  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and match in err


def test_assemble_and_reconstruct_cli_flags(tmp_path, capsys):
  from puma_jax.assemble import main as assemble_main
  from puma_jax.reconstruct import main as reconstruct_main

  assert assemble_main(["--clip=a", "--llm=b"]) == 2
  assert "--dst" in capsys.readouterr().err
  assert assemble_main([f"--clip={tmp_path / 'no'}", "--llm=b", "--dst=c"]) == 2
  assert "no" in capsys.readouterr().err
  base = ["--decoder=d", "--clip=c", "--vae=v", "--image=i.png", "--out=o.png"]
  assert reconstruct_main(base + ["--batch=0"]) == 2
  assert "--batch" in capsys.readouterr().err
  assert reconstruct_main(base + ["--scale=f9"]) == 2
  assert "f9" in capsys.readouterr().err
  assert reconstruct_main(["--help"]) == 0
  assert "--scheduler_config" in capsys.readouterr().out


def test_a_failed_parse_leaves_nothing_for_the_next_call(tmp_path, capsys):
  """A repeatable flag given to a call whose parse failed must not carry into the next call."""
  from puma_jax.reconstruct import FLAGS
  from puma_jax.reconstruct import main as reconstruct_main

  base = ["--decoder=d", "--clip=c", "--vae=v", "--out=o.png"]
  assert reconstruct_main(base + ["--image=first.png", "--batch=0"]) == 2
  assert reconstruct_main(base + [f"--image={tmp_path / 'second.png'}"]) == 2
  assert FLAGS.image == [str(tmp_path / "second.png")]
  assert "first.png" not in capsys.readouterr().err
