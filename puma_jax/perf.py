"""Honest throughput numbers: training FLOPs per real token from the real config, and the exact
peak FLOP/s of the devices we run on, for the logged MFU.

    perf.flops_per_token(model_config, seq_len)   # training FLOPs per real token
    perf.peak_flops(jax.devices()[0].device_kind, "bfloat16")

Counting conventions (2 FLOPs per multiply-add; forward + backward = 3x forward for every
trained matmul; rematerialization is not counted, as in the usual MFU definition):
  * LLaMA: q/k/v/o projections with their real head counts (grouped-query attention: k and v
    have `num_key_value_heads` heads), SwiGLU MLP (three matmuls), the LM head at every
    position (the model computes logits everywhere);
  * attention: QK^T and AV at causal cost, half of the seq_len^2 query-key pairs of a row
    (segment masking of packed rows saves no work in dense kernels, so it is not subtracted);
  * PUMA adds the input projector and the feature head (both run at every position), the
    router, and the frozen CLIP forward (no backward), amortized over the row's positions:
    CLIP encodes every image slot of a row (`data.rows.image_slots`).
Padding does its share of the work but is not a real token: the logged MFU multiplies this
by real tokens/s, so padding counts as waste.
"""

from __future__ import annotations

import numpy as np

from puma_jax.models import clip as clip_lib
from puma_jax.models import llama

# Dense (no sparsity) peak FLOP/s per device, by jax's exact `device_kind` and compute dtype.
# Sources: NVIDIA H100/H200/A100/V100 datasheets (tensor-core dense figures; TF32 for float32),
# Google Cloud TPU system-architecture pages. V100 has no bfloat16 tensor cores: bfloat16 runs
# at its float32 (CUDA-core) rate, which is why `precision.resolve("auto")` picks float16 there.
_H100_SXM = {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12}
_H100_PCIE = {"bfloat16": 756.5e12, "float16": 756.5e12, "float32": 378.0e12}
_HOPPER_NVL = {"bfloat16": 835.5e12, "float16": 835.5e12, "float32": 417.5e12}
_A100 = {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}
_V100_SXM = {"bfloat16": 15.7e12, "float16": 125e12, "float32": 15.7e12}
_V100_PCIE = {"bfloat16": 14.0e12, "float16": 112e12, "float32": 14.0e12}
_V100S = {"bfloat16": 16.4e12, "float16": 130e12, "float32": 16.4e12}


def _tpu(bf16: float) -> dict:
  # jax's default matmul precision on TPU runs float32 dots as one bfloat16 pass.
  return {"bfloat16": bf16, "float16": None, "float32": bf16}


PEAK_FLOPS: dict[str, dict[str, float | None]] = {
  "NVIDIA H100 80GB HBM3": _H100_SXM,  # H100 SXM5
  "NVIDIA H100 PCIe": _H100_PCIE,
  "NVIDIA H100 NVL": _HOPPER_NVL,
  "NVIDIA H200": _H100_SXM,  # H200 SXM: Hopper SXM clocks, more memory
  "NVIDIA H200 NVL": _HOPPER_NVL,
  "NVIDIA GH200 480GB": _H100_SXM,
  "NVIDIA A100-SXM4-40GB": _A100,
  "NVIDIA A100-SXM4-80GB": _A100,
  "NVIDIA A100-PCIE-40GB": _A100,
  "NVIDIA A100 80GB PCIe": _A100,
  "Tesla V100-SXM2-16GB": _V100_SXM,
  "Tesla V100-SXM2-32GB": _V100_SXM,
  "Tesla V100-PCIE-16GB": _V100_PCIE,
  "Tesla V100-PCIE-32GB": _V100_PCIE,
  "Tesla V100S-PCIE-32GB": _V100S,
  "TPU v4": _tpu(275e12),
  "TPU v5 lite": _tpu(197e12),  # v5e
  "TPU v5": _tpu(459e12),  # v5p
  "TPU v5p": _tpu(459e12),
  "TPU v6 lite": _tpu(918e12),  # v6e (Trillium)
}


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """The device's dense peak for `dtype`, matched exactly (the PCIe H100 is not the SXM one);
  None for a device or dtype we have no figure for (MFU is then not reported)."""
  return PEAK_FLOPS.get(str(device_kind).strip(), {}).get(str(np.dtype(dtype)))


def llama_forward_flops(cfg: llama.LlamaConfig, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per position of a LLaMA decoder, by part."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  h, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  n = cfg.num_hidden_layers
  proj = 2 * d * hd * (h + 2 * kvh) + 2 * h * hd * d
  # QK^T and AV, 2 * hd FLOPs per head per query-key pair each; causal: seq_len / 2 keys.
  attn = 2 * 2 * h * hd * (seq_len / 2)
  mlp = 2 * 3 * d * f
  return {
    "projections": n * proj,
    "attention": n * attn,
    "mlp": n * mlp,
    "lm_head": 2 * d * cfg.vocab_size,
  }


def clip_forward_flops(cfg: clip_lib.CLIPVisionConfig) -> float:
  """Forward FLOPs of one image through the CLIP vision tower (patch embedding + layers)."""
  t, d, i = cfg.num_positions, cfg.hidden_size, cfg.intermediate_size
  patch = 2 * (cfg.grid**2) * (cfg.num_channels * cfg.patch_size**2) * d
  per_layer = t * (2 * 4 * d * d + 2 * 2 * d * i) + 2 * 2 * t * t * d  # full (non-causal)
  return patch + cfg.num_hidden_layers * per_layer


def flops_per_token(model_config, seq_len: int, images_per_token: float | None = None) -> float:
  """Training FLOPs per real token: 3x the forward of everything trained, plus the frozen CLIP
  forward amortized per position. `model_config`: a `PumaConfig` or a bare `LlamaConfig`.
  `images_per_token` defaults to the image slots of a packed row per position."""
  from puma_jax.models import puma

  if isinstance(model_config, llama.LlamaConfig):
    return 3 * sum(llama_forward_flops(model_config, seq_len).values())
  if not isinstance(model_config, puma.PumaConfig):
    raise TypeError(
      f"flops_per_token: model_config must be a PumaConfig or LlamaConfig, got "
      f"{type(model_config).__name__}"
    )
  d, fd = model_config.llm.hidden_size, model_config.feature_dim
  trained = sum(llama_forward_flops(model_config.llm, seq_len).values())
  trained += 2 * (fd * d + d * d)  # projector MLP2(feature_dim -> d -> d)
  trained += 2 * (d * d + d * fd)  # feature head MLP2(d -> d -> feature_dim)
  if model_config.router:
    trained += 2 * d * puma.NUM_SCALES
  if images_per_token is None:
    from puma_jax.data.rows import image_slots

    images_per_token = image_slots(seq_len) / seq_len
  return 3 * trained + images_per_token * clip_forward_flops(model_config.clip)


def mfu(
  flops_per_real_token: float, real_tokens_per_s: float, n_devices: int, peak: float | None
) -> float | None:
  """Model FLOPs utilization: useful FLOP/s per device over the device's peak."""
  if not peak:
    return None
  return flops_per_real_token * real_tokens_per_s / n_devices / peak


class ThroughputWindow:
  """Steps, real tokens and wall time between two logged steps, without the time spent in
  evaluations and checkpoints (`paused()`), so a window that contains one does not read low.

      window = ThroughputWindow(flops_per_token, peak, n_devices)
      window.add(steps, real_tokens)     # steps done (and their real tokens)
      with window.paused(): evaluate()   # not counted
      scalars = window.read()            # and start the next window
  """

  def __init__(
    self, flops_per_real_token: float | None, peak: float | None, n_devices: int, clock=None
  ):
    import time

    self.flops, self.peak, self.n_devices = flops_per_real_token, peak, n_devices
    self._clock = clock or time.perf_counter
    self._reset()

  def _reset(self):
    self.steps, self.real_tokens, self._excluded = 0, 0, 0.0
    self._start = self._clock()

  def add(self, steps: int = 1, real_tokens: float = 0) -> None:
    self.steps += int(steps)
    self.real_tokens += int(real_tokens)

  def paused(self):
    import contextlib

    @contextlib.contextmanager
    def pause():
      t0 = self._clock()
      try:
        yield
      finally:
        self._excluded += self._clock() - t0

    return pause()

  def read(self) -> dict[str, float]:
    """steps_per_s, real_tokens_per_s and, with FLOPs per token, tflops_per_s_per_device and
    mfu (where the peak is known) over the window; starts the next window."""
    dt = max(self._clock() - self._start - self._excluded, 1e-9)
    out = {"steps_per_s": self.steps / dt}
    if self.real_tokens:
      tps = self.real_tokens / dt
      out["real_tokens_per_s"] = tps
      if self.flops:
        out["tflops_per_s_per_device"] = self.flops * tps / self.n_devices / 1e12
        m = mfu(self.flops, tps, self.n_devices, self.peak)
        if m is not None:
          out["mfu"] = m
    self._reset()
    return out
