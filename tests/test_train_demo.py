"""python -m puma_jax.tools.train_demo: stage planning, skip / resume, progress and times (fast,
training faked); the --smoke run end to end, its release sampled (slow tier: 5:47 in CI)."""

import json
from pathlib import Path

import ml_collections
import pytest

from puma_jax import checkpoints, export
from puma_jax.tools import demo_clip, tiny_release, train_demo
from puma_jax.training import checkpoints as train_ckpt, loop

ORDER = [
  "clip",
  "vae",
  "vae_part",
  "decoder_f4",
  "decoder_f3",
  "decoder_f2",
  "decoder_f1",
  "decoder_f0",
  "pretrain",
  "pretrain_puma",
  "unified",
  "release",
  "release_untrained",
]


def fake_checkpoint(workdir: Path, step: int, manifest: bool = True):
  d = workdir / "checkpoints" / str(step)
  d.mkdir(parents=True)
  (d / "_CHECKPOINT_METADATA").write_text("{}")
  if manifest:
    (d / train_ckpt.MANIFEST).write_text(json.dumps({"sha256": {}}))


def test_plan_order_workdirs_and_shared_parts(tmp_path):
  stages = train_demo.plan(tmp_path)
  assert [s.name for s in stages] == ORDER
  by = {s.name: s for s in stages}
  clip = str(tmp_path / "parts" / "clip")
  for s in ("f0", "f4"):
    d = by[f"decoder_{s}"]
    assert d.config == f"configs/decoder.py:demo_{s}" and d.path == tmp_path / f"decoder_{s}"
    assert d.overrides == {"init.clip": clip, "init.vae": str(tmp_path / "parts" / "vae")}
  assert by["pretrain"].overrides == {"init.clip": clip}
  assert by["unified"].overrides == {"init.puma": str(tmp_path / "parts" / "pretrain_puma")}
  assert by["vae"].config == "configs/vae.py:demo"
  assert by["clip"].kind == "part" and not by["clip"].step_kind  # random: written, not trained
  assert by["clip"].steps is None
  # --clip=trained: the CLIP is trained first and both MLLM stages scale their image loss
  by = {s.name: s for s in train_demo.plan(tmp_path, clip_kind="trained")}
  assert by["clip"].step_kind == "clip" and by["clip"].steps == train_demo.CLIP_STEPS
  weight = {"loss.image_weight": train_demo.TRAINED_CLIP_IMAGE_WEIGHT}
  assert by["pretrain"].overrides == {"init.clip": clip, **weight}
  assert by["unified"].overrides["loss.image_weight"] == weight["loss.image_weight"]
  assert [s.name for s in train_demo.plan(tmp_path, clip_kind="trained")] == ORDER
  with pytest.raises(ValueError, match="--clip='pretrained'"):
    train_demo.plan(tmp_path, clip_kind="pretrained")


def test_status_from_disk(tmp_path):
  st = train_demo.Stage("x", "train", tmp_path / "x")
  assert train_demo.status(st, 10) == ("todo", 0)
  fake_checkpoint(tmp_path / "x", 4)
  assert train_demo.status(st, 10) == ("partial", 4)
  fake_checkpoint(tmp_path / "x", 10, manifest=False)  # being written: not final yet
  assert train_demo.status(st, 10) == ("partial", 10)
  (tmp_path / "x" / "checkpoints" / "10" / train_ckpt.MANIFEST).write_text('{"sha256": {}}')
  assert train_demo.status(st, 10) == ("done", 10)
  part = train_demo.Stage("p", "part", tmp_path / "p")
  assert train_demo.status(part, None)[0] == "todo"
  (tmp_path / "p").mkdir()
  (tmp_path / "p" / checkpoints.CONFIG_FILE).write_text("{}")
  assert train_demo.status(part, None)[0] == "done"


def test_load_config_like_config_flags():
  c = train_demo.load_config("configs/pretrain.py:demo", {"init.clip": "/x"})
  assert c.init.clip == "/x" and c.stage == "mllm"
  assert train_demo.load_config("configs/pretrain.py").optim.total_steps == 150  # default tiny
  with pytest.raises(ValueError, match="no field 'init.nope'"):
    train_demo.load_config("configs/pretrain.py:demo", {"init.nope": 1})
  # eval_every follows total_steps but setting it leaves total_steps alone (--smoke sets both)
  c = train_demo.load_config("configs/unified.py:demo", optional=train_demo.SMOKE)
  assert (c.optim.total_steps, c.train.total_steps, c.train.eval_every) == (2, 2, 0)
  c = train_demo.load_config("configs/unified.py:demo", {"optim.total_steps": 9})
  assert (c.train.total_steps, c.train.eval_every) == (9, 9)
  c = train_demo.load_config("configs/pretrain.py:demo", optional={"nope.deep": 1})
  assert "nope" not in c
  with pytest.raises(ValueError, match="does not exist"):
    train_demo.load_config("configs/nothing.py:demo")


@pytest.fixture
def faked(monkeypatch):
  """train_demo with training and writing faked: records the calls and writes what status()
  reads."""
  calls = []

  def load(self, smoke):
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict({"total_steps": 2 if smoke else 5})
    c.name = self.name
    return c

  def train(config, workdir):
    calls.append(config.name)
    stop = config.name == "pretrain" and faked.stop_pretrain
    # stopped: the loop saved step 1 (Ctrl-C) and returned
    fake_checkpoint(Path(workdir), 1 if stop else int(config.train.total_steps))
    return {}

  def part(name, dst):
    calls.append(name)
    Path(dst).mkdir(parents=True)
    (Path(dst) / checkpoints.CONFIG_FILE).write_text("{}")

  def release(dst, **kw):
    calls.append("untrained" if kw.get("untrained") else "trained")
    Path(dst).mkdir()
    (Path(dst) / "ok").write_text("")

  monkeypatch.setattr(train_demo.Stage, "load", load)
  monkeypatch.setattr(loop, "train_and_evaluate", train)
  monkeypatch.setattr(train_demo, "write_clip", lambda dst, seed: part("clip", dst))

  def trained_clip(dst, seed, smoke):
    part("trained_clip", dst)
    (Path(dst) / demo_clip.RECORD).write_text("{}")

  monkeypatch.setattr(train_demo, "train_clip", trained_clip)
  monkeypatch.setattr(
    export, "save_module_dir", lambda w, dst: part(f"{Path(w).name}_part", dst), raising=False
  )
  monkeypatch.setattr(tiny_release, "make", release)
  monkeypatch.setattr(train_demo, "_release_done", lambda path: (Path(path) / "ok").is_file())
  faked.stop_pretrain = False
  faked.calls = calls
  return faked


def test_runs_every_stage_then_skips_them_and_resumes_a_stopped_one(tmp_path, faked):
  out = []
  faked.stop_pretrain = True
  with pytest.raises(loop.StopTraining, match="pretrain stopped"):
    train_demo.run(tmp_path, say=out.append)
  assert faked.calls == ORDER[:9]
  assert any("stage 2/13 vae" in l and "ETA" in l for l in out), out
  times = json.loads((tmp_path / train_demo.TIMES_FILE).read_text())
  assert "decoder_f0" in times and "pretrain" not in times

  faked.calls.clear()
  faked.stop_pretrain = False
  out.clear()
  train_demo.run(tmp_path, say=out.append)
  assert faked.calls == ["pretrain", "pretrain_part", "unified", "trained", "untrained"]
  assert any("pretrain" in l and "resuming at step 1" in l for l in out), out
  assert any("decoder_f2: done" in l and "skipped" in l for l in out)
  assert "python -m puma_jax.eval --config=configs/eval/synthetic.py" in out[-1]
  times = json.loads((tmp_path / train_demo.TIMES_FILE).read_text())
  assert set(times) == set(ORDER)

  faked.calls.clear()
  train_demo.run(tmp_path, say=out.append)  # everything done: nothing runs
  assert faked.calls == []
  # resuming with the other CLIP would mix stages trained on different CLIPs
  with pytest.raises(ValueError, match="holds the random CLIP but --clip=trained"):
    train_demo.run(tmp_path, clip="trained", say=out.append)
  assert faked.calls == []


def test_trained_clip_runs_the_contrastive_stage_first(tmp_path, faked):
  train_demo.run(tmp_path / "random", say=lambda line: None)
  default_calls = list(faked.calls)
  faked.calls.clear()
  train_demo.run(tmp_path / "trained", clip="trained", say=lambda line: None)
  assert default_calls[0] == "clip" and faked.calls[0] == "trained_clip"
  assert faked.calls[1:] == default_calls[1:]
  times = json.loads((tmp_path / "trained" / train_demo.TIMES_FILE).read_text())
  assert set(times) == set(ORDER)


def test_eta_scales_priors_by_measured_speed():
  stages = train_demo.plan(Path("/w"))
  eta = train_demo.Eta(stages, {"pretrain": 100, "unified": 100})
  base = eta.left([("pretrain", 0), ("unified", 0)])
  assert base == pytest.approx(
    2 * (train_demo.PRIOR_FIXED_S + 100 * train_demo.PRIOR_STEP_S["mllm"])
  )
  eta.record("pretrain", 2 * eta.prior("pretrain"), 0)  # twice as slow as the prior
  assert eta.left([("unified", 0)]) == pytest.approx(base)
  assert eta.left([("unified", 50)]) < base


@pytest.mark.slow
def test_smoke_demo_writes_sampleable_releases(tmp_path):
  """The real --smoke run (every stage, 2 steps each; 5:47 in CI on 2 cores, mostly
  compilation: the slowest test by 5x, so in the slow tier); its releases sample through
  puma_jax.sample: one t2i image at one scale and one reconstruction. The fast twins: the same
  flow with training faked (test_runs_every_stage_then_skips_them_and_resumes_a_stopped_one),
  every demo stage's config building and stepping (tests/test_vae_stage.py,
  test_demo_configs.py), and sampling from a release (tests/test_sample.py, test_export.py)."""
  import numpy as np
  from PIL import Image

  from puma_jax import release as release_lib, sample

  w = tmp_path / "demo"
  assert train_demo.main([f"--workdir={w}", "--smoke"]) == 0
  times = json.loads((w / train_demo.TIMES_FILE).read_text())
  assert set(times) == set(ORDER)
  rel = release_lib.Release.open(w / "release")
  assert rel.scales == ("f0", "f1", "f2", "f3", "f4") and rel.image_size == 32
  assert "unified" in json.dumps(rel.manifest)  # the trained MLLM, not a random one
  base = release_lib.Release.open(w / "release_untrained")
  assert "random" in json.dumps(base.manifest["parts"]["puma"])
  img = tmp_path / "scene.png"
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(img)
  for r in (w / "release", w / "release_untrained"):
    out = tmp_path / f"t2i_{r.name}"
    common = [f"--release={r}", "--steps=2", "--scales=f1"]
    assert sample.main(["text_to_image", *common, "--prompt=a red circle", f"--out={out}"]) == 0
    assert Image.open(out / "0000_f1.png").size == (32, 32)
    out = tmp_path / f"rec_{r.name}"
    assert sample.main(["reconstruct", *common, f"--image={img}", f"--out={out}"]) == 0
    assert Image.open(out / "0000_f1.png").size == (32, 32)
  # resumed: everything done, nothing retrained
  assert train_demo.main([f"--workdir={w}", "--smoke"]) == 0
  assert json.loads((w / train_demo.TIMES_FILE).read_text()) == times
