"""FLOPs per token against hand-written formulas; exact device peak matching."""

import pytest

from puma_jax import perf
from puma_jax.models import llama, puma


def test_llama3_8b_at_2048_equals_the_hand_formula():
  d, L, h, kv, hd, f, v, t = 4096, 32, 32, 8, 128, 14336, 128256, 2048
  q_o = 2 * (2 * d * h * hd)  # q and o projections
  k_v = 2 * (2 * d * kv * hd)  # GQA: 8 key/value heads
  attn = 2 * (2 * h * hd * t / 2)  # QK^T and AV over half the keys (causal)
  mlp = 3 * (2 * d * f)  # SwiGLU
  forward = L * (q_o + k_v + attn + mlp) + 2 * d * v
  assert perf.flops_per_token(llama.llama3_8b(), t) == pytest.approx(3 * forward, rel=1e-12)
  # the old count (MHA-sized k/v, non-causal attention) read ~13% high
  old = 6 * L * (4 * d * h * hd + 3 * d * f) + 12 * L * t * h * hd + 6 * d * v
  assert 1.10 < old / (3 * forward) < 1.16


def test_puma_adds_projector_head_router_and_frozen_clip_forward():
  cfg = puma.paper()
  t = 2048
  d, fd = 4096, 1024
  trained = (
    perf.flops_per_token(cfg.llm, t) / 3 + 2 * (fd * d + d * d) + 2 * (d * d + d * fd) + 2 * d * 5
  )
  n, w, i = 257, 1024, 4096  # CLIP ViT-L/14 at 224: 16x16 patches + class
  clip = 2 * 256 * (3 * 14 * 14) * w + 24 * (n * (8 * w * w + 4 * w * i) + 4 * n * n * w)
  want = 3 * trained + 5 / 2048 * clip  # 5 image slots per 2048-position row
  assert perf.flops_per_token(cfg, t) == pytest.approx(want, rel=1e-12)
  assert perf.flops_per_token(cfg, t, images_per_token=0.0) == pytest.approx(3 * trained)
  with pytest.raises(TypeError, match="model_config"):
    perf.flops_per_token({"hidden_size": 4}, t)


def test_device_peaks_match_exactly():
  assert perf.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
  assert perf.peak_flops("NVIDIA H100 PCIe") == 756.5e12
  assert perf.peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
  assert perf.peak_flops("Tesla V100-SXM2-32GB", "float16") == 125e12
  assert perf.peak_flops("Tesla V100-SXM2-32GB", "bfloat16") == 15.7e12
  assert perf.peak_flops("TPU v5 lite") == 197e12 and perf.peak_flops("TPU v5") == 459e12
  assert perf.peak_flops("TPU v6 lite") == 918e12 and perf.peak_flops("TPU v4") == 275e12
  assert perf.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  # no substring matching: an unknown H100 variant or a CPU has no peak (no MFU logged)
  assert perf.peak_flops("NVIDIA H100 something") is None
  assert perf.peak_flops("cpu") is None
  assert perf.mfu(1e9, 1e3, 1, None) is None
  assert perf.mfu(1e9, 1e3, 2, 1e12) == pytest.approx(0.5)


def test_throughput_window_excludes_paused_time_and_counts_real_tokens():
  now = [0.0]
  w = perf.ThroughputWindow(1e9, 1e12, 2, clock=lambda: now[0])
  for _ in range(4):
    now[0] += 1.0
    w.add(real_tokens=500)
  with w.paused():  # an evaluation: 10 s that must not lower the rates
    now[0] += 10.0
  r = w.read()
  assert r["steps_per_s"] == pytest.approx(1.0)
  assert r["real_tokens_per_s"] == pytest.approx(500.0)
  assert r["mfu"] == pytest.approx(1e9 * 500 / 2 / 1e12)
  now[0] += 2.0  # the next window starts at the read
  w.add(real_tokens=100)
  assert perf.ThroughputWindow(None, None, 1).read()["steps_per_s"] == 0.0
  r = w.read()
  assert r["steps_per_s"] == pytest.approx(0.5) and r["real_tokens_per_s"] == pytest.approx(50)
