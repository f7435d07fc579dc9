"""Training workdirs -> releases (python -m puma_jax.export) and tiny_release --from-workdir."""

import json
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


# A decoder trained with v-prediction on a zero-terminal-SNR schedule (the demo's recipe):
# sampled with SDXL's epsilon schedule instead, it would make wrong images without failing.
VPRED_FLAGS = (
  "--config.model.scheduler.prediction_type=v_prediction",
  "--config.model.scheduler.rescale_betas_zero_snr=True",
  "--config.model.scheduler.timestep_spacing=trailing",
)


def _vpred():
  from puma_jax.diffusion import schedulers as S

  return S.SchedulerConfig(
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
  )


@pytest.fixture(scope="module")
def vpred_workdir(tmp_path_factory):
  return _train(
    tmp_path_factory.mktemp("wd") / "dec_f4_v", "configs/decoder.py:tiny_f4", *VPRED_FLAGS
  )


def test_a_decoder_carries_its_schedule_to_every_sampling_path(
  vpred_workdir, decoder_workdir, tmp_path, monkeypatch, capsys
):
  from PIL import Image

  from puma_jax import reconstruct, sample
  from puma_jax.diffusion import sampler as SM, schedulers as S
  from puma_jax.inference.pipelines import PumaPipeline

  vpred = _vpred()
  # Recorded with the decoder: in a release, in a module dir; a default-trained decoder and a
  # random one record SDXL's defaults.
  rel = tiny_release.make(tmp_path / "rel", workdirs=[vpred_workdir])
  assert SM.decoder_scheduler_config(rel.decoder("f4")) == vpred
  assert SM.decoder_scheduler_config(rel.decoder("f0")) == S.SchedulerConfig()
  assert SM.decoder_scheduler_config(export.save_module_dir(vpred_workdir, tmp_path / "m")) == vpred
  plain = release_lib.Release.open(export.export(decoder_workdir, dst=tmp_path / "plain"))
  info = checkpoints.load_info(plain.decoder("f4"))
  assert S.from_diffusers_config(info["scheduler"]) == S.SchedulerConfig()
  assert vpred != S.SchedulerConfig()

  # Every sampler built on the way gets it: record what DecoderSampler is given.
  used = []
  real = SM.DecoderSampler.__init__

  def spy(self, decoder, vae, settings=SM.SamplerSettings(), scheduler_config=None, **kw):
    used.append(scheduler_config or S.SchedulerConfig())
    real(self, decoder, vae, settings, scheduler_config, **kw)

  monkeypatch.setattr(SM.DecoderSampler, "__init__", spy)
  pipe = PumaPipeline.from_release(rel, settings=SM.SamplerSettings(num_steps=2))
  pipe.text_to_image(["a circle"], scales=("f4",))
  assert used == [vpred]
  picture = tmp_path / "red.png"
  Image.fromarray(np.full((32, 32, 3), (200, 30, 30), np.uint8)).save(picture)
  rec_rel = export.export(vpred_workdir, dst=tmp_path / "rec")  # clip, vae, decoders/f4
  args = [f"--image={picture}", "--steps=2"]
  assert (
    sample.main(
      ["reconstruct", f"--release={rec_rel}", "--scales=f4", f"--out={tmp_path}/o", *args]
    )
    == 0
  )
  assert used[1:] == [vpred]
  parts = [f"--{p}={rec_rel / p}" for p in ("clip", "vae")] + [f"--decoder={rec_rel}/decoders/f4"]
  argv = [*parts, "--scale=f4", f"--out={tmp_path / 'o2.png'}", *args]
  assert reconstruct.main(argv) == 0
  assert used[2:] == [vpred]

  # A caller's scheduler config may change how the sampler walks the schedule, not the schedule.
  leading = PumaPipeline.from_release(
    rel,
    scheduler_config={
      "f4": S.SchedulerConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    },
  )
  assert leading.scheduler_config_for("f4").timestep_spacing == "leading"
  with pytest.raises(
    ValueError, match=r"decoder f4 .*prediction_type: 'v_prediction' -> 'epsilon'"
  ):
    PumaPipeline.from_release(rel, scheduler_config=S.SchedulerConfig()).sampler("f4")
  sdxl = tmp_path / "sdxl.json"
  sdxl.write_text(json.dumps(S.to_dict(S.SchedulerConfig())))
  capsys.readouterr()
  assert reconstruct.main([*argv, f"--scheduler_config={sdxl}"]) == 2
  err = capsys.readouterr().err
  assert "rescale_betas_zero_snr: True -> False" in err and "decoders/f4" in err
  assert len(used) == 3


def test_decoder_dirs_without_a_recorded_schedule(decoder_workdir, tmp_path):
  """Dirs written before decoders recorded their schedule mean SDXL's; a bad record is named."""
  from puma_jax.diffusion import sampler as SM, schedulers as S

  dec = export.save_module_dir(decoder_workdir, tmp_path / "d")
  path = dec / checkpoints.CONFIG_FILE
  info = checkpoints.load_info(dec)
  del info["scheduler"]
  path.write_text(json.dumps(info))
  assert SM.decoder_scheduler_config(dec) == S.SchedulerConfig()
  for bad, msg in (("v", "must be an object"), ({"prediction_type": "flow"}, "prediction_type")):
    path.write_text(json.dumps({**info, "scheduler": bad}))
    with pytest.raises(ValueError, match=rf"puma_config.json: key 'scheduler'.*{msg}"):
      SM.decoder_scheduler_config(dec)
  # A checkpoint whose stage description has no schedule: the workdir's config.json has it.
  ckpt = export.read_checkpoint(decoder_workdir)
  assert export.decoder_scheduler(ckpt) == S.to_dict(S.SchedulerConfig())
  del ckpt.meta["scheduler"]
  ckpt.config["model"]["scheduler"]["prediction_type"] = "v_prediction"
  assert export.decoder_scheduler(ckpt)["prediction_type"] == "v_prediction"
  del ckpt.config["model"]["scheduler"]
  assert export.decoder_scheduler(ckpt) == S.to_dict(S.SchedulerConfig())
