"""Adversarial data inputs: special files, huge files and texts, high-bit-depth images, missing
and truncated sources, re-running `prepare` into used outputs. Each case is refused or counted
with a reason, never hangs, and leaves what was saved unchanged."""

import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from puma_jax import fileio
from puma_jax.data import config as data_config
from puma_jax.data import imaging, parse, prepare, sources, validate
from puma_jax.data.schema import Skip
from tests.utils import tree_digest

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}


@pytest.fixture()
def no_hang():
  """Fails the test (instead of hanging CI) if it blocks for more than 20 seconds."""

  def boom(*_):
    raise TimeoutError("blocked: a reader waited on a special file")

  old = signal.signal(signal.SIGALRM, boom)
  signal.alarm(20)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, old)


def png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def small_png(tmp_path, name="ok.png"):
  arr = np.random.RandomState(0).randint(0, 256, (8, 8, 3), np.uint8)
  (tmp_path / name).write_bytes(png_bytes(Image.fromarray(arr)))
  return name


# --- special files ----------------------------------------------------------------------------


def special_files(tmp_path):
  fifo = tmp_path / "fifo.png"
  os.mkfifo(fifo)
  (tmp_path / "dir.png").mkdir()
  return {"fifo.png": "FIFO", "/dev/zero": "character device", "dir.png": "directory"}


def test_image_paths_to_special_files_are_counted_not_read(tmp_path, no_hang):
  specials = special_files(tmp_path)
  small_png(tmp_path)
  parser = parse.Parser("pairs", "src", parse.ParseOptions())
  for path, kind in specials.items():
    out = parser({"key": path, "image": path, "caption": "c", "__image_root__": str(tmp_path)})
    assert isinstance(out, Skip) and out.reason == "not_a_regular_file", out
    assert kind in out.detail
  ok = parser({"key": "k", "image": "ok.png", "caption": "c", "__image_root__": str(tmp_path)})
  assert not isinstance(ok, Skip)


def test_image_file_over_the_cap_is_skipped_unread(tmp_path):
  name = small_png(tmp_path)
  size = os.path.getsize(tmp_path / name)
  parser = parse.Parser("pairs", "src", parse.ParseOptions(max_file_bytes=size - 1))
  out = parser({"key": "k", "image": name, "caption": "c", "__image_root__": str(tmp_path)})
  assert isinstance(out, Skip) and out.reason == "file_too_large"
  cfg = data_config.get_config("tiny")
  assert cfg.max_file_bytes > 0  # the cap comes from the data config
  from puma_jax.data import pipeline

  cfg.max_file_bytes = 123
  assert pipeline.parse_options(cfg, cfg.sources.pairs).max_file_bytes == 123


def test_read_regular_refuses_specials_without_blocking(tmp_path, no_hang):
  special_files(tmp_path)
  for p in (tmp_path / "fifo.png", "/dev/zero", tmp_path / "dir.png"):
    with pytest.raises(fileio.NotRegularFileError):
      fileio.read_regular(p, 1 << 20)


def test_source_path_that_is_special_or_missing(tmp_path, no_hang):
  special_files(tmp_path)
  with pytest.raises(ValueError, match="FIFO, not a regular file"):
    sources.JsonlSource(str(tmp_path / "fifo.png"))
  with pytest.raises(ValueError, match="directory, not a regular file"):
    sources.JsonlSource(str(tmp_path / "dir.png"))
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.JsonlSource(str(tmp_path / "nothing-*.jsonl"))


# --- text caps --------------------------------------------------------------------------------


def test_long_texts_are_capped_before_tokenizing():
  opt = parse.ParseOptions(max_text_chars=1000)
  img = np.zeros((8, 8, 3), np.uint8)
  long = "word " * 1000
  for fam, rec in [
    ("pairs", {"image": img, "caption": long}),
    ("edit", {"source": img, "target": img, "instruction": long}),
    ("chat", {"conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "ok"}]}),
    ("conditional", {"image": img, "caption": long}),
  ]:
    out = parse.Parser(fam, "s", opt)({"key": "k", **rec})
    assert isinstance(out, Skip) and out.reason == "text_too_long", (fam, out)
    assert "5000 characters" in out.detail
  doc = parse.Parser("text", "s", opt)({"key": "k", "text": long})
  assert not isinstance(doc, Skip) and len(doc.text) <= 1000 and long.startswith(doc.text)
  cfg = data_config.get_config("tiny")
  from puma_jax.data import pipeline

  assert pipeline.parse_options(cfg, cfg.sources.text).max_text_chars == cfg.text.max_chars


# --- image modes ------------------------------------------------------------------------------


def gradient16():
  return (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I", "TIFF")])
def test_16_bit_png_keeps_its_levels(mode, fmt):
  g = gradient16()
  img = Image.fromarray(g) if mode == "I;16" else Image.fromarray(g.astype(np.int32), "I")
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  data = buf.getvalue()
  assert Image.open(io.BytesIO(data)).mode == mode
  out = imaging.decode_image(data)
  want = np.round(g / 257.0).astype(np.uint8)
  assert out.shape == (64, 64, 3)
  np.testing.assert_array_equal(out[..., 0], want)
  assert len(np.unique(out)) > 200
  # PIL's own convert clips at 255: almost every pixel of the gradient comes out white
  assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == 255).mean() > 0.9


def test_other_modes_convert_correctly():
  rng = np.random.RandomState(0)
  rgb = rng.randint(0, 256, (6, 6, 3), np.uint8)
  f = rng.uniform(0, 1, (6, 6)).astype(np.float32)
  out = imaging.pil_to_rgb(Image.fromarray(f, "F"))
  np.testing.assert_array_equal(out[..., 1], np.round(f * 255).astype(np.uint8))
  la = Image.fromarray(np.stack([rgb[..., 0], np.zeros((6, 6), np.uint8)], -1), "LA")
  assert (imaging.pil_to_rgb(la) == 255).all()  # fully transparent -> the white background
  p = Image.fromarray(rgb).convert("P")
  np.testing.assert_array_equal(imaging.pil_to_rgb(p), np.asarray(p.convert("RGB")))
  cmyk = Image.fromarray(rgb).convert("CMYK")
  np.testing.assert_array_equal(imaging.pil_to_rgb(cmyk), rgb)
  for mode in ("I;16", "I", "F", "LA", "P", "CMYK", "1", "L", "RGBA"):
    arr = imaging.pil_to_rgb(Image.new(mode, (3, 2)))
    assert arr.shape == (2, 3, 3) and arr.dtype == np.uint8, mode


def test_clip_preprocess_and_features_cli_read_16_bit(tmp_path):
  from puma_jax.features import load_image_files
  from puma_jax.models import clip

  g = gradient16()
  (tmp_path / "g16.png").write_bytes(png_bytes(Image.fromarray(g)))
  eight = np.repeat(np.round(g / 257.0).astype(np.uint8)[..., None], 3, -1)
  imgs = load_image_files([str(tmp_path / "g16.png")])
  np.testing.assert_array_equal(clip.preprocess_pil(imgs, 32), clip.preprocess_pil([eight], 32))
  with pytest.raises(ValueError, match="0x5"):
    clip.preprocess_pil([Image.new("RGB", (0, 5))], 32)


def run_module(args, cwd=None):
  return subprocess.run(
    [sys.executable, "-m", *args],
    capture_output=True,
    text=True,
    env=ENV,
    cwd=cwd or os.getcwd(),
    timeout=240,
  )


def test_features_cli_bad_files_exit_2(tmp_path):
  from puma_jax.features import load_image_files

  (tmp_path / "not.png").write_text("hello")
  good = png_bytes(Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7))
  (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
  for name, match in (
    ("absent.png", "No such file"),
    ("not.png", "not a readable image"),
    ("cut.png", "not a readable image"),
  ):
    with pytest.raises(ValueError, match=match):
      load_image_files([str(tmp_path / name)])
  r = run_module(["puma_jax.features", f"--image={tmp_path / 'cut.png'}"])
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "cut.png: not a readable image" in lines[0], r.stderr[-2000:]


# --- validate and prepare ---------------------------------------------------------------------


def synthetic_prepare(dst, n=12):
  cfg = data_config.get_config("tiny")
  cfg.synthetic.num_train = n
  return prepare.convert(data_config.source("pairs", 1.0, "synthetic"), cfg, str(dst))


def test_prepare_twice_into_one_dst_is_refused(tmp_path):
  dst = tmp_path / "out" / "pairs"
  first = synthetic_prepare(dst)
  assert first["written"] > 0 and len(first["files"]) == 1
  before = tree_digest(tmp_path / "out")
  with pytest.raises(fileio.OutputError, match="already has 1 shard"):
    synthetic_prepare(dst, n=20)
  assert tree_digest(tmp_path / "out") == before
  with pytest.raises(fileio.OutputError, match="must be a file prefix"):
    synthetic_prepare(tmp_path / "out")
  # a failing write leaves neither shards nor a temporary folder behind
  with pytest.raises(RuntimeError, match="simulated"):
    orig = prepare.write_array_records
    try:

      def broken(records, prefix, per_file):
        orig(records, prefix, per_file)
        raise RuntimeError("simulated disk error")

      prepare.write_array_records = broken
      synthetic_prepare(tmp_path / "out" / "other")
    finally:
      prepare.write_array_records = orig
  assert tree_digest(tmp_path / "out") == before
  assert sorted(os.listdir(tmp_path / "out")) == [os.path.basename(first["files"][0])]


def test_prepare_inlines_only_regular_files(tmp_path, no_hang):
  special_files(tmp_path)
  small_png(tmp_path)
  lines = [
    {"image": "fifo.png", "caption": "a"},
    {"image": "/dev/zero", "caption": "b"},
    {"image": "ok.png", "caption": "c"},
  ]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  cfg = data_config.get_config("tiny")
  scfg = data_config.source("pairs", 1.0, "jsonl", str(tmp_path / "d.jsonl"), str(tmp_path))
  report = prepare.convert(scfg, cfg, str(tmp_path / "ar" / "p"))
  assert report["written"] == 1 and report["skipped"] == {"not_a_regular_file": 2}


def test_validate_truncated_arrayrecord_and_missing_path_cli(tmp_path):
  files = synthetic_prepare(tmp_path / "ar" / "p")["files"]
  with open(files[0], "r+b") as f:
    f.truncate(os.path.getsize(files[0]) // 2)
  cfg = data_config.get_config("tiny")
  cfg.sources = {
    "p": data_config.source("pairs", 1.0, "arrayrecord", files[0]),
    "gone": data_config.source("pairs", 1.0, "jsonl", str(tmp_path / "no*.jsonl")),
  }
  reports, problems = validate.validate(cfg)
  errors = {r["source"]: r["error"] for r in reports}
  assert "not a readable ArrayRecord file (truncated or corrupt)" in errors["p"]
  assert files[0] in errors["p"] and "matches no file" in errors["gone"]
  r = run_module(
    [
      "puma_jax.data.validate",
      "--config=puma_jax/data/config.py:tiny",
      "--config.sources.pairs.format=arrayrecord",
      f"--config.sources.pairs.paths={files[0]}",
      *[
        f"--config.sources.{s}.weight=0"
        for s in ("grounding", "text", "chat", "edit", "conditional")
      ],
    ]
  )
  assert r.returncode == 2, r.stderr[-2000:]
  err_lines = [l for l in r.stdout.splitlines() if "ERROR" in l]
  assert len(err_lines) == 1 and "truncated or corrupt" in err_lines[0], r.stdout
  assert "Traceback" not in r.stderr


# --- sequence kinds that never fit, kind counters -------------------------------------------


def test_fit_check_names_a_kind_that_never_fits():
  from puma_jax.data import rows as sequences
  from puma_jax.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  cfg = data_config.get_config("tiny")
  for name in cfg.sources:
    cfg.sources[name].weight = 1.0 if name in ("conditional", "edit", "pairs") else 0.0
  report = sequences.fit_report(cfg, tok.encode, tok.special, sample=8)
  warnings = sequences.check_fit(report, 768, 2)
  assert len(warnings) == 1 and "kind 'conditional' never fits" in warnings[0], warnings
  assert "> seq_len=768" in warnings[0]
  assert sequences.check_fit(report, 896, 2) == []
  warnings = sequences.check_fit(report, 896, 1)
  assert {w.split(":")[0] for w in warnings} == {"data.sources.conditional", "data.sources.edit"}
  assert all("data.max_images=1" in w for w in warnings)


def test_kind_counters_name_real_kinds():
  from puma_jax.data import pipeline
  from puma_jax.sequence import KINDS

  row = {
    "tokens": np.zeros(4, np.int32),
    "kind_id": np.array([KINDS.index("edit")] * 3 + [-1], np.int32),
  }
  assert pipeline._kind_name(row) == "edit"
  assert pipeline._kind_name({"kind_id": np.array([-1], np.int32)}) == "other"
