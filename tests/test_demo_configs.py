"""configs/pretrain.py:demo and configs/unified.py:demo (the train_demo MLLM stages), and the
held-out evaluation of the MLLM stage covering every sequence kind."""

import json

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


def test_mllm_eval_reports_image_and_text_metrics(tmp_path):
  from puma_jax.training import loop

  c = demo(
    "unified",
    **{
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
  loop.train_and_evaluate(c, str(tmp_path))
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  ev = next(r for r in recs if any(k.startswith("eval/") for k in r))
  assert ev["eval/image_mse"] > 0 and ev["eval/text_ce"] > 0
  assert any(k.startswith("eval/image_mse/") for k in ev)
  assert len([k for k in ev if k.startswith("eval/text_ce/")]) >= 3, sorted(ev)
