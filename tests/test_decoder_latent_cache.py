"""The decoder stage's latent cache: the same step as from images, refused when stale, an exact
resume mid-epoch, and the prepare command's flags."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from puma_jax import sharding
from puma_jax.training import (
  data as data_lib,
  decoder,
  init as init_lib,
  latent_cache,
  loop,
  registry,
  steps,
)
from tests.test_decoder_train import REPO, small_config
from tests.test_train import read_metrics


def config_for(scale="f3", cache=""):
  c = small_config()
  if scale != c.scale:
    c.scale = scale
    c.model.decoder.num_tokens = {"f1": 64, "f3": 4}[scale]
  c.model.decoder.unet.block_out_channels = (8, 16)  # compiles stay short
  c.data.synthetic.num_train = 20  # 2.5 batches of 8: a checkpoint at step 3 is mid-epoch
  c.data.latent_cache = str(cache)
  return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A cache written from the f3 config (the one cache every scale reads)."""
  path = tmp_path_factory.mktemp("cache") / "latents"
  meta = latent_cache.write(decoder.DecoderStage(config_for("f3")), path, batch_size=8)
  return path, meta


def test_cache_layout(cache):
  path, meta = cache
  src = meta["sources"]["pairs"]
  assert src["records"] == 20 and src["written"] == 20 and not src["skipped"]
  assert meta["shapes"] == {
    "vae_mean": [16, 16, 4],
    "vae_logvar": [16, 16, 4],
    "clip_f0": [256, 64],
  }
  assert meta["bytes_per_example"] == 4 * (2 * 16 * 16 * 4 + 256 * 64)
  assert (
    json.loads((path / latent_cache.METADATA).read_text())["fingerprint"] == meta["fingerprint"]
  )


def _grads_tx():
  """An "optimizer" whose state is the last gradient, so a step returns its gradients."""
  return optax.GradientTransformation(
    lambda p: jax.tree.map(jnp.zeros_like, p),
    lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
  )


def _two_steps(config, got=None):
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  stage = registry.make(config)
  data = stage.train_data()
  if got is None:
    with sharding.use_mesh(mesh):
      got = init_lib.restore_or_init(stage, None, mesh)
  stage.check_frozen(got.frozen)
  tx = _grads_tx()
  state = steps.TrainState(got.state.step, got.state.params, tx.init(got.state.params))
  step = jax.jit(stage.train_step(got.abstract.graphdef, tx))
  out = []
  for _ in range(2):
    host = next(data)
    batch = data_lib.global_batch(stage.device_arrays(host), mesh)
    with sharding.use_mesh(mesh):
      state, m = step(state, got.frozen, got.rest, batch)
    out.append((float(m["loss"]), jax.device_get(state.opt_state), sorted(host)))
  return out, got


def test_cached_step_equals_the_image_step(cache):
  """Another scale than the cache was written from (f1 pools the cached f0 to 64 tokens): same
  examples, same keys, same loss and gradients; the cached batches hold no pixels."""
  ref, init = _two_steps(config_for("f1"))
  got, _ = _two_steps(config_for("f1", cache[0]), init)  # the same model (data differs)
  assert ref[0][2] == ["clip", "vae"]
  assert got[0][2] == ["clip_f0", "vae_logvar", "vae_mean"]
  assert ref[0][0] != ref[1][0]  # two different batches and keys
  for (loss, grads, _), (loss_ref, grads_ref, _) in zip(got, ref):
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    scale = max(float(np.abs(g).max()) for g in leaves_ref)
    assert scale > 0
    worst = max(float(np.abs(a - b).max()) for a, b in zip(leaves, leaves_ref)) / scale
    assert worst < 1e-5, worst


def test_stale_cache_is_refused(cache, tmp_path):
  path = cache[0]
  c = config_for("f3", path)
  c.model.vae.scaling_factor = 0.123
  with pytest.raises(ValueError, match=r"data.latent_cache=.*vae.scaling_factor: .*, 0.123 here"):
    registry.make(c).train_data()
  c = config_for("f3", path)
  c.data.image.center_crop = False
  with pytest.raises(ValueError, match=r"data.latent_cache=.*image.center_crop: True"):
    registry.make(c).train_data()
  c = config_for("f3", path)
  c.data.synthetic.num_train = 40
  with pytest.raises(ValueError, match=r"data.sources.pairs.*synthetic.num_train: 20"):
    registry.make(c).train_data()
  stage = registry.make(config_for("f3", path))
  stage.train_data()
  other = stage.build_frozen(nnx.Rngs(1))  # other random CLIP and VAE weights
  with pytest.raises(ValueError, match=r"data.latent_cache=.*frozen weights.*clip_weights"):
    stage.check_frozen(nnx.to_pure_dict(nnx.state(other, stage.frozen)))
  with pytest.raises(ValueError, match=r"data.latent_cache=.*no readable metadata.json"):
    registry.make(config_for("f3", tmp_path)).train_data()


def test_cached_iterator_state_restores_exactly(cache):
  """The fast twin of the resume test below: a position saved mid-epoch (20 examples, batches
  of 8) gives the same next batches in a fresh iterator."""
  stage = registry.make(config_for("f3", cache[0]))
  it = stage.train_data()
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  ref = [next(it) for _ in range(3)]
  again = stage.train_data()
  again.set_state(state)
  for a, b in zip(ref, [next(again) for _ in range(3)]):
    assert sorted(a) == sorted(b) == ["clip_f0", "vae_logvar", "vae_mean"]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(ref[0]["vae_mean"], ref[1]["vae_mean"])
  assert again.metrics()["data/examples"] == 48


@pytest.mark.slow
def test_resume_mid_epoch_with_the_cache_is_exact(cache, tmp_path):
  """Six steps (checkpoints at 3 and 6), then the step-6 checkpoint removed and the run
  resumed from step 3 (mid-epoch: 20 examples, batches of 8): steps 4-6 again, the same."""
  c = config_for("f3", cache[0])
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 3
  c.optim.total_steps = 6
  loop.train_and_evaluate(c, str(tmp_path))
  ref = read_metrics(tmp_path)
  assert sorted(ref) == list(range(1, 7))
  assert len({ref[s]["loss"] for s in range(1, 7)}) == 6
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  loop.train_and_evaluate(c, str(tmp_path))
  got = read_metrics(tmp_path)
  assert sorted(got) == list(range(1, 7))
  for s in range(4, 7):
    assert got[s]["loss"] == ref[s]["loss"], s
    assert got[s]["data/examples"] == ref[s]["data/examples"] == 8 * s


def test_prepare_command(cache, tmp_path):
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "puma_jax.data.prepare", *a],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
  )
  tiny = [
    "--decoder_config=configs/decoder.py:tiny_f3",
    "--decoder_config.data.synthetic.num_train=4",
  ]
  r = run(*tiny, "--format=jsonl", "--limit=3", f"--dst={tmp_path / 'a'}")
  assert r.returncode == 2 and "--format, --limit: not with --decoder_config" in r.stderr, r.stderr
  # an existing output is refused before any model loads (the writing itself: the fixture)
  r = run(*tiny, f"--dst={cache[0]}")
  assert r.returncode == 2 and "latent cache: --dst" in r.stderr and "not empty" in r.stderr
