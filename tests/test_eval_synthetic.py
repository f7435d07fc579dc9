"""The synthetic held-out eval: model-free checks, box parsing, baselines, and a smoke run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from puma_jax import sequence as seq
from puma_jax.data import synthetic as S
from puma_jax.evaluation import synthetic_checks as C, synthetic_eval as E

ROOT = Path(__file__).resolve().parents[1]


def _config(variant="smoke"):
  sys.path.insert(0, str(ROOT))
  from configs.eval import synthetic

  return synthetic.get_config(variant)


def _single_scenes():
  for bg in S.BACKGROUNDS:
    for i, col in enumerate(c for c in S.COLORS if c != bg):
      kind = S.SHAPES[i % len(S.SHAPES)]
      for cell in range(9):
        yield S.Scene(bg, (S.Shape(kind, col, cell, S.SIZES[(i + cell) % 2]),))


def test_rendered_single_shapes_pass_every_check():
  n = 0
  for scene in _single_scenes():
    got = C.check_single(S.render(scene, 32), scene)
    assert got == {"background": True, "colour": True, "cell": True, "size": True}, scene
    assert all(C.check_cells(S.render(scene, 32), scene).values()), scene
    n += 1
  assert n == 9 * sum(len([c for c in S.COLORS if c != bg]) for bg in S.BACKGROUNDS)


def test_every_small_shape_colour_reads_right():
  """At 32 pixels a small shape is mostly anti-aliased edge: the colour is read as a mix."""
  for bg in S.BACKGROUNDS:
    for col in (c for c in S.COLORS if c != bg):
      for kind in S.SHAPES:
        scene = S.Scene(bg, (S.Shape(kind, col, 4, "small"),))
        assert C.check_single(S.render(scene, 32), scene)["colour"], scene


@pytest.mark.parametrize(
  "field,value,fails",
  [
    ("color", "blue", "colour"),
    ("cell", 8, "cell"),
    ("size", "small", "size"),
  ],
)
def test_wrong_rendering_fails(field, value, fails):
  want = S.Scene("white", (S.Shape("square", "red", 0, "large"),))
  wrong = S.Scene("white", (dataclasses.replace(want.shapes[0], **{field: value}),))
  got = C.check_single(S.render(wrong, 32), want)
  assert not got[fails]
  assert all(v for k, v in got.items() if k != fails)


def test_wrong_background_and_blank_image_fail():
  want = S.Scene("gray", (S.Shape("circle", "green", 4, "large"),))
  other = S.Scene("black", want.shapes)
  assert not C.check_single(S.render(other, 32), want)["background"]
  blank = np.full((32, 32, 3), 128, np.uint8)
  assert C.check_single(blank, want) == {
    "background": True,
    "colour": False,
    "cell": False,
    "size": False,
  }


def test_mean_image_is_not_a_shape():
  img = np.full((32, 32, 3), 120, np.uint8)
  for scene in list(_single_scenes())[:20]:
    assert not all(C.check_single(img, scene).values())


def test_edits_read_from_rendered_targets_and_not_from_sources():
  ops = {}
  for sid in range(400):
    src = S.make_scene(0, sid)
    tgt, _ = S.edit(src, np.random.default_rng([0, sid, S.FAMILIES.index("edit")]))
    good = C.check_edit(S.render(tgt, 32), src, tgt)
    ops[good["op"]] = ops.get(good["op"], 0) + 1
    assert good["kept"] and good["edit"] in (True, None), (src, tgt)
    unchanged = C.check_edit(S.render(src, 32), src, tgt)
    if unchanged["op"] != "shape":
      assert unchanged["edit"] is False, (src, tgt)
  assert set(ops) == set(C.EDIT_OPS)


def test_edit_that_breaks_the_rest_is_not_kept():
  src = S.Scene(
    "white", (S.Shape("circle", "red", 0, "large"), S.Shape("square", "blue", 8, "small"))
  )
  tgt = S.Scene("white", (S.Shape("circle", "green", 0, "large"), src.shapes[1]))
  lost = S.Scene("white", (tgt.shapes[0],))  # recoloured, but the blue square vanished
  got = C.check_edit(S.render(lost, 32), src, tgt)
  assert got == {"edit": True, "kept": False, "op": "color"}


def test_iou():
  box = S.shape_box(S.Shape("circle", "red", 4, "large")).tolist()
  assert C.iou(box, box) == pytest.approx(1.0)
  assert C.iou([0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]) == 0.0
  assert C.iou([0, 0, 0.5, 1], [0.25, 0, 0.75, 1]) == pytest.approx(1 / 3)
  assert C.iou([0.2, 0.2, 0.2, 0.4], [0.2, 0.2, 0.2, 0.4]) == 0.0
  with pytest.raises(ValueError, match="4 numbers"):
    C.iou([0, 0, 1], [0, 0, 1, 1])


def test_parse_boxes_reads_the_training_encoding():
  from puma_jax import tokenizer

  enc, _, special = tokenizer.load("byte")
  boxes = [S.shape_box(S.Shape("circle", "red", c, "small")).tolist() for c in (0, 5)]
  built = seq.build(
    [seq.Image(0), seq.Text("a red circle"), seq.Boxes((tuple(boxes[0]),))],
    enc,
    special,
    "grounding",
    num_images=1,
  )
  got = C.parse_boxes(built.tokens, special.pos0, seq.NUM_POSITION_TOKENS)
  assert len(got) == 1 and C.iou(got[0], boxes[0]) > 0.97
  toks = [special.pos0 + b for b in seq.box_to_bins(boxes[1])]
  assert len(C.parse_boxes(toks + toks, special.pos0, seq.NUM_POSITION_TOKENS)) == 2
  broken = toks[:2] + enc("x") + toks[2:]
  assert C.parse_boxes(broken, special.pos0, seq.NUM_POSITION_TOKENS) == []
  assert C.parse_boxes(enc("no box here"), special.pos0, seq.NUM_POSITION_TOKENS) == []


def test_grounding_prompts_are_the_training_rows_prefix():
  """The eval asks for a box with exactly the tokens training put before that box: the rows of
  the same held-out records (parser -> rows) start with the prompt, then the asked box."""
  from puma_jax import tokenizer
  from puma_jax.data import parse, rows

  cfg = _config()
  enc, _, special = tokenizer.load("byte")
  items = E.held_out(cfg, 32)["ground"]
  src = E._source("grounding", "eval", cfg, 32)
  parser = parse.Parser("grounding", "syn")
  records = {(src[i]["caption"], src[i]["image"].tobytes()): src[i] for i in range(len(src))}
  assert any(len(x["spans"]) > 1 for x in items)  # earlier boxes given in some prompts
  for x in items:
    segs, kind = rows.segments(parser(records[x["caption"], x["image"].tobytes()]))
    assert segs[:2] == [seq.Image(0), seq.Text(seq.GROUNDING_PROMPT)]
    train = seq.build(segs, enc, special, kind, num_images=1).tokens
    prompt = seq.build_prompt(E.ground_prompt(x), enc, special)["tokens"]
    np.testing.assert_array_equal(train[: len(prompt)], prompt)
    # an image caption (i2t) of the same image does not start like it: no box-less continuation
    i2t = seq.build(seq.i2t(x["caption"]), enc, special, "i2t", num_images=1).tokens
    assert not np.array_equal(i2t[: len(prompt)], prompt)
    box = train[len(prompt) : len(prompt) + 4] - special.pos0
    np.testing.assert_allclose(seq.bins_to_box(box), x["boxes"][-1], atol=1 / 224)  # the answer


def test_question_types_cover_the_chat_templates():
  rng = np.random.default_rng(0)
  seen = set()
  for sid in range(200):
    for q, _ in S._questions(S.make_scene(0, sid), rng):
      t = E.question_type(q)
      assert t is not None or q == "Describe the image.", q
      seen.add(t)
  assert seen == {*E.QUESTION_TYPES, None}


def test_held_out_items_and_trivial_baseline():
  cfg = _config()
  items = E.held_out(cfg, 32)
  assert all(len(x["scene"].shapes) == 1 for x in items["t2i"] + items["cond"])
  train = {S.make_scene(0, i).descriptor() for i in range(cfg.data.num_train)}
  assert all(x["scene"].descriptor() not in train for x in items["t2i"])
  # t2i prompts are the captions training puts before [IMG]
  assert items["t2i"][0]["caption"] == S.caption(items["t2i"][0]["scene"])[0]
  assert {x["type"] for x in items["qa"]} == set(E.QUESTION_TYPES)
  ops = [C.edit_op(x["source"], x["target"]) for x in items["edit"]]
  assert sorted(ops) == sorted(C.EDIT_OPS)  # smoke: one edit per operation
  with cfg.unlocked():
    cfg.data.trivial_train = 300
  pred = E.trivial_predictions(cfg, items, 32, ("f0", "f1"))
  m = E.score(pred, items)
  assert 0 <= m["grounding/mean_iou"] < 0.5
  assert m["t2i/f0/colour"] <= 50.0 and m["t2i/f0/size"] <= 50.0
  assert 5 < m["reconstruction/f0/psnr"] < 30
  # half the scenes have one shape: the most frequent count answer is one of the two
  counts = [p for p, x in zip(pred["qa"], items["qa"]) if x["type"] == "count"]
  assert counts[0] in ("There is one.", "There are two.")
  # perfect predictions score 100 (the checks read the truth as right)
  truth = {
    "t2i": {"f0": np.stack([S.render(x["scene"], 32) for x in items["t2i"]])},
    "qa": [x["answer"] for x in items["qa"]],
    "ground": [x["boxes"][-1] for x in items["ground"]],
    "edit": {"f1": np.stack([S.render(x["target"], 32) for x in items["edit"]])},
  }
  m = E.score(truth, items)
  assert m["t2i/f0/colour"] == m["t2i/f0/cell"] == m["t2i/f0/size"] == 100.0
  assert m["understanding/all"] == 100.0 and m["grounding/iou>0.5"] == 100.0
  assert m["editing/f1/all/kept"] == 100.0


def test_default_workdir():
  assert E.default_workdir("/a/b/rel/") == "/a/b/rel_eval"


@pytest.fixture(scope="module")
def tiny_rel(tmp_path_factory):
  """A seeded random release with two decoders (keeps compilation short)."""
  from puma_jax.tools import tiny_release

  rel = tmp_path_factory.mktemp("r") / "rel"
  tiny_release.make(rel, seed=0, scales=("f1", "f4"))
  return rel


def test_release_fills_the_other_protocols(tiny_rel, tmp_path):
  from puma_jax.evaluation import config as eval_config

  cfg = eval_config.from_release(eval_config.base("text_to_image", "toy"), str(tiny_rel))
  assert cfg.model.kind == "puma" and cfg.model.puma == str(tiny_rel / "puma")
  assert cfg.model.decoders.f1 == str(tiny_rel / "decoders" / "f1") and cfg.model.decoders.f0 == ""
  assert cfg.model.tokenizer == "byte" and cfg.model.vae == str(tiny_rel / "vae")
  cmd = [sys.executable, "-m", "puma_jax.eval", "--config=configs/eval/understanding.py:toy"]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and "--workdir" in p.stderr


def test_smoke_run_on_a_random_release(tiny_rel):
  """The CLI end to end on a seeded random release; the workdir defaults to <release>_eval."""
  rel, tmp_path = tiny_rel, tiny_rel.parent
  cmd = [
    sys.executable,
    "-m",
    "puma_jax.eval",
    "--config=configs/eval/synthetic.py:smoke",
    f"--release={rel}",
  ]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  wd = tmp_path / "rel_eval"
  out = json.loads((wd / "results.json").read_text())
  md = (wd / "results.md").read_text()
  assert (wd / "grid.png").stat().st_size > 1000
  assert out["columns"] == ["trained", "trivial"] and "No untrained release" in md
  m = out["metrics"]
  for name, row in m.items():
    for v in row.values():
      if v is None:
        continue
      if name.endswith("psnr"):
        assert 0 < v < 60, name
      elif name.endswith("mean_iou"):
        assert 0 <= v <= 1, name
      else:
        assert 0 <= v <= 100, name
  assert "t2i/f1/colour" in m and "t2i/f4/cell" in m and "t2i/f0/colour" not in m
  assert "| t2i/f1/colour |" in md and "| reconstruction/f1/psnr |" in md
  from PIL import Image

  grid = Image.open(wd / "grid.png")
  assert grid.size[0] > 3 * 96  # label + scene + f1 + f4 columns
  # bad input: a directory that is not a release -> exit 2 naming it
  p = subprocess.run(
    cmd[:4] + [f"--release={tmp_path / 'nope'}"], cwd=ROOT, capture_output=True, text=True
  )
  assert p.returncode == 2 and "nope" in p.stderr


def test_untrained_release_of_other_scales_is_refused(tiny_rel, tmp_path):
  from puma_jax.tools import tiny_release

  other = tmp_path / "other"
  tiny_release.make(other, seed=1, scales=("f4",))
  cfg = _config()
  with cfg.unlocked():
    cfg.untrained_release = str(other)
  with pytest.raises(E.SyntheticEvalError, match="same architectures"):
    E.run(cfg, str(tiny_rel), str(tmp_path / "w"), log=lambda *a: None)
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_full_release_with_untrained_column(tmp_path):
  """~4 min: every scale and the untrained column (the fast twin: the smoke run above)."""
  from puma_jax.tools import tiny_release

  tiny_release.make(tmp_path / "r", seed=0)
  tiny_release.make(tmp_path / "r0", seed=1)
  cfg = _config()
  with cfg.unlocked():
    cfg.untrained_release = str(tmp_path / "r0")
  out = E.run(cfg, str(tmp_path / "r"), str(tmp_path / "w"), log=lambda *a: None)
  assert out["columns"] == ["trained", "untrained", "trivial"]
  m = out["metrics"]
  for name in E.TARGETS:
    assert m[name]["trained"] is not None and m[name]["untrained"] is not None, name
  md = (tmp_path / "w" / "results.md").read_text()
  assert "| reconstruction/f0/psnr |" in md and "No untrained release" not in md
