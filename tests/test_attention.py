"""The attention entry point: implementation choice per platform, explicit fallbacks, and the
splash kernel (Pallas, interpret mode on CPU) against XLA, forward and gradients."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puma_jax.models import layers


def dev(platform, cc=None):
  return types.SimpleNamespace(platform=platform, compute_capability=cc, device_kind="x")


def qkv(b=2, t=256, h=4, kvh=2, d=64, dtype=jnp.float32, seed=0):
  r = np.random.RandomState(seed)
  mk = lambda n: jnp.asarray(r.randn(b, t, n, d), dtype)
  return mk(h), mk(kvh), mk(kvh)


def test_choice_per_platform_and_explicit_fallbacks():
  q, k, _ = qkv(dtype=jnp.bfloat16)
  choose = layers.choose_attention
  assert choose(q, k, device=dev("cpu")) == "xla"
  assert choose(q, k, device=dev("gpu", "9.0")) == "cudnn"
  assert choose(q, k, device=dev("gpu", "7.0")) == "xla"  # V100: no flash kernel
  assert choose(q, k, device=dev("tpu")) == "splash"
  assert choose(q.astype(jnp.float32), k, device=dev("gpu", "9.0")) == "xla"
  q512, k512, _ = qkv(t=128, h=1, kvh=1, d=512, dtype=jnp.bfloat16)  # the VAE's head dim
  assert choose(q512, k512, device=dev("gpu", "9.0")) == "xla"
  assert choose(q[:, :100], k[:, :100], device=dev("tpu")) == "xla"  # not a block multiple
  with layers.attention_impl("xla"):
    assert choose(q, k, device=dev("tpu")) == "xla"
  with layers.attention_impl("cudnn"):
    with pytest.raises(ValueError, match="cudnn needs an NVIDIA GPU"):
      choose(q, k, device=dev("cpu"))
  with pytest.raises(ValueError, match="'flash'"):
    layers.set_attention_impl("flash")


def reference(q, k, v, seg, causal):
  t = q.shape[1]
  m = seg[:, :, None] == seg[:, None, :]
  m = m & (seg != 0)[:, None, :]
  if causal:
    m = m & np.tril(np.ones((t, t), bool))[None]
  return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(m)[:, None])


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_splash_interpret_equals_xla_with_segments(causal):
  q, k, v = qkv()
  seg = np.zeros((2, 256), np.int32)
  seg[0, :90], seg[0, 90:200] = 1, 2  # two packed examples, then padding
  seg[1, :256] = 1
  seg = jnp.asarray(seg)
  valid = (np.asarray(seg) > 0)[:, :, None, None]

  def run(impl):
    def f(q, k, v):
      with layers.attention_impl(impl):
        return layers.attention(q, k, v, is_causal=causal, segment_ids=seg)

    return f

  tok = layers._SPLASH_INTERPRET.set(True)
  try:
    fused = jax.jit(run("splash"))
    got = fused(q, k, v)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(valid, f(q, k, v), 0) ** 2)
    g_fused = jax.jit(jax.grad(loss(run("splash")), argnums=(0, 1, 2)))(q, k, v)
  finally:
    layers._SPLASH_INTERPRET.reset(tok)
  want = run("xla")(q, k, v)
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-5)
  np.testing.assert_allclose(
    want,
    np.where(valid, reference(q, k, v, np.asarray(seg), causal), 0) + np.where(valid, 0, want),
    atol=1e-6,
  )
  g_xla = jax.grad(loss(run("xla")), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_fused, g_xla):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_splash_under_a_mesh_runs_per_shard_and_equals_xla():
  from puma_jax import sharding

  q, k, v = qkv(b=4, h=4, kvh=2)
  seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 100 + [0] * 56], 4, 0), jnp.int32)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

  def run(impl):
    @jax.jit
    def f(q, k, v):
      with layers.attention_impl(impl):
        return layers.attention(q, k, v, is_causal=True, segment_ids=seg)

    return f

  tok = layers._SPLASH_INTERPRET.set(True)
  try:
    with sharding.use_mesh(mesh):
      got = run("splash")(q, k, v)
  finally:
    layers._SPLASH_INTERPRET.reset(tok)
  valid = (np.asarray(seg) > 0)[:, :, None, None]
  want = run("xla")(q, k, v)
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_probs_are_the_weights_attention_applies(causal):
  """`attention_probs` (the diagnostics' weights) times V is `attention` itself, with GQA,
  packed segments and padding; a padding query sees nothing and gets zero weights."""
  q, k, v = qkv(t=12, h=4, kvh=2, d=8, seed=3)
  seg = jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
  p = layers.attention_probs(q, k, is_causal=causal, segment_ids=seg)
  assert p.shape == (2, 4, 12, 12)
  out = layers.attention(q, k, v, is_causal=causal, segment_ids=seg)
  mixed = jnp.einsum("bhts,bshd->bthd", p, jnp.repeat(v, 2, axis=2))
  real = np.asarray(seg != 0)
  np.testing.assert_allclose(np.asarray(mixed)[real], np.asarray(out)[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(p.sum(-1))[0, :, :10], 1.0, atol=1e-6)
  assert float(jnp.abs(p[0, :, 10:]).max()) == 0.0  # padding queries
  assert float(p[0, :, :5, 5:].max()) == 0.0  # no look across segments
  if causal:
    assert float(jnp.triu(p, 1).max()) == 0.0


def test_capture_records_eager_calls_only():
  from flax import nnx

  from puma_jax.models import unet_blocks

  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  attn, self_attn = unet_blocks.Attention(8, 2, kv_dim=6, **kw), unet_blocks.Attention(8, 2, **kw)
  x, ctx = jnp.ones((1, 4, 8)), jnp.asarray(np.random.RandomState(0).randn(1, 3, 6), jnp.float32)
  with layers.capture_attention() as got:
    attn(x, ctx)
    self_attn(x)
    jax.jit(lambda x: attn(x, ctx))(x)  # traced: not recorded
  assert [(kind, w.shape) for kind, w in got] == [("cross", (1, 2, 4, 3)), ("self", (1, 2, 4, 4))]
  attn(x, ctx)  # outside the context: nothing
  assert len(got) == 2
