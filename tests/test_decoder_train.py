"""Decoder training: sharded == single-device step; the tiny decoder config runs and learns."""

import sys
from pathlib import Path

import jax
import numpy as np

from puma_jax import sharding, train
from puma_jax import tasks as tasks_lib

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
  task = tasks_lib.make(config)
  with sharding.use_mesh(mesh):
    graphdef, state, frozen, rest, _, _, tx, _ = train._restore_or_init(
        task, None, mesh, sharding.DEFAULT_RULES, config)
  batch = train._global_batch(task.device_arrays(next(task.train_data())), mesh)
  with sharding.use_mesh(mesh):
    return jax.jit(task.train_step(graphdef, tx))(state, frozen, rest, batch)


def test_decoder_sharded_step_equals_single_device():
  config = small_config()
  ref, ref_m = one_step(config, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  new, m = one_step(config, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
  worst = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
              for a, b in zip(jax.tree.leaves(jax.device_get(new.params)),
                              jax.tree.leaves(jax.device_get(ref.params))))
  assert worst < 1e-5
  # only the decoder is trained: CLIP and VAE have no optimizer state
  assert set(new.params) == {"decoder"}


def test_decoder_grad_accumulation_matches_shapes_and_runs(tmp_path):
  config = small_config()
  config.train.grad_accum_steps = 2
  config.data.batch_size = 16  # two microbatches of 8, one example per fake device
  config.optim.total_steps = 4
  last = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(last["loss"])


def test_tiny_decoder_learns(tmp_path):
  config = small_config()
  config.train.eval_every = 16
  config.train.sample_images = 2
  config.train.sample_steps = 2
  train.train_and_evaluate(config, str(tmp_path))
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
