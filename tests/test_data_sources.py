"""Every reader on a small real-format sample written here: tar shard, parquet, JSONL with an
image folder, LLaVA json, GRIT-style jsonl, text jsonl, editing triplets, ArrayRecord."""

import io
import sys
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from puma_jax.data import config as data_config
from puma_jax.data import parse, pipeline, prepare, sources
from puma_jax.data.schema import IMAGE_PLACEHOLDER, Example, Skip


def img_array(seed, h=40, w=56):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def jpeg(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def add_member(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def parse_all(reader, family, name="src", **opts):
  p = parse.Parser(family, name, parse.ParseOptions(**opts))
  return [p(reader[i]) for i in range(len(reader))]


def test_webdataset_tar_shard(tmp_path):
  arrs = [img_array(i) for i in range(3)]
  path = tmp_path / "shard-000.tar"
  with tarfile.open(path, "w") as tar:
    add_member(tar, "000.png", png(arrs[0]))
    add_member(tar, "000.txt", b"a red cat")
    add_member(tar, "001.jpg", jpeg(arrs[1]))
    add_member(tar, "001.json", json.dumps({"TEXT": "a blue dog", "width": 56}).encode())
    add_member(tar, "002.png", png(arrs[2]))  # no caption: skipped, counted
  src = sources.WebDatasetSource(str(path), fields={"caption": "TEXT"})
  assert len(src) == 3
  out = parse_all(src, "pairs")
  assert isinstance(out[0], Example) and out[0].text == "a red cat"
  np.testing.assert_array_equal(out[0].images[0], arrs[0])  # PNG is lossless
  assert out[1].text == "a blue dog" and out[1].images[0].shape == (40, 56, 3)
  assert isinstance(out[2], Skip) and out[2].reason == "missing_caption"
  assert out[0].key == "src/000"


def test_webdataset_truncated_shard_keeps_good_members(tmp_path):
  path = tmp_path / "shard.tar"
  with tarfile.open(path, "w") as tar:
    for i in range(4):
      add_member(tar, f"{i:03d}.png", png(img_array(i, 64, 64)))
      add_member(tar, f"{i:03d}.txt", f"caption {i}".encode())
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # cut the shard in the middle of a member
  src = sources.WebDatasetSource(str(path))
  out = parse_all(src, "pairs")
  good = [o for o in out if isinstance(o, Example)]
  bad = [o for o in out if isinstance(o, Skip)]
  assert 1 <= len(good) < 4 and len(good) + len(bad) == len(src)
  assert all(
    b.reason in ("truncated_shard", "missing_caption", "decode_error", "missing_image") for b in bad
  )


def test_parquet_bytes_struct_and_path_columns(tmp_path):
  arrs = [img_array(i) for i in range(3)]
  (tmp_path / "imgs").mkdir()
  Image.fromarray(arrs[2]).save(tmp_path / "imgs" / "c.png")
  t1 = pa.table({"jpg": [png(arrs[0]), png(arrs[1])], "TEXT": ["one", None]})
  pq.write_table(t1, tmp_path / "a.parquet", row_group_size=1)
  t2 = pa.table({"image": [{"bytes": None, "path": "c.png"}], "caption": ["three"]})
  pq.write_table(t2, tmp_path / "b.parquet")
  a = sources.ParquetSource(str(tmp_path / "a.parquet"), fields={"image": "jpg", "caption": "TEXT"})
  out = parse_all(a, "pairs")
  np.testing.assert_array_equal(out[0].images[0], arrs[0])
  assert out[0].text == "one" and isinstance(out[1], Skip) and out[1].reason == "missing_caption"
  b = sources.ParquetSource(str(tmp_path / "b.parquet"), image_root=str(tmp_path / "imgs"))
  (ex,) = parse_all(b, "pairs")
  np.testing.assert_array_equal(ex.images[0], arrs[2])


def test_jsonl_with_image_folder_and_bad_lines(tmp_path):
  arr = img_array(5)
  Image.fromarray(arr).save(tmp_path / "x.png")
  lines = [
    json.dumps({"image": "x.png", "caption": ["first", "second"]}),
    "{not json",
    json.dumps({"image": "missing.png", "caption": "gone"}),
    json.dumps([1, 2, 3]),
  ]
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  src = sources.JsonlSource(str(tmp_path / "pairs.jsonl"), image_root=str(tmp_path))
  out = parse_all(src, "pairs")
  assert out[0].text in ("first", "second")
  np.testing.assert_array_equal(out[0].images[0], arr)
  assert [o.reason for o in out[1:]] == ["bad_json", "missing_image_file", "wrong_type:record"]


def test_llava_json(tmp_path):
  arr = img_array(1)
  Image.fromarray(arr).save(tmp_path / "im.jpg", quality=95)
  data = [
    {
      "id": "a1",
      "image": "im.jpg",
      "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "Noise."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
      ],
    },
    {
      "id": "a2",
      "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    },  # text-only chat
    {
      "id": "a3",
      "image": "im.jpg",
      "conversations": [  # placeholder missing: added
        {"from": "human", "value": "Describe"},
        {"from": "gpt", "value": "Noise"},
      ],
    },
    {"id": "a4", "image": "im.jpg", "conversations": [{"from": "robot", "value": "?"}]},
  ]
  (tmp_path / "llava.json").write_text(json.dumps(data))
  src = sources.JsonListSource(str(tmp_path / "llava.json"), image_root=str(tmp_path))
  out = parse_all(src, "chat")
  assert out[0].kind == "chat" and len(out[0].images) == 1 and len(out[0].conversation) == 4
  assert [t.role for t in out[0].conversation] == ["user", "assistant"] * 2
  assert out[0].key == "src/a1"
  assert out[1].images == () and out[1].conversation[1].text == "Hello"
  assert out[2].conversation[0].text == IMAGE_PLACEHOLDER + "\nDescribe"
  assert isinstance(out[3], Skip) and out[3].reason == "bad_conversation"


def test_grit_jsonl_boxes(tmp_path):
  arr = img_array(2, 50, 100)
  Image.fromarray(arr).save(tmp_path / "g.png")
  cap = "a dog next to a tree"
  recs = [
    {
      "image": "g.png",
      "caption": cap,
      "noun_chunks": [[0, 5, 0.1, 0.2, 0.4, 0.9, 0.8], [14, 20, 0.5, 0.1, 0.95, 0.95, 0.7]],
    },
    {"image": "g.png", "caption": cap, "noun_chunks": [[0, 5, 0.1, 0.2, 1.7, 0.9, 0.8]]},
    {"image": "g.png", "caption": cap, "noun_chunks": [[0, 50, 0.1, 0.2, 0.4, 0.9, 0.8]]},
    {"image": "g.png", "caption": cap, "noun_chunks": [[0, 5, 0.4, 0.2, 0.1, 0.9, 0.8]]},
    {"image": "g.png", "caption": cap, "noun_chunks": [[0, 5, "x", 0.2, 0.1, 0.9]]},
  ]
  (tmp_path / "grit.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
  src = sources.JsonlSource(str(tmp_path / "grit.jsonl"), image_root=str(tmp_path))
  out = parse_all(src, "grounding")
  ex = out[0]
  np.testing.assert_allclose(ex.boxes, [[0.1, 0.2, 0.4, 0.9], [0.5, 0.1, 0.95, 0.95]], atol=1e-6)
  assert [cap[s:e] for s, e in ex.phrases] == ["a dog", "a tree"]
  assert [o.reason for o in out[1:]] == [
    "box_out_of_range",
    "bad_phrase_span",
    "bad_boxes",
    "wrong_type:noun_chunks",
  ]
  # Pixel boxes are normalized by the image size.
  (tmp_path / "px.jsonl").write_text(
    json.dumps({"image": "g.png", "caption": cap, "noun_chunks": [[0, 5, 10, 5, 50, 45]]})
  )
  (px,) = parse_all(
    sources.JsonlSource(str(tmp_path / "px.jsonl"), image_root=str(tmp_path)),
    "grounding",
    box_format="pixels",
  )
  np.testing.assert_allclose(px.boxes, [[0.1, 0.1, 0.5, 0.9]], atol=1e-6)


def test_text_and_edit_jsonl(tmp_path):
  (tmp_path / "t.jsonl").write_text(
    json.dumps({"text": " The Pile. "}) + "\n" + json.dumps({"text": 7}) + "\n"
  )
  out = parse_all(sources.JsonlSource(str(tmp_path / "t.jsonl")), "text")
  assert out[0].text == "The Pile." and out[1].reason == "wrong_type:text"
  a, b = img_array(3), img_array(4)
  Image.fromarray(a).save(tmp_path / "s.png")
  Image.fromarray(b).save(tmp_path / "t.png")
  (tmp_path / "e.jsonl").write_text(
    json.dumps({"input": "s.png", "output": "t.png", "edit": "make it blue"})
  )
  src = sources.JsonlSource(
    str(tmp_path / "e.jsonl"),
    image_root=str(tmp_path),
    fields={"source": "input", "target": "output", "instruction": "edit"},
  )
  (ex,) = parse_all(src, "edit")
  assert ex.instruction == "make it blue"
  np.testing.assert_array_equal(ex.images[0], a)
  np.testing.assert_array_equal(ex.images[1], b)


def test_arrayrecord_roundtrip_through_prepare(tmp_path):
  """Public format -> prepare -> ArrayRecord -> the same Examples; bad records left out."""
  arrs = [img_array(i, 32, 32) for i in range(5)]
  for i, a in enumerate(arrs):
    Image.fromarray(a).save(tmp_path / f"{i}.png")
  recs = [{"image": f"{i}.png", "caption": f"cap {i}"} for i in range(5)]
  recs[3]["caption"] = ""
  (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
  dcfg = data_config.get_config()
  scfg = data_config.source("pairs", 1.0, "jsonl", str(tmp_path / "p.jsonl"), str(tmp_path))
  report = prepare.convert(scfg, dcfg, str(tmp_path / "out" / "pairs"), per_file=2)
  assert report["written"] == 4 and report["skipped"] == {"missing_caption": 1}
  assert len(report["files"]) == 2
  ar = data_config.source("pairs", 1.0, "arrayrecord", str(tmp_path / "out" / "pairs-*"))
  reader = pipeline.open_source("ar", ar, dcfg)
  out = parse_all(reader, "pairs")
  assert [o.text for o in out] == ["cap 0", "cap 1", "cap 2", "cap 4"]
  for o, i in zip(out, [0, 1, 2, 4]):
    np.testing.assert_array_equal(o.images[0], arrs[i])


def test_config_errors_name_the_field(tmp_path):
  dcfg = data_config.get_config("pretrain")
  with pytest.raises(ValueError, match="data.sources.pairs.paths"):
    pipeline.open_source("pairs", dcfg.sources.pairs, dcfg)
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    sources.JsonlSource(str(tmp_path / "nothing-here*.jsonl"))
  with pytest.raises(ValueError, match="unknown preset"):
    data_config.get_config("nope")


def test_tfds_array_record_source(tmp_path):
  """A TFDS dataset prepared as ArrayRecord, read through tfds.data_source (random access).
  About 5 s: in the fast tier."""
  import tensorflow_datasets as tfds

  class TinyCaps(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.FeaturesDict({"text": tfds.features.Text()}),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"image": np.full((8, 10, 3), i * 40, np.uint8), "captions": {"text": f"cap {i}"}}

  TinyCaps(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = sources.TfdsSource(
    "tiny_caps", "train", str(tmp_path), fields={"image": "image", "caption": "captions/text"}
  )
  out = sorted(parse_all(src, "pairs"), key=lambda e: e.text)
  assert [o.text for o in out] == [f"cap {i}" for i in range(4)]
  assert [int(o.images[0][0, 0, 0]) for o in out] == [0, 40, 80, 120]


def test_tfds_source_maps_records_read_through_data_source(monkeypatch):
  """TfdsSource over what `tfds.data_source` returns (a random-access sequence of feature
  dicts: uint8 images, nested features, text as bytes or as an object array, both forms in one
  source), without preparing a dataset."""
  import types

  records = [
    {
      "image": np.full((8, 10, 3), i * 40, np.uint8),
      "captions": {
        "text": f"cap {i}".encode() if i % 2 else np.array([f"cap {i}".encode()], dtype=object)
      },
    }
    for i in range(4)
  ]
  calls = []

  def data_source(name, split, data_dir):
    calls.append((name, split, data_dir))
    return records

  monkeypatch.setitem(
    sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source)
  )
  src = sources.TfdsSource(
    "tiny_caps", "train", "/data", fields={"image": "image", "caption": "captions/text"}
  )
  assert calls == [("tiny_caps", "train", "/data")] and len(src) == 4
  assert src[1]["caption"] == "cap 1" and src[2]["caption"] == "cap 2"
  assert src[3]["key"] == "tiny_caps:train:3"
  out = sorted(parse_all(src, "pairs"), key=lambda e: e.text)
  assert [o.text for o in out] == [f"cap {i}" for i in range(4)]
  assert [int(o.images[0][0, 0, 0]) for o in out] == [0, 40, 80, 120]


def test_concurrent_threads_and_pickling_read_the_same_records(tmp_path):
  """grain reads with several threads (and pickles sources into worker processes)."""
  import pickle
  from concurrent.futures import ThreadPoolExecutor

  path = tmp_path / "s.tar"
  with tarfile.open(path, "w") as tar:
    for i in range(40):
      add_member(tar, f"{i:03d}.png", png(img_array(i, 16 + i % 5, 20)))
      add_member(tar, f"{i:03d}.txt", f"caption number {i}".encode())
  lines = [json.dumps({"text": f"document {i} " + "x" * (i * 37 % 200)}) for i in range(40)]
  (tmp_path / "t.jsonl").write_text("\n".join(lines))
  for src in (sources.WebDatasetSource(str(path)), sources.JsonlSource(str(tmp_path / "t.jsonl"))):
    expected = [src[i] for i in range(len(src))]
    # Many reads: with a shared seek+read file offset this mixes records up about once per
    # thousand reads on 2 cores.
    order = list(np.random.default_rng(0).permutation(len(src))) * 50
    with ThreadPoolExecutor(8) as pool:
      got = list(pool.map(lambda i: (i, src[i]), order))
    for i, rec in got:
      assert rec == expected[i]
    clone = pickle.loads(pickle.dumps(src))
    assert all(clone[i] == expected[i] for i in range(len(src)))


def test_chat_pairs_for_the_sequence_builder():
  from puma_jax.data.schema import BadRecord, Turn, chat_pairs

  img = img_array(0)
  ex = Example(
    "chat",
    images=(img,),
    conversation=(
      Turn("user", "<image>\nWhat?"),
      Turn("assistant", "A cat."),
      Turn("assistant", "Grey."),
      Turn("user", "Sure?"),
      Turn("assistant", "Yes."),
    ),
  ).validate()
  assert chat_pairs(ex) == [("What?", "A cat.\nGrey."), ("Sure?", "Yes.")]
  with pytest.raises(BadRecord, match="bad_conversation"):
    chat_pairs(
      Example(
        "chat", conversation=(Turn("user", "q"), Turn("assistant", "a"), Turn("user", "dangling"))
      )
    )
