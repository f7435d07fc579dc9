"""Precision policy per device; dynamic loss scaling: overflow skips and halves, growth."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from puma_jax import precision


def dev(platform, cc=None, kind="x"):
  return types.SimpleNamespace(platform=platform, compute_capability=cc, device_kind=kind)


def test_auto_picks_per_device():
  assert precision.resolve("auto", dev("gpu", "7.0")) == "float16"  # V100
  assert precision.resolve("auto", dev("gpu", "8.0")) == "bfloat16"  # A100
  assert precision.resolve("auto", dev("gpu", "9.0")) == "bfloat16"  # H100
  assert precision.resolve("auto", dev("tpu")) == "bfloat16"
  assert precision.resolve("auto", dev("cpu")) == "float32"
  assert precision.resolve("auto") == "float32"  # this machine
  assert precision.resolve("float16", dev("tpu")) == "float16"
  with pytest.raises(ValueError, match="precision='fp8'"):
    precision.resolve("fp8")
  with pytest.raises(ValueError, match="compute capability"):
    precision.resolve("auto", dev("gpu", None, "mystery"))


def test_overflow_halves_scale_and_finite_steps_grow_it():
  ls = precision.DynamicLossScale.create(jnp.float16, initial=1024.0, period=3)
  assert float(ls.scale_loss(jnp.float32(2.0))) == 2048.0
  g = {"w": jnp.array([2048.0, -1024.0], jnp.float16)}
  np.testing.assert_array_equal(ls.unscale(g)["w"], np.array([2.0, -1.0], np.float16))
  bad = {"w": jnp.array([jnp.inf, 1.0], jnp.float16)}
  assert not bool(precision.all_finite(bad)) and bool(precision.all_finite(g))
  adjust = jax.jit(lambda s, f: s.adjust(f))
  ls = adjust(ls, jnp.array(False))
  assert float(ls.scale) == 512.0 and int(ls.good_steps) == 0
  for _ in range(2):
    ls = adjust(ls, jnp.array(True))
  assert float(ls.scale) == 512.0 and int(ls.good_steps) == 2
  ls = adjust(ls, jnp.array(True))
  assert float(ls.scale) == 1024.0 and int(ls.good_steps) == 0
  for _ in range(20):  # never below min_scale
    ls = adjust(ls, jnp.array(False))
  assert float(ls.scale) == 1.0


def test_bfloat16_and_float32_do_not_scale():
  for dt in (jnp.bfloat16, jnp.float32):
    ls = precision.DynamicLossScale.create(dt)
    assert not ls.dynamic and float(ls.scale) == 1.0
    assert float(ls.scale_loss(jnp.float32(3.0))) == 3.0
    assert float(ls.adjust(jnp.array(False)).scale) == 1.0
  with pytest.raises(ValueError, match="factor"):
    precision.DynamicLossScale.create(jnp.float16, factor=1.0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_dot_f32_gradients_match_the_plain_dot(dtype, tol):
  """layers.dot_f32 (the LM head's float32-output matmul, backward in the compute dtype) gives
  the gradients of the float32 masters that a plain float32-output dot gives: exactly in
  float32, within bfloat16 rounding in bfloat16."""
  from puma_jax.models import layers

  rng = np.random.RandomState(0)
  x32 = jnp.asarray(rng.randn(2, 5, 16), jnp.float32)
  w32 = jnp.asarray(rng.randn(16, 33) * 0.3, jnp.float32)
  y = jnp.asarray(rng.randint(0, 33, (2, 5)))

  def loss(dot, x, w):
    logits = dot(x.astype(dtype), w.astype(dtype))
    assert logits.dtype == jnp.float32
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  plain = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
  l_ref, g_ref = jax.value_and_grad(functools.partial(loss, plain), (0, 1))(x32, w32)
  l_got, g_got = jax.value_and_grad(functools.partial(loss, layers.dot_f32), (0, 1))(x32, w32)
  assert float(l_got) == float(l_ref)  # the forward is the same dot
  for a, b in zip(g_got, g_ref):
    assert a.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(b)))
    assert err <= tol, err
