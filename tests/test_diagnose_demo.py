"""tools/diagnose_demo.py: its statistics on inputs whose answer is known, and a smoke run of the
whole report on a random tiny release."""

import json

import numpy as np
import pytest

from puma_jax.tools import diagnose_demo as D


def test_variance_shares_split_position_image_and_local():
  r = np.random.RandomState(0)
  pos = r.randn(1, 16, 8) * 2.0  # same for every image
  img = r.randn(32, 1, 8)  # same for every token of an image
  local = r.randn(32, 16, 8) * 0.5
  s = D.variance_shares(pos + img + local + 3.0)
  assert sum(s.values()) == pytest.approx(1.0, abs=0.02)
  # expected shares 4 : 1 : 0.25 of 5.25, up to sampling noise
  assert s["position"] == pytest.approx(4 / 5.25, abs=0.08)
  assert s["image"] == pytest.approx(1 / 5.25, abs=0.08)
  assert s["local"] == pytest.approx(0.25 / 5.25, abs=0.03)


def test_own_row_reads_position_only_when_tokens_carry_it():
  r = np.random.RandomState(1)
  code = (r.randn(16, 16) * 3.0)[np.arange(256) // 16][None]  # a code per grid row
  noise = lambda n: r.randn(n, 256, 16)
  assert D.own_row_accuracy(code + noise(20), code + noise(10)) > 0.9
  assert D.own_row_accuracy(noise(20), noise(10)) < 0.2  # chance 1/16


def test_ridge_probe_finds_a_linear_label_and_not_a_random_one():
  r = np.random.RandomState(2)
  x, y = r.randn(300, 40), r.randint(0, 4, 300)
  x[np.arange(300), y] += 3.0  # the label is written in feature y
  assert D.ridge_probe(x[:200], y[:200], x[200:], y[200:], 4) > 0.9
  assert D.ridge_probe(x[:200], r.randint(0, 4, 200), x[200:], y[200:], 4) < 0.45


def test_cross_attention_stats_on_local_uniform_and_shape_reading_weights():
  q, k = 4, 8  # a 4x4 grid of places over 8x8 feature tokens
  own = D.region_masks(q, k).astype(np.float64)
  assert own.sum(1).tolist() == [4] * 16 and own.sum(0).tolist() == [1] * 64
  shape = np.zeros((2, 64), bool)
  shape[:, :4] = True
  local = (own / own.sum(1, keepdims=True))[None, None].repeat(2, 0)  # each place its own tokens
  st = D.cross_attention_stats(local, shape)
  assert st["own_place_x"] == pytest.approx(16.0)  # all the mass on 1/16 of the tokens
  assert st["query_dependence"] > 0.8
  uniform = np.full((2, 1, 16, 64), 1 / 64)
  st = D.cross_attention_stats(uniform, shape)
  assert st["entropy"] == pytest.approx(1.0) and st["own_place_x"] == pytest.approx(1.0)
  assert st["shape_tokens_x"] == pytest.approx(1.0) and st["query_dependence"] == 0.0
  reads_shape = np.zeros((2, 1, 16, 64))
  reads_shape[..., :4] = 0.25  # every place reads the shape's tokens: content, not place
  st = D.cross_attention_stats(reads_shape, shape)
  assert st["shape_tokens_x"] == pytest.approx(16.0) and st["query_dependence"] == 0.0
  assert st["own_place_x"] == pytest.approx(1.0)
  # a finer query grid than the key grid (f4..f2 decoders at 8x8 places)
  st = D.cross_attention_stats(np.full((1, 1, 64, 4), 0.25), np.zeros((1, 4), bool))
  assert st["own_place_x"] == pytest.approx(1.0) and "shape_tokens_x" not in st


def test_shape_patches_and_x_centroid_follow_the_scene():
  from puma_jax.data import synthetic as S

  images, scenes = D.single_shape_scenes("eval", 3, 32)
  assert images.shape == (3, 32, 32, 3) and all(len(s.shapes) == 1 for s in scenes)
  fg = D.shape_patches(images, [s.background for s in scenes], 16)
  for img, sc, f in zip(images, scenes, fg):
    assert f.any() and not f.all()
    col = (np.nonzero(f.reshape(4, 4))[1].mean() + 0.5) * 8
    assert abs(col - D.x_centroid(img, sc.background)) < 8
    assert D.x_centroid(img[:, ::-1], sc.background) == pytest.approx(
      31 - D.x_centroid(img, sc.background)
    )
  assert all(0 <= sc.shapes[0].cell < len(S.CELLS) for sc in scenes)  # cells index CELLS
  with pytest.raises(ValueError, match="--n=100000"):
    D.single_shape_scenes("eval", 100000, 32)


def test_describe_section_scores_answers_and_sees_a_background_only_model():
  from puma_jax.data import synthetic as S

  scenes = [
    S.Scene("white", (S.Shape("circle", "red", 0, "small"),)),
    S.Scene("white", (S.Shape("square", "blue", 4, "large"),)),
    S.Scene("black", (S.Shape("cross", "green", 8, "small"),)),
  ]

  class Pipe:  # answers the first scene exactly, then one memorized caption per background
    def __init__(self, answers):
      self.answers = answers

    def chat(self, images, questions, max_new_tokens):
      assert len(images) == len(questions) == len(scenes)
      assert set(questions) == {"Describe the image."}
      return self.answers

  exact = "A small red circle at the top left on a white background."
  d = D.describe_section(
    Pipe([exact, exact, "A large green cross at the left on a black background."]), scenes, [0] * 3
  )
  assert d["exact"] == pytest.approx(1 / 3)
  assert d["shape_colour"] == pytest.approx(2 / 3)  # red right, red wrong, green right
  assert d["background"] == 1.0
  assert d["distinct"] == 2 and d["distinct_within_background_max"] == 1
  assert d["backgrounds"] == 2 and d["examples"][0] == {"true": exact, "answer": exact}
  d = D.describe_section(Pipe(["It is red.", "Blue square.", exact]), scenes, [0] * 3)
  # the third answer names the white background of another scene
  assert d["distinct_within_background_max"] == 2 and d["background"] == 0.0


def test_smoke_report_on_a_random_release(tmp_path):
  from puma_jax.tools import tiny_release

  tiny_release.make(tmp_path / "release", seed=0, scales=("f1", "f4"))
  r = D.diagnose(tmp_path, n=2, scales=("f4",), steps=2, log=lambda *_: None)
  out = tmp_path / "diagnose"
  assert json.loads((out / "report.json").read_text())["n"] == 2
  md = (out / "report.md").read_text()
  for heading in (
    "CLIP patch tokens",
    "Probes",
    "Reconstruction",
    "cross-attention",
    "MLLM text",
    "MLLM, colour",
    "MLLM, describing",
  ):
    assert heading in md
  assert (out / "recon.png").stat().st_size > 0
  att = r["decoders"]["f4"]["cross_attention"]
  assert set(att) == set(D.NOISE_LEVELS)
  # one feature token: attention is trivially that token's
  assert att[100]["entropy"] == 0.0
  t2i = r["t2i"]["f4"]
  assert set(t2i) == {"feature_variance", "generated", "teacher_forced"}
  # f4 is the first slot: generated and teacher forced, it is predicted from the same prefix
  assert t2i["generated"]["feature_mse"] == pytest.approx(
    t2i["teacher_forced"]["feature_mse"], rel=1e-4
  )
  layers = r["mllm"]["answer_attention"]
  assert len(layers) >= 1 and all(0 <= a["image_mass"] <= 1 for a in layers)
  d = r["describe"]
  assert 1 <= d["distinct"] <= 2 and 1 <= d["distinct_within_background_max"] <= d["distinct"]
  assert all(0 <= d[k] <= 1 for k in ("exact", "shape_colour", "background"))
  with pytest.raises(ValueError, match="--scales"):
    D.diagnose(tmp_path, n=2, scales=("f0",), steps=2, log=lambda *_: None)
