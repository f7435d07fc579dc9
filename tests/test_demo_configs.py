"""configs/pretrain.py:demo and configs/unified.py:demo (the train_demo MLLM stages), and the
held-out evaluation of the MLLM stage covering every sequence kind."""

import json

import numpy as np
import pytest

from puma_jax import sequence
from puma_jax.data import pipeline
from puma_jax.data.schema import EXAMPLE_KINDS
from puma_jax.tools import train_demo
from puma_jax.training import mllm


def demo(name, **over):
  c = train_demo.load_config(f"configs/{name}.py:demo")
  with c.unlocked():
    for k, v in over.items():
      c.update_from_flattened_dict({k: v})
  return c


def test_demo_configs_are_the_tiny_puma_on_32px_data():
  for name in ("pretrain", "unified"):
    c = demo(name)
    assert c.stage == "mllm" and c.model.router
    assert c.data.image.clip_size == c.model.clip.image_size == 32
    assert c.data.pack and int(c.train.eval_every) == int(c.train.total_steps)
    assert c.init.clip == c.init.puma == ""  # train_demo fills them in


def test_unified_demo_trains_every_kind_with_nothing_dropped_by_length():
  c = demo("unified")
  st = mllm.MLLMStage(c)
  assert st.check_fit() == []
  encode, _, special = st._tokenizer
  from puma_jax.data import rows

  report = rows.fit_report(c.data, encode, special)
  kinds = {k for per in report.values() for k in per}
  assert kinds == set(sequence.KINDS)
  # and they really reach the packed training rows
  c.data.synthetic.num_train = 120
  it = st.train_data()
  seen = set()
  for _ in range(30):  # the rarest, text, comes about once in 25 examples
    next(it)
    seen = {k.split("/")[-1] for k, v in it.metrics().items() if k.startswith("data/task/") and v}
    if seen == set(sequence.KINDS):
      break
  assert seen == set(sequence.KINDS), it.metrics()
  m = it.metrics()
  # per example, not per row's first example: the counts add up to every packed example
  assert sum(v for k, v in m.items() if k.startswith("data/task/")) == m["data/examples"]


def test_pretrain_demo_leaves_edit_and_conditional_to_unified_tuning():
  c = demo("pretrain")
  st = mllm.MLLMStage(c)
  assert st.check_fit() == []
  active = pipeline.active_sources(c.data)
  assert "edit" not in active and "conditional" not in active
  assert {"pairs", "grounding", "chat", "text"} <= set(active)


def test_finite_pass_interleaves_sources_so_the_first_batches_hold_every_one():
  c = demo("unified")
  c.data.num_epochs, c.data.shuffle, c.data.batch_size = 1, False, 12
  c.data.drop_remainder = False
  c.data.synthetic.num_eval = 5
  tok = lambda s: list(s.encode())
  first = next(iter(pipeline.build(c.data, split="eval", tokenize=tok)))
  kinds = {EXAMPLE_KINDS[int(k)] for k in first["kind"]}
  assert {"chat", "conditional", "edit", "grounding", "text"} <= kinds, kinds
  assert kinds & {"t2i", "i2t"}
  # still the whole split: 6 sources x 5 scenes
  n = sum(len(b["kind"]) for b in pipeline.build(c.data, split="eval", tokenize=tok))
  assert n == 6 * 5


def test_interleave_round_robin_and_uneven_lengths():
  got = [pipeline.Interleave([[1, 2, 3], [10], [20, 21]])[i] for i in range(6)]
  assert got == [1, 10, 20, 2, 21, 3]
  with pytest.raises(IndexError):
    pipeline.Interleave([[1]])[1]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
  """configs/unified.py:demo trained one step (held-out evaluation after it) on the demo's
  shared random CLIP."""
  from puma_jax.training import loop

  root = tmp_path_factory.mktemp("demo")
  train_demo.write_clip(root / "clip", seed=3)
  c = demo(
    "unified",
    **{
      "init.clip": str(root / "clip"),
      "optim.total_steps": 1,
      "optim.warmup_steps": 0,
      "train.total_steps": 1,
      "train.eval_every": 1,
      "train.eval_batches": 1,
      "data.batch_size": 8,
      "data.synthetic.num_train": 40,
      "data.synthetic.num_eval": 4,
    },
  )
  loop.train_and_evaluate(c, str(root / "unified"))
  return root


def test_mllm_eval_reports_image_and_text_metrics(one_step):
  lines = (one_step / "unified" / "metrics.jsonl").read_text().splitlines()
  ev = next(r for r in map(json.loads, lines) if any(k.startswith("eval/") for k in r))
  assert ev["eval/image_mse"] > 0 and ev["eval/text_ce"] > 0
  assert any(k.startswith("eval/image_mse/") for k in ev)
  assert len([k for k in ev if k.startswith("eval/text_ce/")]) >= 3, sorted(ev)


def test_releases_share_the_clip_and_the_baseline_is_random(one_step, tmp_path):
  from puma_jax import checkpoints
  from puma_jax.tools import tiny_release

  clip = checkpoints.param_arrays(checkpoints.load_module(one_step / "clip"))
  trained = tiny_release.make(tmp_path / "r", workdirs=[one_step / "unified"], scales=["f4"])
  base = tiny_release.make(
    tmp_path / "r0",
    workdirs=[one_step / "unified"],
    scales=["f4"],
    clip=one_step / "clip",
    untrained=True,
  )
  assert base.manifest["name"] == "tiny-untrained"
  pt = checkpoints.param_arrays(checkpoints.load_module(trained.puma))
  pb = checkpoints.param_arrays(checkpoints.load_module(base.puma))
  assert set(pt) == set(pb)  # the same architecture
  for k, v in clip.items():
    np.testing.assert_array_equal(pt[f"clip.{k}"], v)
    np.testing.assert_array_equal(pb[f"clip.{k}"], v)
  llm = [k for k in pt if not k.startswith("clip.")]
  assert all(not np.array_equal(pt[k], pb[k]) for k in llm if pt[k].std() > 0)


def test_demo_decoders_and_clip_give_both_sides_of_cross_attention_a_place(tmp_path):
  """docs/DESIGN.md §5: the demo decoders learn where to draw only when the CLIP tokens carry
  their place and the UNet's queries know theirs. The demo CLIP's tokens carry it (a token's
  own grid row read from its feature: chance 1/16), a plainly random CLIP's do not."""
  import jax.numpy as jnp
  from flax import nnx

  from configs import decoder
  from puma_jax import checkpoints
  from puma_jax.models import clip as clip_lib
  from puma_jax.tools import diagnose_demo, tiny_release

  assert decoder.get_config("demo_f0").model.decoder.unet.position_code == "sincos2d"
  for plain in ("tiny_f0", "f0"):
    assert decoder.get_config(plain).model.decoder.unet.position_code == "none"
  train_demo.write_clip(tmp_path / "clip", seed=0)
  demo_clip = checkpoints.load_module(tmp_path / "clip", family="clip-vision")
  random_clip = tiny_release.random_module(
    lambda: clip_lib.CLIPVisionModel(clip_lib.tiny(), rngs=nnx.Rngs(0)), 0
  )
  images, _ = diagnose_demo.single_shape_scenes("train", 96, 32)
  x = clip_lib.normalize_uint8(jnp.asarray(images))
  for model, low, high in ((demo_clip, 0.5, 1.0), (random_clip, 0.0, 0.2)):
    p = np.asarray(clip_lib.patch_features(model, x))
    assert low < diagnose_demo.own_row_accuracy(p[:64], p[64:]) < high
