"""The VAE stage (training/vae.py), export.save_module_dir, and the demo configs."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from puma_jax import checkpoints, export, sharding
from puma_jax.training import data as data_lib, init as init_lib, loop, registry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import decoder as decoder_config, vae as vae_config  # noqa: E402


def small_config():
  c = vae_config.get_config("tiny")
  c.optim.total_steps = 4
  c.optim.warmup_steps = 1
  c.train.log_every = 2
  c.train.checkpoint_every = 100
  c.train.eval_batches = 1
  c.train.sample_images = 3
  c.train.async_checkpointing = False
  c.num_devices = 1
  return c


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def test_steps_on_a_fixed_batch_lower_the_loss():
  config = small_config()
  config.optim.total_steps = 30
  config.optim.warmup_steps = 1
  config.optim.decay = "constant"
  stage = registry.make(config)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with sharding.use_mesh(mesh):
    got = init_lib.restore_or_init(stage, None, mesh)
  assert set(got.state.params) == {"vae"} and not jax.tree.leaves(got.frozen)  # all trained
  batch = data_lib.global_batch(stage.device_arrays(next(stage.train_data())), mesh)
  step = jax.jit(stage.train_step(got.abstract.graphdef, got.abstract.tx))
  state, losses = got.state, []
  with sharding.use_mesh(mesh):
    for _ in range(30):
      state, m = step(state, got.frozen, got.rest, batch)
      losses.append(float(m["loss"]))
      assert float(m["finite"]) == 1.0
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


def test_loss_terms_follow_the_config():
  """loss = recon + kl_weight x kl in the step; loss.recon picks L1 or MSE."""
  config = small_config()
  config.loss.kl_weight = 10.0
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  stage = registry.make(config)
  with sharding.use_mesh(mesh):
    got = init_lib.restore_or_init(stage, None, mesh)
    host = stage.device_arrays(next(stage.train_data()))
    batch = data_lib.global_batch(host, mesh)
    _, m = jax.jit(stage.train_step(got.abstract.graphdef, got.abstract.tx))(
      got.state, got.frozen, got.rest, batch
    )
  np.testing.assert_allclose(float(m["loss"]), float(m["recon"]) + 10.0 * float(m["kl"]), 1e-5)
  assert float(m["kl"]) > 0

  vae = nnx.merge(got.abstract.graphdef, got.frozen, got.state.params, got.rest).vae
  images, keys = host["vae"][:2], jax.random.split(jax.random.key(0), 2)
  config.loss.recon = "l1"
  l1 = registry.make(config).losses(vae, images, keys)[0]
  config.loss.recon = "mse"
  mse = registry.make(config).losses(vae, images, keys)[0]
  # Same draw, same reconstruction: |e| and e^2 differ unless every error is 0 or 1.
  assert float(l1) > 0 and float(mse) > 0 and abs(float(l1) - float(mse)) > 1e-4


def test_bad_loss_settings_are_named():
  config = small_config()
  config.loss.recon = "l2"
  with pytest.raises(ValueError, match="config.loss.recon"):
    registry.make(config)
  config = small_config()
  config.loss.kl_weight = -1.0
  with pytest.raises(ValueError, match="config.loss.kl_weight"):
    registry.make(config)
  config = small_config()
  config.data.image.vae_size = 0
  with pytest.raises(ValueError, match="data.image.vae_size"):
    registry.make(config).train_data()


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
  """4 steps of the tiny VAE with an evaluation at the end."""
  workdir = tmp_path_factory.mktemp("wd") / "vae"
  config = small_config()
  config.train.eval_every = 4
  loop.train_and_evaluate(config, str(workdir))
  return workdir


def test_eval_writes_psnr_and_a_grid(vae_workdir):
  from PIL import Image

  rows = [json.loads(line) for line in (vae_workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval/psnr" in r]
  assert len(evals) == 1
  assert 0 < evals[0]["eval/psnr"] < 100 and evals[0]["eval/latent_std"] > 0
  grid = np.asarray(Image.open(vae_workdir / "samples" / "step_4.png"))
  assert grid.shape == (64, 96, 3)  # 3 held-out inputs above their reconstructions, 32 px


def test_save_module_dir_feeds_the_decoder_stage_exactly(vae_workdir, tmp_path):
  ckpt = export.read_checkpoint(vae_workdir)
  assert ckpt.stage == "vae" and ckpt.step == 4
  dst = export.save_module_dir(vae_workdir, tmp_path / "vae")
  assert checkpoints.load_info(dst)["family"] == "vae"

  dcfg = decoder_config.get_config("tiny_f4")
  dcfg.model.vae = ckpt.meta["vae"]
  dcfg.init.vae = str(dst)
  stage = registry.make(dcfg)
  model = stage.build(nnx.Rngs(1))
  stage.load_pretrained(model)
  loaded = _flat(nnx.to_pure_dict(nnx.state(model.vae, nnx.Param)))
  want = _flat(ckpt.params["vae"])
  assert set(loaded) == set(want)
  for k in want:
    np.testing.assert_array_equal(loaded[k], want[k], err_msg=k)

  # Another scaling factor than the VAE was exported with: refused, naming the field.
  dcfg.model.vae.scaling_factor = 0.5
  with pytest.raises(ValueError, match="init.vae.*scaling_factor"):
    registry.make(dcfg).load_pretrained(model)


def test_vae_workdir_gives_the_release_vae(vae_workdir, tmp_path):
  from puma_jax.tools import tiny_release

  rel = tiny_release.make(tmp_path / "rel", workdirs=[vae_workdir], scales=("f4",))
  assert "training workdir" in rel.manifest["parts"]["vae"]["source"]
  got = _flat(nnx.to_pure_dict(nnx.state(checkpoints.load_module(rel.root / "vae"), nnx.Param)))
  want = _flat(export.read_checkpoint(vae_workdir).params["vae"])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_save_module_dir_errors_name_the_workdir(tmp_path, vae_workdir):
  with pytest.raises(export.ExportError, match=str(tmp_path / "nothing")):
    export.save_module_dir(tmp_path / "nothing", tmp_path / "out")
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "config.json").write_text("{}")
  with pytest.raises(export.ExportError, match="no finished checkpoint"):
    export.save_module_dir(empty, tmp_path / "out")
  with pytest.raises(export.ExportError, match="no checkpoint at step 3"):
    export.save_module_dir(vae_workdir, tmp_path / "out", step=3)
  dst = export.save_module_dir(vae_workdir, tmp_path / "out")
  with pytest.raises(export.ExportError, match="already exists"):
    export.save_module_dir(vae_workdir, dst)


@pytest.mark.parametrize("variant", ["tiny", "demo"])
def test_vae_configs_build(variant):
  c = vae_config.get_config(variant)
  assert c.to_dict()["stage"] == "vae"
  stage = registry.make(c)
  assert stage.vae_cfg.scaling_factor == (
    vae_config.DEMO_SCALING_FACTOR if variant == "demo" else 0.13025
  )
  c.optim.total_steps = 7  # evaluation follows the schedule's length
  assert c.train.eval_every == 7


@pytest.mark.parametrize("scale", ["f0", "f1", "f2", "f3", "f4"])
def test_demo_decoder_configs_build(scale):
  c = decoder_config.get_config(f"demo_{scale}")
  assert c.to_dict()["scale"] == scale
  stage = registry.make(c)
  # The decoders scale latents as the demo VAE was trained to be scaled.
  assert stage.vae_cfg == vae_config.demo_vae_config()
  # Data settings are checked when the stream is built; a batch holds both views of each image.
  batch = next(stage.train_data())
  n, clip, vae = c.data.batch_size, c.data.image.clip_size, c.data.image.vae_size
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
    "clip": ((n, clip, clip, 3), np.uint8),
    "vae": ((n, vae, vae, 3), np.uint8),
  }


def test_unknown_variants_are_named():
  with pytest.raises(ValueError, match="'demo_f9'"):
    decoder_config.get_config("demo_f9")
  with pytest.raises(ValueError, match="'large'"):
    vae_config.get_config("large")
