"""The benchmarks run (at toy sizes): they are run by hand, so nothing else notices when an API
they call changes (bench_throughput and gpu_suite once called a removed `frozen_filter`).
Timings are printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout: int, **env) -> str:
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as by hand
  e["PYTHONPATH"] = str(ROOT)
  e.update(env)
  p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, (
    f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  )
  return p.stdout


def test_bench_throughput_packing_runs():
  out = _run(
    [sys.executable, "-m", "benchmarks.bench_throughput", "--tiny", "--only=pack", "--repeats=1"],
    timeout=600,
  )
  assert "pack: real tokens/s" in out and "packed" in out


def test_gpu_suite_mllm_section_runs(tmp_path):
  _run(
    [sys.executable, "-m", "benchmarks.gpu_suite", "mllm", f"--out={tmp_path}", "--tiny"],
    timeout=600,
  )
  result = json.loads((tmp_path / "mllm.json").read_text())
  assert result, "gpu_suite mllm wrote an empty result"


@pytest.mark.slow
def test_bench_throughput_all_run():
  out = _run([sys.executable, "-m", "benchmarks.bench_throughput", "--tiny"], timeout=1200)
  for line in ("pack:", "decode: tokens/s at batch 64", "sample:"):
    assert line in out, out


@pytest.mark.slow
def test_gpu_suite_tiny_runs(tmp_path):
  out = _run(["bash", "benchmarks/gpu_suite.sh"], timeout=1800, TINY="1", OUT=str(tmp_path))
  assert "MLLM step" in out and "decoder training" in out, out


@pytest.mark.slow
def test_bench_llama_runs():
  out = _run(
    [
      sys.executable,
      "-m",
      "benchmarks.bench_llama",
      "--new_tokens=8",
      "--prefill=64",
      "--repeats=1",
    ],
    timeout=1200,
  )
  assert '"same_tokens_as_hf": true' in out, out


def test_mllm_learning_curve_runs_and_scores_each_checkpoint(tmp_path):
  out = _run(
    [
      sys.executable,
      "-m",
      "benchmarks.mllm_learning_curve",
      f"--workdir={tmp_path}",
      "--steps=2",
      "--every=1",
      "--n=2",
      "--set=optim.warmup_steps=0",
    ],
    timeout=900,
  )
  assert "step 1: colour" in out and "step 2: colour" in out
  curve = json.loads((tmp_path / "curve.json").read_text())
  assert set(curve["rows"]) == {"1", "2"} and curve["overrides"] == {"optim.warmup_steps": 0}
  row = curve["rows"]["2"]
  assert all(0 <= row[k] <= 1 for k in ("colour_eval", "colour_train", "background_eval"))
  assert 1 <= row["describe_distinct"] <= 2
  assert "| 2 |" in (tmp_path / "curve.md").read_text()


def test_mllm_learning_curve_rejects_bad_arguments():
  from benchmarks import mllm_learning_curve as M

  assert M.parse_overrides(["a.b=3", "c=x", "d=[1, 2]"]) == {"a.b": 3, "c": "x", "d": [1, 2]}
  with pytest.raises(ValueError, match="KEY=VALUE"):
    M.parse_overrides(["novalue"])
  assert M.main(["--workdir=/tmp/unused", "--steps=3", "--every=2"]) == 2
