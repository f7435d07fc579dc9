"""Chunked text cross-entropy (`losses.text_ce`, config `loss.ce_chunk`): the same loss and
gradients as the unchunked head, whatever the chunk; chunks without a text target skip it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from puma_jax import sharding
from puma_jax.models import clip as clip_lib
from puma_jax.training import data as data_lib, init as init_lib, losses, mllm, registry
from tests.test_train import small_config


def _toy(seed=0, b=3, t=13, d=8, v=17, frac=0.3):
  rng = np.random.RandomState(seed)
  h = jnp.asarray(rng.randn(b, t, d), jnp.float32)
  w = jnp.asarray(rng.randn(d, v), jnp.float32)
  y = jnp.asarray(rng.randint(0, v, (b, t)))
  m = jnp.asarray(rng.rand(b, t) < frac)
  return h, w, y, m


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 13, 50])
def test_text_ce_chunks_equal_the_plain_cross_entropy(chunk):
  h, w, y, m = _toy()

  def ref(w, h):
    ce = optax.softmax_cross_entropy_with_integer_labels(h @ w, y)
    return jnp.where(m, ce, 0.0)

  def got(w, h):
    return losses.text_ce(lambda x: x @ w, h, y, m, chunk)

  want = ref(w, h)
  np.testing.assert_allclose(got(w, h), want, rtol=1e-6, atol=1e-6)  # per position, in place
  assert float(jnp.sum(want)) > 0 and np.all(np.asarray(want)[~np.asarray(m)] == 0)
  weight = jnp.asarray(np.random.RandomState(1).rand(*y.shape), jnp.float32)
  g_ref = jax.grad(lambda w, h: jnp.sum(weight * ref(w, h)), (0, 1))(w, h)
  g_got = jax.jit(jax.grad(lambda w, h: jnp.sum(weight * got(w, h)), (0, 1)))(w, h)
  for a, b in zip(g_got, g_ref):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_chunks_without_a_text_target_skip_the_head():
  h, w, y, _ = _toy(t=12)
  # 3 supervised positions per row, scattered: sorted to each row's front they fill one chunk
  m = np.zeros((3, 12), bool)
  m[0, [1, 6, 11]] = m[1, [0, 5, 9]] = m[2, [3, 4, 10]] = True
  calls = []

  def head(x):
    jax.debug.callback(lambda: calls.append(1))
    return x @ w

  for chunk, want in ((4, 1), (2, 2), (0, 1)):
    calls.clear()
    jax.block_until_ready(jax.jit(lambda h: losses.text_ce(head, h, y, jnp.asarray(m), chunk))(h))
    assert len(calls) == want, (chunk, len(calls))
  calls.clear()
  out = losses.text_ce(head, h, y, jnp.zeros((3, 12), bool), 4)
  assert not calls and float(jnp.sum(jnp.abs(out))) == 0  # no text target: no head at all


def test_mllm_sums_wants_per_position_cross_entropy():
  h, _, y, m = _toy()
  batch = {"text_mask": m, "text_target": y}
  with pytest.raises(ValueError, match="per position"):
    losses.mllm_sums(h, h, h, batch)  # (B, T, V) logits where (B, T) CE belongs


@pytest.fixture(scope="module")
def tiny_step_inputs():
  """The tiny model's trainable parameters and one training batch (one device)."""
  config = small_config()
  stage = registry.make(config)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with sharding.use_mesh(mesh):
    got = init_lib.restore_or_init(stage, None, mesh)
  batch = dict(data_lib.global_batch(stage.device_arrays(next(stage.train_data())), mesh))
  batch["images"] = clip_lib.normalize_uint8(batch["images"])
  batch["_normalizers"] = losses.mllm_normalizers(batch)
  return config, stage, got, batch


def test_training_objective_is_the_same_for_every_chunk(tiny_step_inputs):
  config, stage, got, batch = tiny_step_inputs
  assert stage.ce_chunk == 256  # the shipped configs chunk
  t = config.seq_len
  results = {}
  for chunk in (0, 64, 100, t):  # 100 does not divide 448
    loss_fn = mllm.objective(got.abstract.graphdef, got.frozen, got.rest, stage.weights, chunk)
    (loss, sums), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      got.state.params, batch
    )
    results[chunk] = (float(loss), sums, jax.device_get(grads))
  loss0, sums0, g0 = results[0]
  assert float(sums0["text_count"]) > 0 and float(sums0["text_ce_sum"]) > 0
  for chunk, (loss, sums, g) in results.items():
    np.testing.assert_allclose(loss, loss0, rtol=1e-5, err_msg=f"ce_chunk={chunk}")
    np.testing.assert_allclose(sums["task_text_ce_sum"], sums0["task_text_ce_sum"], rtol=1e-5)
    head = g["llm"]["lm_head"]["kernel"]
    assert np.abs(head).max() > 0  # the text loss reaches the LM head
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      scale = max(float(np.abs(b).max()), 1e-30)
      assert float(np.abs(a - b).max()) <= 1e-5 * scale, f"ce_chunk={chunk}"


def test_negative_chunk_is_refused():
  config = small_config()
  config.loss.ce_chunk = -1
  with pytest.raises(ValueError, match="loss.ce_chunk"):
    registry.make(config)


def test_min_snr_weights_by_hand_and_weighted_loss():
  """Min-SNR-gamma weights equal the hand-written formula for each target type, and the
  weighted loss is the per-example weighted mean (ones: the plain mean)."""
  from puma_jax.diffusion import schedulers as S

  ac = np.asarray(S.alphas_cumprod(S.SchedulerConfig()), np.float64)
  t = np.array([0, 10, 300, 700, 999])
  snr = ac[t] / (1 - ac[t])
  gamma = 5.0
  want = {
    "epsilon": np.minimum(snr, gamma) / snr,
    "v_prediction": np.minimum(snr, gamma) / (snr + 1),
    "sample": np.minimum(snr, gamma),
  }
  for kind, w in want.items():
    got = losses.min_snr_weights(jnp.asarray(ac), jnp.asarray(t), gamma, kind)
    np.testing.assert_allclose(np.asarray(got), w, rtol=1e-5, err_msg=kind)
  # epsilon: low-noise steps (SNR above gamma) are down-weighted, high-noise ones keep weight 1
  eps = np.asarray(losses.min_snr_weights(jnp.asarray(ac), jnp.asarray(t), gamma, "epsilon"))
  assert eps[0] < 0.01 and eps[-1] == 1.0
  with pytest.raises(ValueError, match="prediction_type"):
    losses.min_snr_weights(jnp.asarray(ac), jnp.asarray(t), gamma, "flow")
  # zero terminal SNR: the last step has SNR 0; finite weights, the formulas' limits there
  zac = jnp.asarray(S.alphas_cumprod(S.SchedulerConfig(rescale_betas_zero_snr=True)))
  assert float(zac[999]) == 0.0
  end = jnp.asarray([999, 998])
  for kind, limit in (("epsilon", 1.0), ("v_prediction", 0.0), ("sample", 0.0)):
    got = np.asarray(losses.min_snr_weights(zac, end, gamma, kind))
    assert np.all(np.isfinite(got)), kind
    assert got[0] == limit, kind
    assert abs(got[1] - limit) < 1e-3, kind  # continuous at the end

  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 3, 4, 4, 2)).astype(np.float32)
  plain = losses.diffusion_loss(pred, target)
  np.testing.assert_allclose(losses.diffusion_loss(pred, target, jnp.ones(3)), plain, rtol=1e-6)
  w = np.array([0.5, 2.0, 0.0], np.float32)
  per = ((pred - target) ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(losses.diffusion_loss(pred, target, w), (w * per).mean(), rtol=1e-6)
