"""Training workdirs -> releases (python -m puma_jax.export) and tiny_release --from-workdir."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from puma_jax import checkpoints, export, release as release_lib
from puma_jax.tools import tiny_release

REPO = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = [
  "--config.optim.total_steps=1",
  "--config.optim.warmup_steps=1",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
  "--config.train.async_checkpointing=False",
  "--config.num_devices=1",
]


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _train(workdir, config, *extra):
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "puma_jax.main",
      f"--config={config}",
      f"--workdir={workdir}",
      *TRAIN_FLAGS,
      *extra,
    ],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def mllm_workdir(tmp_path_factory):
  """One step of the README's tiny MLLM run, cut down."""
  return _train(
    tmp_path_factory.mktemp("wd") / "mllm",
    "configs/pretrain.py",
    "--config.seq_len=448",
    "--config.data.sources.chat.weight=0",
    "--config.data.sources.edit.weight=0",
    "--config.data.sources.conditional.weight=0",
    "--config.data.max_images=1",
  )


@pytest.fixture(scope="module")
def decoder_workdir(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("wd") / "dec_f4", "configs/decoder.py:tiny_f4")


def _stored_state(workdir):
  """The checkpoint's trainable parameters, read without the export module."""
  step_dir = Path(workdir) / "checkpoints" / "1"
  return ocp.PyTreeCheckpointer().restore(step_dir / "state")["params"]


def _dotted(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix[:-1]: np.asarray(tree)}
  out = {}
  for k, v in tree.items():
    out.update(_dotted(v, f"{prefix}{k}."))
  return out


def test_export_mllm_then_add_decoder_then_sample(mllm_workdir, decoder_workdir, tmp_path):
  rel_dir = tmp_path / "rel"
  p = subprocess.run(
    [sys.executable, "-m", "puma_jax.export", f"--workdir={mllm_workdir}", f"--dst={rel_dir}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  rel = release_lib.Release.open(rel_dir)
  assert rel.tokenizer == "byte" and rel.scales == () and rel.image_size is None
  assert "step 1" in rel.manifest["parts"]["puma"]["source"]
  model = checkpoints.load_module(rel.puma, family="puma")
  ours = checkpoints.param_arrays(model)
  stored = _dotted(_stored_state(mllm_workdir))
  assert len(stored) > 10 and set(stored) < set(ours)  # the trainable part; CLIP is frozen
  for k, v in stored.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)

  # The decoder trained separately joins the release; its frozen VAE comes along.
  export.export(decoder_workdir, into=rel_dir)
  rel = release_lib.Release.open(rel_dir)
  assert rel.scales == ("f4",) and rel.has("vae") and not rel.has("clip")
  assert rel.image_size == 32 and rel.manifest["updated_by"] == "python -m puma_jax.export"
  dec = checkpoints.load_module(rel.decoder("f4"), family="puma-decoder")
  stored = _dotted(_stored_state(decoder_workdir)["decoder"])
  ours = checkpoints.param_arrays(dec)
  assert set(stored) == set(ours)
  for k, v in stored.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
  with pytest.raises(release_lib.ReleaseError, match="refusing to replace"):
    export.export(decoder_workdir, into=rel_dir)

  from puma_jax import sample

  out = tmp_path / "out"
  assert (
    sample.main(
      [
        "text_to_image",
        f"--release={rel_dir}",
        "--prompt=a circle",
        "--scales=f4",
        "--steps=2",
        f"--out={out}",
        "--devices=1",
      ]
    )
    == 0
  )
  assert (out / "0000_f4.png").exists()


def test_decoder_workdir_alone_gives_a_reconstruction_release(decoder_workdir, tmp_path):
  rel = release_lib.Release.open(export.export(decoder_workdir, dst=tmp_path / "rec"))
  assert rel.scales == ("f4",) and rel.has("clip") and rel.has("vae") and not rel.has("puma")
  assert rel.manifest["clip_image_size"] == 32


def test_tiny_release_from_workdir(mllm_workdir, tmp_path):
  rel = tiny_release.make(tmp_path / "r", workdirs=[mllm_workdir])
  assert rel.scales == ("f0", "f1", "f2", "f3", "f4") and rel.name == "tiny-trained"
  assert str(mllm_workdir) in rel.manifest["parts"]["puma"]["source"]
  assert "random" in rel.manifest["parts"]["decoders"]["f0"]["source"]


def test_bad_workdirs(tmp_path, mllm_workdir):
  with pytest.raises(export.ExportError, match="no checkpoints/ directory"):
    export.read_checkpoint(tmp_path)
  with pytest.raises(export.ExportError, match="no checkpoint at step 7"):
    export.read_checkpoint(mllm_workdir, step=7)
  with pytest.raises(export.ExportError, match="exactly one of dst"):
    export.export(mllm_workdir)
  p = subprocess.run(
    [sys.executable, "-m", "puma_jax.export", f"--workdir={tmp_path}", f"--dst={tmp_path / 'r'}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 2 and f"{tmp_path}: no checkpoints/ directory" in p.stderr
