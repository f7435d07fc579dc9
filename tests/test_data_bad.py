"""Bad data: a fuzz test of malformed records (each skipped and counted, none crashing), exact
counters through the pipeline, and a clear stop when a source is wholly broken."""

import io

import numpy as np
import pytest
from PIL import Image

from puma_jax.data import config as data_config
from puma_jax.data import parse, pipeline, transforms
from puma_jax.data.schema import Example, Skip

FAMILIES = ("pairs", "grounding", "text", "chat", "edit", "conditional")


def png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def good_records(rng):
  img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  b = png(img)
  conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]
  return {
    "pairs": {"key": "p", "image": b, "caption": "a caption"},
    "grounding": {
      "key": "g",
      "image": b,
      "caption": "a dog",
      "noun_chunks": [[0, 5, 0.1, 0.1, 0.6, 0.7, 0.9]],
    },
    "text": {"key": "t", "text": "some text"},
    "chat": {"key": "c", "image": b, "conversations": conv},
    "edit": {"key": "e", "source": b, "target": png(img[::-1].copy()), "instruction": "flip it"},
    "conditional": {"key": "k", "image": b, "caption": "x"},
  }


WRONG_VALUES = [
  None,
  0,
  1.5,
  float("nan"),
  True,
  [],
  {},
  [1, 2],
  {"a": 1},
  b"",
  b"\x00" * 7,
  "",
  "   ",
  np.zeros((0, 0, 3), np.uint8),
  np.zeros((4, 4), np.float32),
  np.zeros((2, 3, 4, 5), np.uint8),
  np.zeros((5, 5, 2), np.uint8),
]
# Which field of each family must be well-formed (a wrong value there makes the record bad).
REQUIRED = {
  "pairs": ("image", "caption"),
  "grounding": ("image", "caption", "noun_chunks"),
  "text": ("text",),
  "chat": ("conversations",),
  "edit": ("source", "target", "instruction"),
  "conditional": ("image",),
}


def malformed_records(rng):
  """Records that are certainly unusable, built by breaking one good record at a time."""
  out = []
  base = good_records(rng)
  for fam, rec in base.items():
    for field in REQUIRED[fam]:
      out.append((fam, {k: v for k, v in rec.items() if k != field}))  # field missing
      for wrong in WRONG_VALUES:
        out.append((fam, {**rec, field: wrong}))
    for key in ("image", "source", "target"):
      if key in rec:
        data = rec[key]
        for cut in (1, 8, len(data) // 3, 2 * len(data) // 3):
          out.append((fam, {**rec, key: data[:cut]}))  # truncated image
        flipped = bytearray(data)
        flipped[:8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        out.append((fam, {**rec, key: bytes(flipped)}))  # corrupt header
        out.append((fam, {**rec, key: "no/such/file.png"}))  # missing file
  g = base["grounding"]
  for chunk in (
    [0, 5, -0.5, 0.1, 0.6, 0.7],
    [0, 5, 0.1, 0.1, 1.5, 0.7],
    [0, 5, 0.6, 0.1, 0.1, 0.7],
    [0, 99, 0.1, 0.1, 0.6, 0.7],
    [3, 2, 0.1, 0.1, 0.6, 0.7],
    [0, 5, 0.1],
    [0, 5, float("nan"), 0.1, 0.6, 0.7],
    [0, 5, float("inf"), 0.1, 0.6, 0.7],
    ["0", 5, 0.1, 0.1, 0.6, 0.7],
    [0.5, 5, 0.1, 0.1, 0.6, 0.7],
    "chunk",
    None,
  ):
    out.append(("grounding", {**g, "noun_chunks": [chunk]}))
  c = base["chat"]
  for conv in (
    [{"from": "gpt", "value": "<image>\nno"}],
    [{"from": "human", "value": "q"}],
    [{"from": "human"}, {"from": "gpt", "value": "a"}],
    ["turn"],
    [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
    [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}],
    [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}],
  ):
    out.append(("chat", {**c, "conversations": conv}))
  out.append(("chat", {**c, "image": ["a.png", 7]}))
  for fam in FAMILIES:
    for junk in (None, 3, "str", [1, 2], np.zeros(3), {"__error__": "truncated_shard"}):
      out.append((fam, junk))
  # Random byte soup in place of images.
  image_families = [f for f in FAMILIES if f != "text"]
  for i in range(20):
    fam = image_families[i % len(image_families)]
    soup = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
    out.append((fam, {**base[fam], "image": soup, "source": soup}))
  return out


def test_fuzz_every_malformed_record_is_skipped_with_a_reason():
  rng = np.random.default_rng(0)
  bad = malformed_records(rng)
  assert len(bad) > 250
  pre = transforms.Preprocess(transforms.ImageOptions(clip_size=16), tokenize=lambda s: [1])
  reasons = set()
  for fam, rec in bad:
    out = pre(parse.Parser(fam, "fuzz")(rec))
    assert isinstance(out, Skip), (fam, repr(rec)[:200])
    assert out.reason and not out.reason.startswith("unexpected"), (fam, out)
    reasons.add(out.reason)
  # The good twins all parse: the fuzz breaks records, not the parsers.
  for fam, rec in good_records(rng).items():
    assert isinstance(pre(parse.Parser(fam, "fuzz")(rec)), Example), fam
  assert {
    "decode_error",
    "missing_caption",
    "box_out_of_range",
    "bad_conversation",
    "missing_image_file",
    "wrong_type:image",
    "image_placeholder_mismatch",
  } <= reasons


def test_pipeline_counts_skips_exactly_and_trains_only_on_good():
  rng = np.random.default_rng(1)
  bad = [r for fam, r in malformed_records(rng) if fam == "pairs"]
  good = [
    {
      "key": f"g{i}",
      "image": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
      "caption": f"good {i}",
    }
    for i in range(40)
  ]
  records = good + bad
  order = rng.permutation(len(records))
  records = [records[i] for i in order]
  expected = {}
  for r in records:
    out = parse.Parser("pairs", "mix")(r)
    if isinstance(out, Skip):
      expected[out.reason] = expected.get(out.reason, 0) + 1
  cfg = data_config.get_config("tiny")
  cfg.sources = {"mix": data_config.source("pairs", format="jsonl", paths="unused")}
  cfg.num_epochs, cfg.drop_remainder, cfg.batch_size, cfg.image.clip_size = 1, False, 8, 16
  it = iter(pipeline.build(cfg, encode=None, host_index=0, host_count=1, readers={"mix": records}))
  seen = [ex for batch in it for ex in batch]
  assert sorted(ex.text for ex in seen) == sorted(f"good {i}" for i in range(40))
  m = it.metrics()
  assert m["data/examples"] == 40 and m["data/skipped"] == len(bad)
  assert {
    k[len("data/skipped/") :]: v for k, v in m.items() if k.startswith("data/skipped/")
  } == expected
  assert it.get_state()["skipped_by_source"] == {"mix": len(bad)}


def test_wholly_broken_source_stops_with_a_report():
  cfg = data_config.get_config("tiny")
  cfg.sources = {"broken": data_config.source("pairs", format="jsonl", paths="unused")}
  cfg.max_consecutive_skips = 50
  records = [{"key": str(i), "image": b"garbage", "caption": "c"} for i in range(10)]
  it = iter(pipeline.build(cfg, host_index=0, host_count=1, readers={"broken": records}))
  with pytest.raises(pipeline.DataError, match="decode_error"):
    next(it)


def test_validate_reports_skips(tmp_path):
  from puma_jax.data import validate

  lines = ['{"text": "fine"}', '{"text": ""}', '{"text": 5}', "{oops"]
  (tmp_path / "t.jsonl").write_text("\n".join(lines))
  cfg = data_config.get_config("tiny")
  cfg.sources = {
    "t": data_config.source("text", format="jsonl", paths=str(tmp_path / "t.jsonl")),
    "nothing": data_config.source("text", format="jsonl", paths=str(tmp_path / "none.jsonl")),
  }
  reports, problems = validate.validate(cfg, max_skip_fraction=0.5)
  r = {r["source"]: r for r in reports}["t"]
  assert r["kept"] == 1 and r["skipped"] == {"missing_text": 1, "wrong_type:text": 1, "bad_json": 1}
  assert any("t: skips 75%" in p for p in problems)
  assert any(p.startswith("nothing: cannot open") for p in problems)
  text = validate.format_report(reports, problems)
  assert "would skip 1 x bad_json" in text and "PROBLEM" in text
