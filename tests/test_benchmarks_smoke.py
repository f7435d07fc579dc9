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
