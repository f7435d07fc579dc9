"""Config flags of every CLI: a config path resolves from any directory, an override naming no
field is one line with "did you mean <full.path>" and exit 2, a bad value exit 2."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from puma_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flag_values(default="configs/eval/reconstruction.py:toy"):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default, "a config", flag_values=fv)
  return fv


def run(argv, fv, capsys):
  seen = {}
  code = cli.run(
    lambda args: seen.update(protocol=fv.config.protocol), ["prog", *argv], flag_values=fv
  )
  return code, capsys.readouterr().err.strip(), seen


@pytest.mark.parametrize(
  "arg", ["eval/reconstruction.py:toy", "configs/eval/reconstruction.py:toy", None]
)
def test_config_path_resolves_from_another_directory(tmp_path, monkeypatch, capsys, arg):
  monkeypatch.chdir(tmp_path)
  code, err, seen = run([f"--config={arg}"] if arg else [], flag_values(), capsys)
  assert code == 0 and seen["protocol"] == "reconstruction", err
  (tmp_path / "mine.py").write_text(
    "from ml_collections import ConfigDict\n"
    "def get_config():\n  return ConfigDict({'protocol': 'own'})\n"
  )
  code, err, seen = run(["--config=mine.py"], flag_values(), capsys)
  assert code == 0 and seen["protocol"] == "own"  # the current directory comes first


@pytest.mark.parametrize(
  "arg,match",
  [
    ("--config.data.synthetic.num_itms=2", "did you mean data.synthetic.num_items?"),
    ("--config.batch_sise=3", "batch_sise is not a field .*did you mean batch_size?"),
  ],
)
def test_unknown_override_is_one_line_with_the_full_path(tmp_path, capsys, arg, match):
  import re

  code, err, _ = run(["--config=configs/eval/reconstruction.py:toy", arg], flag_values(), capsys)
  assert code == 2 and len(err.splitlines()) == 1 and re.search(match, err), err


def test_missing_config_file(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  code, err, _ = run(["--config=nothere.py"], flag_values(), capsys)
  assert code == 2 and "config file 'nothere.py' not found" in err


def test_eval_cli_from_another_directory_bad_field_and_value(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  base = [
    sys.executable,
    "-m",
    "puma_jax.eval",
    "--config=eval/reconstruction.py:toy",
    f"--workdir={tmp_path / 'w'}",
  ]
  for extra, want in (
    ("--config.data.synthetic.num_itms=2", "did you mean data.synthetic.num_items?"),
    ("--config.data.synthetic.num_items=abc", "invalid literal for int()"),
  ):
    r = subprocess.run(
      base + [extra], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and want in lines[0], r.stderr[-2000:]
  assert not (tmp_path / "w").exists()  # nothing was started
