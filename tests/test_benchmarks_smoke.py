"""The benchmarks run (at toy sizes): they are run by hand, so nothing else notices when an API
they call changes (bench_throughput and gpu_suite once called a removed `frozen_filter`).
Timings are printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_bench_llama_tiny_runs():
  """The fast twin of test_bench_llama_runs: the same code on a 2-layer LLaMA."""
  out = _run(
    [
      sys.executable,
      "-m",
      "benchmarks.bench_llama",
      "--tiny",
      "--new_tokens=4",
      "--prompt=8",
      "--prefill=16",
      "--repeats=1",
    ],
    timeout=600,
  )
  assert '"same_tokens_as_hf": true' in out, out


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


def test_readout_probe_trains_each_reader_and_variant_and_scores_it(tmp_path):
  from benchmarks import readout_probe as R
  from puma_jax.tools import train_demo

  clip = tmp_path / "clip"
  train_demo.write_clip(clip, 0)
  lines = []
  result = R.run(
    tmp_path / "w",
    clip_dir=str(clip),
    steps=4,
    every=2,
    batch=4,
    num_train=24,
    lrs=[0.002, 0.01],
    features=["raw", "centred", "standardized"],
    readers=["probe", "puma"],
    overrides={"model.llm.rope_theta": 500000.0},
    say=lines.append,
  )
  assert result["mean_norm"] > result["spread"]  # a random CLIP's tokens share an offset
  runs = [(r["reader"], r["features"], r["lr"]) for r in result["runs"]]
  probes = [("probe", f, lr) for f in ("raw", "centred", "standardized") for lr in (0.002, 0.01)]
  assert runs == probes + [("puma", "raw", 0.002), ("puma", "raw", 0.01)]
  for r in result["runs"]:
    assert [s for s, _, _ in r["rows"]] == [2, 4]
    assert all(0 <= h <= 1 and 0 <= t <= 1 for _, h, t in r["rows"])
  assert result["num_eval"] > 50 and result["overrides"] == {"model.llm.rope_theta": 500000.0}
  assert json.loads((tmp_path / "w" / "readout.json").read_text()) == json.loads(json.dumps(result))
  table = (tmp_path / "w" / "readout.md").read_text()
  assert (
    "| probe | standardized | 0.01 | 4 | 16 |" in table and "| puma | raw | 0.01 | 4 |" in table
  )
  assert R.main([f"--workdir={tmp_path}", "--steps=3", "--every=2"]) == 2
  assert R.main([f"--workdir={tmp_path}", "--reader=puma", "--set=novalue"]) == 2


def test_readout_probe_puma_reader_learns_one_scene(tmp_path):
  """The puma reader's loss reaches the model: trained on one scene's colour it names it (the
  reader itself checks that the position it trains is the colour's first token)."""
  from benchmarks import readout_probe as R
  from puma_jax.tools import train_demo

  clip = tmp_path / "clip"
  train_demo.write_clip(clip, 0)
  images, scenes = R.single_shape("train", 12, 32)
  one = (images[:1].repeat(8, 0), scenes[:1] * 8)
  rows = R.train_puma(
    one,
    one,
    clip_dir=str(clip),
    config="configs/pretrain.py:demo",
    overrides={},
    lr=0.01,
    steps=30,
    every=30,
    batch=4,
    seed=0,
  )
  assert rows[-1][1:] == (1.0, 1.0)


def test_readout_probe_feature_variants():
  from benchmarks import readout_probe as R

  rng = np.random.default_rng(0)
  xtr = rng.normal(5.0, [1.0, 3.0], size=(40, 7, 2))
  xte = rng.normal(5.0, [1.0, 3.0], size=(10, 7, 2))
  a, b = R.transform("raw", xtr, xte)
  assert a is xtr and b is xte
  a, b = R.transform("centred", xtr, xte)
  np.testing.assert_allclose(a.reshape(-1, 2).mean(0), 0, atol=1e-9)
  np.testing.assert_allclose(b, xte - xtr.reshape(-1, 2).mean(0))
  a, _ = R.transform("standardized", xtr, xte)
  np.testing.assert_allclose(a.reshape(-1, 2).std(0), 1, atol=1e-9)
