"""float16 training with dynamic loss scaling: an overflowed step is skipped (nothing changes
but the scale, halved), the run goes on, and training matches float32 within tolerance; a
loss that is really broken still stops the run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from puma_jax import precision, sharding
from puma_jax.training import loop, steps
from tests.test_train import linear_update_config, one_step, small_config


def _params_close(a, b):
  return all(
    np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
  )


def test_overflowed_step_is_skipped_and_the_scale_halved():
  # A first step that would move the parameters (no warm-up), so "nothing applied" says something.
  config = linear_update_config(small_config())
  config.precision = "float16"
  config.loss_scale.initial = 2.0**40  # the injected overflow: scaled gradients exceed f16
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  new, m, init = one_step(config, mesh)
  assert float(m["overflow"]) == 1 and float(m["finite"]) == 1  # the run would go on
  assert float(m["loss_scale"]) == 2.0**40 and np.isfinite(float(m["loss"]))
  assert float(new.loss_scale.scale) == 2.0**39
  assert int(new.step) == 1 and _params_close(new.params, init)  # nothing applied, nothing lost
  # Adam's moments and its step counts are the fresh ones: zeros (an applied overflowed step
  # would leave non-finite or non-zero moments, and counts of 1).
  opt = jax.tree.leaves(jax.device_get(new.opt_state))
  assert opt and all(np.array_equal(x, np.zeros_like(x)) for x in opt)


def test_float16_training_matches_float32():
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  losses = {}
  for prec in ("float32", "float16"):
    config = linear_update_config(small_config())  # a first step that moves, linear in g
    config.precision = prec
    # The tiny model's gradients reach ~1e1 in places: 2^15 x that overflows float16 (the
    # dynamic scale would come down within a few steps); start where one step applies.
    config.loss_scale.initial = 2.0
    new, m, init = one_step(config, mesh)
    assert "overflow" not in m or float(m["overflow"]) == 0
    losses[prec] = (float(m["loss"]), new, init)
  (l32, n32, i32), (l16, n16, _) = losses["float32"], losses["float16"]
  np.testing.assert_allclose(l16, l32, rtol=2e-2)
  d32 = [
    a - b
    for a, b in zip(
      jax.tree.leaves(jax.device_get(n32.params)), jax.tree.leaves(jax.device_get(i32))
    )
  ]
  d16 = [
    a - b
    for a, b in zip(
      jax.tree.leaves(jax.device_get(n16.params)), jax.tree.leaves(jax.device_get(i32))
    )
  ]
  num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(d16, d32))
  den = sum(float(np.sum(b**2)) for b in d32)
  assert den > 0 and (num / den) ** 0.5 < 0.1  # the same update up to float16 rounding


def test_overflow_at_the_smallest_scale_or_a_broken_loss_stops():
  params = {"w": jnp.ones(3)}
  tx = optax.sgd(0.1)
  ls = precision.DynamicLossScale.create(jnp.float16, initial=1.0)  # already at min_scale
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), ls)
  inf = {"w": jnp.array([jnp.inf, 0.0, 0.0])}
  _, m = steps.apply(state, tx, jnp.float32(1.0), inf, {})
  assert float(m["overflow"]) == 1 and float(m["finite"]) == 0
  above = dataclasses.replace(state, loss_scale=dataclasses.replace(ls, scale=jnp.float32(4)))
  _, m = steps.apply(above, tx, jnp.float32(4.0), inf, {})
  assert float(m["overflow"]) == 1 and float(m["finite"]) == 1  # skipped, the run goes on
  _, m = steps.apply(above, tx, jnp.float32(jnp.nan), {"w": jnp.ones(3)}, {})
  assert float(m["finite"]) == 0  # a broken loss stops it


def test_float16_run_survives_overflows_and_logs_them(tmp_path):
  config = small_config()
  config.precision = "float16"
  config.loss_scale.initial = 2.0**40
  config.optim.total_steps = 3
  config.train.checkpoint_every = 3
  loop.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert [r["overflow_steps"] for r in rows] == [1, 1, 1]
  assert [r["loss_scale"] for r in rows] == [2.0**40, 2.0**39, 2.0**38]
  assert all(np.isfinite(r["loss"]) and r["real_tokens_per_s"] > 0 for r in rows)
  assert 0 < rows[0]["data/real_token_fraction"] <= 1
