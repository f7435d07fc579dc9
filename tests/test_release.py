"""The release layout (puma_jax/release.py): manifest validation, atomic writing, --into."""

import json

import pytest

from puma_jax import release as R


def _write_fake(path, text="x"):
  path.mkdir(parents=True)
  (path / "weights.txt").write_text(text)


def _build(dst, scales=("f4", "f0")):
  with R.ReleaseWriter(dst, name="test", created_by="tests") as w:
    _write_fake(w.part_dir("puma"))
    w.add_part("puma", source="random")
    _write_fake(w.part_dir("vae"))
    w.add_part("vae", source="random")
    for s in scales:
      _write_fake(w.decoder_dir(s))
      w.add_decoder(s, source=f"random {s}")
    w.set(image_size=32, clip_image_size=28)
  return dst


def test_write_and_open(tmp_path):
  rel = R.Release.open(_build(tmp_path / "rel"))
  assert rel.scales == ("f0", "f4")  # fine to coarse, whatever order they were added in
  assert rel.decoder("f4") == tmp_path / "rel" / "decoders" / "f4"
  assert rel.puma == tmp_path / "rel" / "puma" and rel.tokenizer == "byte"
  assert rel.image_size == 32 and rel.name == "test"
  assert [p.name for p in tmp_path.iterdir()] == ["rel"]  # no staging directory left behind
  with pytest.raises(R.ReleaseError, match="no decoder for scale f2"):
    rel.decoder("f2")
  with pytest.raises(R.ReleaseError, match="no 'clip' part"):
    _ = rel.clip


def test_refuses_nonempty_destination(tmp_path):
  dst = tmp_path / "rel"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  with pytest.raises(R.ReleaseError, match="not empty"):
    _build(dst)
  assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
  empty = tmp_path / "empty"
  empty.mkdir()
  assert R.Release.open(_build(empty)).scales == ("f0", "f4")


def test_failure_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with R.ReleaseWriter(tmp_path / "rel", name="x") as w:
      _write_fake(w.part_dir("vae"))
      w.add_part("vae", source="random")
      raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
  "edit, match",
  [
    (lambda m: m.pop("scales"), "missing key 'scales'"),
    (lambda m: m.update(format_version=2), "format_version"),
    (lambda m: m.update(dtype="int8"), "'dtype'"),
    (lambda m: m.update(scales=["f4", "f0"]), "'scales'"),
    (lambda m: m.update(scales=["f0", "f4", "f9"]), "'f9', not a scale"),
    (lambda m: m["parts"]["decoders"].update(f9={"path": "x", "source": ""}), "parts.decoders.f9"),
    (lambda m: m["parts"]["vae"].pop("path"), "'parts.vae' is missing key 'path'"),
    (lambda m: m["parts"]["vae"].update(path="../elsewhere"), "parts.vae.path"),
    (lambda m: m.update(image_size="big"), "'image_size' must be int"),
  ],
)
def test_bad_manifest_names_key(tmp_path, edit, match):
  dst = _build(tmp_path / "rel")
  m = json.loads((dst / R.MANIFEST).read_text())
  edit(m)
  (dst / R.MANIFEST).write_text(json.dumps(m))
  with pytest.raises(R.ReleaseError, match=match) as e:
    R.Release.open(dst)
  assert "release.json" in str(e.value)


def test_corrupt_manifest(tmp_path):
  dst = _build(tmp_path / "rel")
  (dst / R.MANIFEST).write_text('{"format_version": 1, "na')
  with pytest.raises(R.ReleaseError, match="release.json: not valid JSON"):
    R.load_manifest(dst)
  (dst / R.MANIFEST).unlink()
  with pytest.raises(R.ReleaseError, match="release.json: missing"):
    R.load_manifest(dst)


def test_missing_part_directory(tmp_path):
  dst = _build(tmp_path / "rel")
  (dst / "decoders" / "f4" / "weights.txt").unlink()
  (dst / "decoders" / "f4").rmdir()
  with pytest.raises(R.ReleaseError, match="decoders.f4"):
    R.Release.open(dst)


def test_into_adds_a_decoder(tmp_path):
  dst = _build(tmp_path / "rel", scales=("f4",))
  with R.ReleaseWriter(dst, into=True, created_by="tests") as w:
    _write_fake(w.decoder_dir("f2"), "new")
    w.add_decoder("f2", source="trained")
  rel = R.Release.open(dst)
  assert rel.scales == ("f2", "f4")
  assert (rel.decoder("f2") / "weights.txt").read_text() == "new"
  assert sorted(p.name for p in dst.iterdir()) == ["decoders", "puma", "release.json", "vae"]
  with pytest.raises(R.ReleaseError, match="refusing to replace"):
    with R.ReleaseWriter(dst, into=True) as w:
      w.decoder_dir("f4")
  # A failed addition leaves the release as it was.
  before = (dst / R.MANIFEST).read_text()
  with pytest.raises(RuntimeError):
    with R.ReleaseWriter(dst, into=True) as w:
      _write_fake(w.decoder_dir("f0"))
      w.add_decoder("f0", source="x")
      raise RuntimeError("interrupted")
  assert (dst / R.MANIFEST).read_text() == before and not (dst / "decoders" / "f0").exists()
  assert sorted(p.name for p in dst.iterdir()) == ["decoders", "puma", "release.json", "vae"]
