"""Compute precision policy and dynamic loss scaling for float16 training.

`precision = auto | bfloat16 | float16 | float32` (config field `precision`) picks the dtype
activations and matmuls run in; master weights and optimizer state stay float32 whatever it is.

auto resolves per device:
  * GPU with compute capability < 8 (V100, the paper's cards): float16. These cards have float16
    tensor cores (125 TFLOP/s on a V100 SXM2) but none for bfloat16, which XLA runs at the
    float32 CUDA-core rate (15.7 TFLOP/s): 8x slower.
  * GPU with compute capability >= 8 (A100, H100, H200) and TPU: bfloat16 (float32's exponent
    range, so no loss scaling is needed).
  * CPU: float32. XLA's CPU backend has no fast 16-bit matmul (bfloat16 dots are emulated and
    slower than float32), and CPU runs are tests and tiny runs, which want exact numbers.

float16 has a narrow exponent range: small gradients underflow unless the loss is scaled up
before differentiation. `DynamicLossScale` (the scheme of Micikevicius et al., "Mixed Precision
Training", as in `jmp`, which is not installable here: no wheel in our package index) multiplies
the loss by `scale`, divides the gradients back, and adjusts the scale: a step whose gradients
overflow (inf/nan) is skipped and the scale divided by `factor`; after `period` finite steps in
a row the scale is multiplied by `factor`. bfloat16 and float32 use a fixed scale of 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = ("auto", "bfloat16", "float16", "float32")


def resolve(precision: str, device=None) -> str:
  """The compute dtype name for `precision` on `device` (default: the first jax device)."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r}: choose from {PRECISIONS}")
  if precision != "auto":
    return precision
  device = device if device is not None else jax.devices()[0]
  if device.platform == "gpu" or device.platform == "cuda":
    cc = getattr(device, "compute_capability", None)
    if cc is None:
      raise ValueError(
        f"precision=auto: GPU {device.device_kind!r} reports no compute "
        "capability; set precision explicitly"
      )
    return "float16" if float(cc) < 8.0 else "bfloat16"
  if device.platform == "tpu":
    return "bfloat16"
  return "float32"


def all_finite(tree) -> jax.Array:
  """True when every element of every array leaf is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
  """Loss scale state (a pytree: it lives in the train state and in checkpoints).

  `scale` float32, `good_steps` int32 (finite steps since the last change); `period`,
  `factor`, `min_scale` and `dynamic` are static. With `dynamic=False` the scale stays put
  (bfloat16/float32: scale 1, the methods are then identities)."""

  scale: jax.Array
  good_steps: jax.Array
  period: int = dataclasses.field(default=2000, metadata=dict(static=True))
  factor: float = dataclasses.field(default=2.0, metadata=dict(static=True))
  min_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  dynamic: bool = dataclasses.field(default=True, metadata=dict(static=True))

  @classmethod
  def create(
    cls,
    dtype,
    initial: float = 2.0**15,
    period: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
  ) -> DynamicLossScale:
    """Dynamic for float16, a fixed scale of 1 otherwise."""
    dynamic = np.dtype(dtype) == np.float16
    if dynamic and not (initial >= min_scale > 0 and factor > 1 and period >= 1):
      raise ValueError(
        f"loss scale: need initial >= min_scale > 0, factor > 1, period >= 1; "
        f"got initial={initial}, min_scale={min_scale}, factor={factor}, "
        f"period={period}"
      )
    return cls(
      jnp.asarray(initial if dynamic else 1.0, jnp.float32),
      jnp.zeros((), jnp.int32),
      int(period),
      float(factor),
      float(min_scale),
      bool(dynamic),
    )

  def scale_loss(self, loss: jax.Array) -> jax.Array:
    return loss * self.scale.astype(loss.dtype) if self.dynamic else loss

  def unscale(self, grads):
    if not self.dynamic:
      return grads
    inv = 1.0 / self.scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)

  def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
    """The state after a step whose (unscaled) gradients were finite or not."""
    if not self.dynamic:
      return self
    grow = grads_finite & (self.good_steps + 1 >= self.period)
    scale = jnp.where(
      grads_finite,
      jnp.where(grow, self.scale * self.factor, self.scale),
      jnp.maximum(self.scale / self.factor, self.min_scale),
    )
    good = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0).astype(jnp.int32)
    return dataclasses.replace(self, scale=scale.astype(jnp.float32), good_steps=good)
