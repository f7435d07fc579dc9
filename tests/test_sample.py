"""python -m puma_jax.sample on a tiny release: outputs, reproducibility over reruns and device
counts, every subcommand's outputs, and bad input (exit code 2, message naming it)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from puma_jax import release as release_lib
from puma_jax import sample

REPO = Path(__file__).resolve().parents[1]


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
  """The tiny release, made by the command a person runs (a fresh process)."""
  dst = tmp_path_factory.mktemp("rel") / "tiny"
  p = subprocess.run(
    [sys.executable, "-m", "puma_jax.tools.tiny_release", f"--dst={dst}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "decoders f0, f1, f2, f3, f4" in p.stdout
  return dst


@pytest.fixture()
def picture(tmp_path):
  img = np.zeros((48, 40, 3), np.uint8)
  img[8:30, 10:34] = (220, 30, 30)
  path = tmp_path / "red.png"
  Image.fromarray(img).save(path)
  return path


def assert_same_image(a, b):
  a, b = (np.asarray(Image.open(p)).astype(int) for p in (a, b))
  diff = np.abs(a - b)
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def run_main(args, capsys):
  rc = sample.main(list(args))
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


def test_text_to_image_cli_reproducible_over_devices(rel, tmp_path, capsys):
  """The issue's command in a fresh process on one device; run again: identical bytes. The
  same run on 8 fake devices (each batch split over them), and one input drawn alone with its
  recorded seed: the same images up to float rounding (XLA sums matmuls in another order for
  other per-device batch shapes: at most 1/255 in under 1% of the values)."""
  args = [
    "text_to_image",
    f"--release={rel}",
    "--prompt=a red circle",
    "--prompt=two blue squares",
    "--scales=f4,f0",
    "--steps=3",
    "--batch_size=2",
  ]
  one = tmp_path / "one"
  p = subprocess.run(
    [sys.executable, "-m", "puma_jax.sample", *args, f"--out={one}", "--devices=1"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "1/1 batches" in p.stderr
  files = sorted(f.name for f in one.iterdir())
  assert files == [
    "0000_f0.png",
    "0000_f4.png",
    "0001_f0.png",
    "0001_f4.png",
    "grid.png",
    "samples.jsonl",
  ]
  recs = [json.loads(l) for l in (one / "samples.jsonl").read_text().splitlines()]
  assert [(r["file"], r["prompt"], r["scale"], r["seed"]) for r in recs] == [
    ("0000_f4.png", "a red circle", "f4", 0),
    ("0000_f0.png", "a red circle", "f0", 0),
    ("0001_f4.png", "two blue squares", "f4", 1),
    ("0001_f0.png", "two blue squares", "f0", 1),
  ]
  for r in recs:
    assert (r["steps"], r["guidance"], r["scheduler"], r["dtype"]) == (3, 2.0, "ddpm", "float32")
    assert r["release"] == str(rel.absolute()) and r["decoder"].endswith(f"decoders/{r['scale']}")
  size = release_lib.Release.open(rel).image_size
  assert np.asarray(Image.open(one / "0000_f0.png")).shape == (size, size, 3)
  grid = np.asarray(Image.open(one / "grid.png"))
  assert grid.shape[0] > 2 * size and grid.shape[1] > 2 * size
  assert not np.array_equal(
    np.asarray(Image.open(one / "0000_f0.png")), np.asarray(Image.open(one / "0001_f0.png"))
  )

  again = tmp_path / "again"
  rc, _, err = run_main([*args, f"--out={again}", "--devices=1"], capsys)
  assert rc == 0, err
  for name in files:
    assert (one / name).read_bytes() == (again / name).read_bytes(), name

  eight = tmp_path / "eight"
  rc, stdout, err = run_main([*args, f"--out={eight}"], capsys)
  assert rc == 0 and "8 device(s)" in stdout, err
  for name in files[:4]:
    assert_same_image(one / name, eight / name)
  assert (one / "samples.jsonl").read_text() == (eight / "samples.jsonl").read_text()

  # One input alone with its recorded seed: the same image as in the batch.
  alone = tmp_path / "alone"
  rc, _, err = run_main(
    [
      "text_to_image",
      f"--release={rel}",
      "--prompt=two blue squares",
      "--scales=f4",
      "--steps=3",
      "--seed=1",
      f"--out={alone}",
    ],
    capsys,
  )
  assert rc == 0, err
  assert_same_image(alone / "0000_f4.png", one / "0001_f4.png")


def test_chat_and_ground_answers_in_input_order(rel, tmp_path, picture, capsys):
  lines = [{"image": picture.name, "prompt": q} for q in ("What colour?", "How many?", "Why?")]
  pf = tmp_path / "questions.jsonl"
  pf.write_text("".join(json.dumps(l) + "\n" for l in lines))
  out = tmp_path / "chat"
  rc, stdout, err = run_main(
    [
      "chat",
      f"--release={rel}",
      f"--prompts_file={pf}",
      "--batch_size=2",
      "--max_new_tokens=3",
      f"--out={out}",
    ],
    capsys,
  )
  assert rc == 0, err
  recs = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
  assert [(r["index"], r["prompt"]) for r in recs] == [
    (0, "What colour?"),
    (1, "How many?"),
    (2, "Why?"),
  ]
  assert all(r["image"] == str(picture) and isinstance(r["answer"], str) for r in recs)
  assert "What colour? ->" in stdout

  out = tmp_path / "ground"
  rc, _, err = run_main(
    [
      "ground",
      f"--release={rel}",
      f"--image={picture}",
      "--prompt=the red box",
      "--prompt=the sky",
      f"--out={out}",
    ],
    capsys,
  )
  assert rc == 0, err
  recs = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in recs] == ["the red box", "the sky"]
  for r in recs:
    assert isinstance(r["boxes"], list) and all(len(b) == 4 for b in r["boxes"])
    drawn = Image.open(out / r["file"])
    assert drawn.size == Image.open(picture).size


def test_draw_box_marks_the_box():
  img = Image.new("RGB", (100, 50), "white")
  drawn = np.asarray(sample.draw_box(img, [0.2, 0.2, 0.6, 0.8]))
  assert tuple(drawn[10, 20]) == (255, 0, 0)  # top-left corner of the box
  assert tuple(drawn[25, 40]) == (255, 255, 255)  # inside stays untouched
  assert np.array_equal(np.asarray(sample.draw_box(img, None)), np.asarray(img))


def test_reconstruct_and_edit(rel, tmp_path, picture, capsys):
  out = tmp_path / "rec"
  rc, _, err = run_main(
    [
      "reconstruct",
      f"--release={rel}",
      f"--image={picture}",
      "--scales=f4,f3",
      "--steps=2",
      f"--out={out}",
    ],
    capsys,
  )
  assert rc == 0, err
  recs = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
  assert [(r["file"], r["image"]) for r in recs] == [
    ("0000_f4.png", str(picture)),
    ("0000_f3.png", str(picture)),
  ]
  out = tmp_path / "edit"
  rc, _, err = run_main(
    [
      "edit",
      f"--release={rel}",
      f"--image={picture}",
      "--prompt=make it blue",
      "--steps=2",
      f"--out={out}",
    ],
    capsys,
  )
  assert rc == 0, err
  (rec,) = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
  assert rec["scale"] in ("f0", "f1", "f2", "f3", "f4") and rec["scale_chosen_by"] == "router"
  assert (out / rec["file"]).exists() and (out / "grid.png").exists()


def test_progress_prints_a_bounded_number_of_lines(capsys):
  p = sample.Progress(500, "t2i")
  for _ in range(500):
    p.update()
  lines = capsys.readouterr().err.splitlines()
  assert 20 <= len(lines) <= 21 and lines[-1].startswith("t2i [####") and "500/500" in lines[-1]


@pytest.fixture(scope="module")
def rel_without_f0(rel, tmp_path_factory):
  dst = tmp_path_factory.mktemp("rel") / "no_f0"
  shutil.copytree(rel, dst, ignore=lambda d, names: ["f0"] if d.endswith("decoders") else [])
  m = release_lib.load_manifest(dst)
  del m["parts"]["decoders"]["f0"]
  m["scales"].remove("f0")
  release_lib.write_manifest(dst, m)
  return dst


def test_bad_input_exit_code_2_naming_it(rel, rel_without_f0, tmp_path, capsys):
  out = f"--out={tmp_path / 'o'}"
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "release.json").write_text('{"format_version": 1, "name": ')
  not_image = tmp_path / "notes.png"
  not_image.write_text("not a picture")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  cases = [
    (
      ["text_to_image", f"--release={rel_without_f0}", "--prompt=x", "--scales=f4,f0", out],
      "no decoder for scale f0",
    ),
    (
      ["text_to_image", f"--release={corrupt}", "--prompt=x", out],
      f"{corrupt / 'release.json'}: not valid JSON",
    ),
    (
      ["edit", f"--release={rel}", f"--image={not_image}", "--prompt=x", out],
      f"image {not_image} cannot be read",
    ),
    (
      ["text_to_image", f"--release={rel}", "--prompt=x", "--scales=f4,f7", out],
      "unknown scale 'f7'",
    ),
    (["paint", f"--release={rel}", "--prompt=x", out], "unknown subcommand 'paint'"),
    (
      ["text_to_image", f"--release={rel}", f"--prompts_file={empty}", out],
      f"--prompts_file {empty} is empty",
    ),
    (["text_to_image", f"--release={rel}", "--prompt=x", "--scheduler=magic", out], "scheduler"),
    (["conditional", f"--release={rel}", f"--image={not_image}", out], "--condition"),
    (["text_to_image", f"--release={tmp_path / 'nowhere'}", "--prompt=x", out], "not a directory"),
  ]
  for args, message in cases:
    rc, _, err = run_main(args, capsys)
    assert rc == 2, (args, err)
    assert message in err, (args, err)
  assert not (tmp_path / "o").exists()  # nothing written for rejected runs


def test_cli_exit_code_2():
  p = subprocess.run(
    [sys.executable, "-m", "puma_jax.sample", "paint", "--out=/tmp/x"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 2 and "unknown subcommand 'paint'" in p.stderr


def test_scheduler_choices_come_from_the_schedulers_module():
  from absl import flags
  from puma_jax.diffusion import schedulers

  fv = flags.FlagValues()
  sample.define_flags(fv)
  assert fv["scheduler"].parser.enum_values == sorted(schedulers.SCHEDULERS)


def test_pipeline_loads_only_the_decoders_a_request_needs_in_its_dtype(rel):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from puma_jax.diffusion.sampler import SamplerSettings
  from puma_jax.inference.pipelines import PumaPipeline

  pipe = PumaPipeline.from_release(
    rel, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, settings=SamplerSettings(num_steps=1)
  )
  assert pipe.scales == ("f0", "f1", "f2", "f3", "f4") and pipe.decoders == {}
  out = pipe.text_to_image(["a red circle"], scales=("f4",))
  assert set(pipe.decoders) == {"f4"} and out["f4"].shape == (1, 32, 32, 3)
  for module in (pipe.model, pipe.decoders["f4"], pipe.vae):
    assert {x.dtype for x in jax.tree.leaves(nnx.state(module, nnx.Param))} == {
      jnp.dtype(jnp.bfloat16)
    }
