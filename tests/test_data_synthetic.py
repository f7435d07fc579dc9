"""The built-in shapes set: deterministic, internally consistent, held-out split disjoint."""

import numpy as np
import pytest

from puma_jax.data import config as data_config
from puma_jax.data import parse, pipeline, synthetic
from puma_jax.data.schema import Example


def test_deterministic_and_seed_dependent():
  a = synthetic.SyntheticSource("edit", seed=0, num_train=20, image_size=32)
  b = synthetic.SyntheticSource("edit", seed=0, num_train=20, image_size=32)
  c = synthetic.SyntheticSource("edit", seed=1, num_train=20, image_size=32)
  for i in (0, 7, 19):
    ra, rb = a[i], b[i]
    assert ra["instruction"] == rb["instruction"]
    np.testing.assert_array_equal(ra["source"], rb["source"])
    np.testing.assert_array_equal(ra["target"], rb["target"])
  assert any(a[i]["instruction"] != c[i]["instruction"] for i in range(20))


def test_held_out_scenes_never_described_like_training_scenes():
  train = synthetic.SyntheticSource("pairs", "train", num_train=300, num_eval=50, image_size=8)
  held = synthetic.SyntheticSource("pairs", "eval", num_train=300, num_eval=50, image_size=8)
  assert len(held) == 50 and not set(held.ids) & set(train.ids)
  train_desc = {synthetic.make_scene(0, int(i)).descriptor() for i in train.ids}
  assert not any(synthetic.make_scene(0, int(i)).descriptor() in train_desc for i in held.ids)
  train_caps = {train[i]["caption"] for i in range(len(train))}
  assert not any(held[i]["caption"] in train_caps for i in range(len(held)))


def test_rendered_pixels_match_boxes_and_captions():
  src = synthetic.SyntheticSource("grounding", num_train=50, image_size=48)
  p = parse.Parser("grounding", "syn")
  for i in range(50):
    rec = src[i]
    ex = p(rec)
    assert isinstance(ex, Example), ex
    scene = synthetic.make_scene(0, int(src.ids[i]))
    img = ex.images[0].astype(int)
    bg = np.array(synthetic._BG_RGB[scene.background])
    for (s, e), box, shape in zip(ex.phrases, ex.boxes, scene.shapes):
      assert ex.text[s:e] == shape.phrase()
      x0, y0, x1, y1 = np.round(box * 48).astype(int)
      inner = img[(y0 + y1) // 2, (x0 + x1) // 2]  # every shape covers its box centre
      np.testing.assert_array_equal(inner, synthetic.COLORS[shape.color])
      outside = np.ones((48, 48), bool)
      for b in ex.boxes:  # pixels outside every box are background
        bx0, by0, bx1, by1 = b * 48
        outside[int(np.floor(by0)) : int(np.ceil(by1)), int(np.floor(bx0)) : int(np.ceil(bx1))] = (
          False
        )
      assert np.all(img[outside] == bg)


def test_chat_answers_and_edits_are_consistent():
  chat = synthetic.SyntheticSource("chat", num_train=100, image_size=16)
  p = parse.Parser("chat", "syn")
  articles = set()
  for i in range(100):
    ex = p(chat[i])
    scene = synthetic.make_scene(0, int(chat.ids[i]))
    for q, a in zip(ex.conversation[::2], ex.conversation[1::2]):
      if q.text.endswith("How many shapes are there?"):
        assert synthetic.NUMBERS[len(scene.shapes)] in a.text
      if "background" in q.text:
        assert scene.background in a.text
      if q.text.startswith("What shape is at the "):  # "An orange circle.", "A red square."
        colour = a.text.split()[1]
        assert a.text.split()[0] == ("An" if colour in ("orange",) else "A"), a.text
        articles.add(a.text.split()[0])
  assert articles == {"A", "An"}
  edit = synthetic.SyntheticSource("edit", num_train=200, image_size=16)
  ops = set()
  for i in range(200):
    rec = edit[i]
    assert not np.array_equal(rec["source"], rec["target"]), rec["instruction"]
    ops.add(rec["instruction"].split()[0])
  assert ops == {"Make", "Turn", "Move", "Add", "Remove", "Change"}


def test_text_family_states_facts_and_never_describes_a_scene():
  """Text rows, like PUMA's The Pile, are not about the pictures: each sentence is a fact about
  the synthetic world's words whose ending follows from its beginning. A row describing a scene
  without its image would teach the captions' contexts the colours' prior (docs/DESIGN.md §11)."""
  import re

  words = ("zero", "one", "two", "three", "four", "five", "six")
  cell = "|".join(synthetic.CELLS)
  text = synthetic.SyntheticSource("text", num_train=200, image_size=16)
  kinds, mixes = set(), {}
  for i in range(200):
    rec = text[i]
    assert set(rec) == {"key", "text"}
    assert "background" not in rec["text"] and "?" not in rec["text"], rec["text"]
    for sent in re.findall(r"[^.]+\.", rec["text"]):
      sent = sent.strip()
      if m := re.fullmatch(r"An? (\w+) has (\w+) corners\.", sent):
        want = {"circle": "no", "triangle": "three", "cross": "twelve"}.get(m[1], "four")
        assert m[2] == want, sent
      elif m := re.fullmatch(r"Mixing (\w+) and (\w+) gives (\w+)\.", sent):
        assert {m[1], m[2], m[3]} <= {*synthetic.COLORS, *synthetic.BACKGROUNDS}, sent
        assert mixes.setdefault((m[1], m[2]), m[3]) == m[3], sent  # always the same result
      elif m := re.fullmatch(r"(\w+) plus (\w+) is (\w+)\.", sent):
        assert words.index(m[1].lower()) + words.index(m[2]) == words.index(m[3]), sent
      elif m := re.fullmatch(r"A large (\w+) is bigger than a small (\w+)\.", sent):
        assert m[1] == m[2], sent
      elif m := re.fullmatch(
        rf"(Above|Below|Left of|Right of) the ({cell}) is the ({cell})\.", sent
      ):
        (r0, c0), (r1, c1) = (divmod(synthetic.CELLS.index(m[k]), 3) for k in (2, 3))
        step = {"Above": (-1, 0), "Below": (1, 0), "Left of": (0, -1), "Right of": (0, 1)}
        assert (r1 - r0, c1 - c0) == step[m[1]], sent
      else:
        raise AssertionError(f"not a known fact: {sent!r}")
      kinds.add(sent.split()[0])
  assert {"A", "Mixing", "Above", "Below"} <= kinds  # every kind of fact occurs


def test_every_family_parses_and_text_only_has_no_images():
  for fam in synthetic.FAMILIES:
    src = synthetic.SyntheticSource(fam, num_train=30, image_size=16)
    parser = parse.Parser(fam, fam)
    out = [parser(src[i]) for i in range(30)]
    assert all(isinstance(o, Example) for o in out), fam
  with pytest.raises(ValueError, match="synthetic family"):
    synthetic.SyntheticSource("video")


def test_default_config_is_synthetic_and_all_presets_open():
  cfg = data_config.get_config()
  assert {s.format for s in cfg.sources.values()} == {"synthetic"}
  assert set(cfg.sources) == set(synthetic.FAMILIES)
  for preset in ("synthetic", "tiny", "pretrain", "unified", "decoder"):
    c = data_config.get_config(preset)
    assert float(sum(s.weight for s in c.sources.values())) > 0
    assert all(s.family in parse.PARSERS for s in c.sources.values())
  assert set(pipeline.active_sources(cfg)) == set(cfg.sources.keys())


def test_synthetic_written_to_array_record_reads_back_identically(tmp_path):
  from puma_jax.data import prepare

  dcfg = data_config.get_config()
  dcfg.synthetic.num_train, dcfg.synthetic.image_size = 12, 16
  scfg = data_config.source("edit")
  report = prepare.convert(scfg, dcfg, str(tmp_path / "edit"))
  assert report["written"] == 12 and report["skipped"] == {}
  back = pipeline.open_source(
    "x", data_config.source("edit", format="arrayrecord", paths=str(tmp_path / "edit-*")), dcfg
  )
  mem = pipeline.open_source("x", scfg, dcfg)
  p = parse.Parser("edit", "x")
  for i in range(12):
    a, b = p(back[i]), p(mem[i])
    assert a.instruction == b.instruction and a.key == b.key
    for x, y in zip(a.images, b.images):
      np.testing.assert_array_equal(x, y)
