"""Packed MLLM rows through the data pipeline: same loss and gradients as the same examples
unpacked, exact mid-epoch restore, first fit over several open rows, metrics.

The pipeline tests run with the byte tokenizer and a real BPE one (tests/text_tokenizers.py);
the loss and gradient test, the file's slow one, with bytes only."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax.data import config as data_config
from puma_jax.data import pipeline
from puma_jax.data.rows import MLLMEncoder, image_slots
from puma_jax.models import clip as clip_lib, puma
from puma_jax.tokenizer import ByteTokenizer
from puma_jax.training import losses, mllm

TOK = ByteTokenizer()  # the tests without the `tokenizer` fixture
SEQ_LEN = 1536


def cfg(pack=True, bins=4, batch=2, **kw):
  c = data_config.get_config("tiny")
  c.synthetic.num_train = 40
  c.synthetic.num_eval = 8
  c.batch_size = batch
  c.num_threads = 1
  c.prefetch = 2
  c.pack = pack
  c.pack_bins = bins
  for k, v in kw.items():
    c[k] = v
  return c


def encoder(tok=TOK):
  return MLLMEncoder(tok.encode, tok.special, SEQ_LEN, 2, 32)


def take(it, n):
  return [next(it) for _ in range(n)]


def examples_of(rows):
  """Each example of packed/unpacked rows as (tokens, text_target, feature_weight) bytes."""
  out = []
  for b in rows:
    for r in range(b["tokens"].shape[0]):
      seg = b["segment_ids"][r]
      for s in range(1, int(seg.max()) + 1):
        m = seg == s
        out.append(b["tokens"][r][m].tobytes() + b["feature_weight"][r][m].tobytes())
  return out


def test_image_slots_follow_seq_len():
  assert image_slots(2048) == 5 and image_slots(1536) == 4 and image_slots(768) == 2
  assert image_slots(448) == 1
  assert image_slots(100) == 1


def test_packed_rows_fill_and_hold_the_same_examples(tokenizer):
  enc = encoder(tokenizer)
  packed = iter(pipeline.build(cfg(), encode=enc, host_index=0, host_count=1))
  rows = take(packed, 6)
  plain = iter(pipeline.build(cfg(pack=False, batch=1), encode=enc, host_index=0, host_count=1))
  assert "segment_ids" in rows[0] and rows[0]["images"].shape == (2, 4, 32, 32, 3)
  ex_p = examples_of(rows)
  ex_u = examples_of(take(plain, len(ex_p) + 8))
  # first fit reorders within a group of rows, never drops nor invents an example
  assert set(ex_p) <= set(ex_u)
  assert len(set(ex_p) & set(ex_u[: len(ex_p) - 8])) == len(ex_u[: len(ex_p) - 8])
  m = packed.metrics()
  assert m["data/examples"] == len(ex_p) and m["data/examples_per_row"] > 2.5
  real = sum(int((b["segment_ids"] > 0).sum()) for b in rows) / (12 * SEQ_LEN)
  assert m["data/real_token_fraction"] == pytest.approx(real)
  assert real > 0.6
  # images follow their examples: every feature slot's image is a non-zero image of the row
  for b in rows:
    for r in range(2):
      used = np.unique(b["image_index"][r][b["image_index"][r] >= 0])
      assert all(b["images"][r, i].any() for i in used)
      assert len(used) == int(b["num_images"][r])


def test_evaluation_split_is_not_packed(tokenizer):
  c = cfg(num_epochs=1, shuffle=False)
  ev = next(
    iter(pipeline.build(c, split="eval", encode=encoder(tokenizer), host_index=0, host_count=1))
  )
  assert int(ev["segment_ids"].max()) == 1


def test_packed_restore_mid_epoch_continues_exactly(tokenizer):
  c = cfg(bins=3)
  it = iter(pipeline.build(c, encode=encoder(tokenizer), host_index=0, host_count=1))
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 7)
  fresh = iter(pipeline.build(c, encode=encoder(tokenizer), host_index=0, host_count=1))
  fresh.set_state(state)
  got = take(fresh, 7)
  for x, y in zip(got, expected):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert fresh.metrics() == it.metrics()


def test_bad_pack_bins_is_named():
  with pytest.raises(ValueError, match="pack_bins"):
    iter(pipeline.build(cfg(bins=0), encode=encoder(), host_index=0, host_count=1))


def test_packed_rows_give_the_unpacked_loss_and_gradients():
  """One open row (sequential packing) so that the packed rows hold a prefix of the stream,
  which the unpacked pipeline then delivers one example per row."""
  packed = next(
    iter(pipeline.build(cfg(bins=1, batch=2), encode=encoder(), host_index=0, host_count=1))
  )
  n = int(sum(packed["segment_ids"][r].max() for r in range(2)))
  assert n >= 3
  unpacked = next(
    iter(pipeline.build(cfg(pack=False, batch=n), encode=encoder(), host_index=0, host_count=1))
  )
  assert sorted(examples_of([packed])) == sorted(examples_of([unpacked]))

  model = puma.PumaModel(puma.tiny(), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  frozen = nnx.State({})
  weights = {"text_weight": 0.02, "image_weight": 1.0, "router_weight": 0.1}
  objective = mllm.objective(graphdef, frozen, rest, weights)

  def loss(p, b):
    b = {k: jnp.asarray(v) for k, v in b.items() if k != "num_images"}
    b["images"] = clip_lib.normalize_uint8(b["images"])
    b["_normalizers"] = losses.mllm_normalizers(b)
    return objective(p, b)[0]

  grad = jax.jit(jax.value_and_grad(loss))
  lp, gp = grad(params, packed)
  lu, gu = grad(params, unpacked)
  np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
  for (path, a), (_, b) in zip(
    jax.tree_util.tree_leaves_with_path(gp), jax.tree_util.tree_leaves_with_path(gu)
  ):
    scale = float(jnp.max(jnp.abs(b))) + 1e-12
    assert float(jnp.max(jnp.abs(a - b))) / scale < 1e-4, path


def test_a_source_of_only_bad_records_reaches_the_skip_limit(tokenizer):
  """Skips leave the packing stage at once: with nothing but too-long examples the pipeline
  stops with the consecutive-skip error instead of waiting for a row that never fills."""
  c = cfg(max_consecutive_skips=5)
  for name in c.sources:
    c.sources[name].weight = 1.0 if name == "pairs" else 0.0
  short = MLLMEncoder(tokenizer.encode, tokenizer.special, 300, 2, 32)  # no image example fits
  it = iter(pipeline.build(c, encode=short, host_index=0, host_count=1))
  with pytest.raises(pipeline.DataError, match="bad records in a row"):
    next(it)
