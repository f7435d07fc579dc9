"""Decoder training: sharded == single-device step; the tiny decoder config runs and learns."""

import sys
from pathlib import Path

import jax
import numpy as np

from puma_jax import sharding
from puma_jax.training import data as data_lib, init as init_lib, loop, registry
from tests.test_train import assert_same_state, assert_same_update, linear_update_config

REPO = Path(__file__).resolve().parents[1]


def small_config():
  sys.path.insert(0, str(REPO))
  from configs import decoder

  c = decoder.get_config("tiny_f3")
  # Two UNet levels instead of three: compiling the 8-way sharded step stays quick on CPU.
  u = c.model.decoder.unet
  u.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  u.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  u.block_out_channels = (16, 32)
  u.transformer_layers_per_block = (1, 1)
  u.attention_head_dim = (2, 2)
  c.train.log_every = 2
  c.train.checkpoint_every = 100
  c.train.async_checkpointing = False
  c.optim.total_steps = 16
  c.optim.warmup_steps = 2
  c.num_devices = 1  # sharding has its own tests; one device keeps compiles short
  return c


def one_step(config, mesh):
  stage = registry.make(config)
  with sharding.use_mesh(mesh):
    got = init_lib.restore_or_init(stage, None, mesh)
  batch = data_lib.global_batch(stage.device_arrays(next(stage.train_data())), mesh)
  step = stage.train_step(got.abstract.graphdef, got.abstract.tx)
  with sharding.use_mesh(mesh):
    return (*jax.jit(step)(got.state, got.frozen, got.rest, batch), got.state.params)


def test_decoder_sharded_step_equals_single_device():
  """One decoder update on 8 devices == on one: parameters, Adam's moments, loss (a first step
  that moves linearly in g, so a gradient scaled or missing a shard's rows shows)."""
  config = linear_update_config(small_config())
  ref, ref_m, init = one_step(config, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  new, m, _ = one_step(config, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  assert_same_state(new, ref, init)
  np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=1e-4)
  # only the decoder is trained: CLIP and VAE have no optimizer state
  assert set(new.params) == {"decoder"}


def test_decoder_grad_accumulation_equals_one_big_batch():
  """Per-example keys: 4 microbatches draw what one batch draws, so the update is the same."""
  config = linear_update_config(small_config())
  config.cfg_drop_prob = 0.5  # both the dropped and the kept path in an 8-example batch
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  ref, ref_m, init = one_step(config, mesh)
  assert 0 < float(ref_m["dropped"]) < 1
  config.train.grad_accum_steps = 4
  new, m, _ = one_step(config, mesh)
  for key in ("loss", "diffusion_mse", "dropped"):
    np.testing.assert_allclose(float(m[key]), float(ref_m[key]), rtol=1e-5, err_msg=key)
  assert_same_update(new, ref, init)


def test_decoder_grad_accumulation_runs(tmp_path):
  config = small_config()
  config.train.grad_accum_steps = 2
  config.data.batch_size = 16  # two microbatches of 8, one example per fake device
  config.optim.total_steps = 4
  last = loop.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(last["loss"])


def test_tiny_decoder_learns(tmp_path):
  config = small_config()
  config.train.eval_every = 16
  config.train.sample_images = 2
  config.train.sample_steps = 2
  loop.train_and_evaluate(config, str(tmp_path))
  from PIL import Image

  grid = np.asarray(Image.open(tmp_path / "samples" / "step_16.png"))
  assert grid.shape == (64, 64, 3)  # 2 held-out inputs above their 2 samples, 32 px each
  import json

  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval/sample_abs_error" in r]
  rows = [r for r in rows if "loss" in r]
  first, last = rows[0]["loss"], rows[-1]["loss"]
  assert last < first, (first, last)
  assert rows[-1]["images_per_s"] > 0
  assert len(evals) == 1 and 0 <= evals[0]["eval/sample_abs_error"] <= 1
