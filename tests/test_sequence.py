"""Sequence builder masks for every sequence kind, box tokens, packing, the loss vs NumPy."""

import numpy as np
import pytest

from puma_jax import sequence as seq
from puma_jax.training import losses

SP = seq.SpecialTokens(bos=1, eos=2, pad=0, img_start=3, img_end=4, pos0=300)


def encode(text):  # byte-level toy tokenizer: ids 10..265
  return [10 + b for b in text.encode()]


def build(segs, kind):
  return seq.build(segs, encode, SP, kind)


def test_image_layout_constants():
  assert seq.IMAGE_TOKENS == 341
  assert [seq.SCALE_OFFSET[s] for s in (4, 3, 2, 1, 0)] == [0, 1, 5, 21, 85]
  assert list(seq.SLOT_SCALE[:6]) == [4, 3, 3, 3, 3, 2]
  assert seq.SLOT_POS[85] == 0 and seq.SLOT_POS[340] == 255


def test_t2i_masks_by_hand():
  b = build(seq.t2i("ab"), "t2i")
  img = 3  # position of [IMG]: bos, a, b, [IMG]
  assert list(b.tokens[:4]) == [1, 10 + 97, 10 + 98, 3]
  assert b.tokens[img + 342] == 4 and b.tokens[-1] == 2 and len(b) == 4 + 341 + 2
  assert np.all(b.image_index[img + 1 : img + 342] == 0)
  assert list(b.image_token[img + 1 : img + 342]) == list(range(341))
  # caption is input: no text loss before the image
  assert not b.text_mask[: img + 341].any()
  # the last f0 slot predicts [/IMG], [/IMG] predicts </s>
  assert b.text_mask[img + 341] and b.text_target[img + 341] == 4
  assert b.text_mask[img + 342] and b.text_target[img + 342] == 2
  # feature weights: position p predicts slot p+1; [IMG] predicts f4
  expect = np.zeros(len(b), np.float32)
  for j in range(341):
    expect[img + j] = seq.SCALE_WEIGHTS[int(seq.SLOT_SCALE[j])]
  np.testing.assert_array_equal(b.feature_weight, expect)
  assert b.target_scale[img] == 4 and b.target_scale[img + 340] == 0 and b.target_scale[0] == -1
  # weight x tokens compensates the token counts (docs/DESIGN.md §7)
  per_scale = {s: expect[b.target_scale == s].sum() for s in range(5)}
  assert per_scale == {4: 1024, 3: 2048, 2: 1024, 1: 512, 0: 256}


def test_i2t_masks():
  b = build(seq.i2t("hi"), "i2t")
  assert b.feature_weight.sum() == 0
  cap = 1 + 1 + 341 + 1  # bos [IMG] slots [/IMG]
  # [/IMG] predicts 'h', 'h' predicts 'i', 'i' predicts </s>
  assert list(np.nonzero(b.text_mask)[0]) == [cap - 1, cap, cap + 1]
  assert list(b.text_target[cap - 1 : cap + 2]) == [10 + 104, 10 + 105, 2]


def test_chat_follows_system_message_and_supervises_answers_only():
  b = build(seq.chat([("What colour?", "Red."), ("Shape?", "A circle.")]), "chat")
  text = bytes(int(t) - 10 for t in b.tokens if t >= 10 and t < 266).decode()
  assert text.startswith(seq.SYSTEM_MESSAGE + " USER: ")
  # LLaVA-1.5: every answer ends in </s> (id 2, dropped by the byte decoding above)
  assert "\nWhat colour? ASSISTANT: Red.USER: Shape? ASSISTANT: A circle." in text
  supervised = bytes(int(t) - 10 for t, m in zip(b.text_target, b.text_mask) if m and t >= 10)
  assert supervised.decode() == " Red. A circle."
  targets = list(b.text_target[b.text_mask])
  assert targets[len(" Red.")] == 2 and targets[-1] == 2 and targets.count(2) == 2


@pytest.mark.parametrize(
  "segs,kind",
  [
    (seq.edit("make it blue"), "edit"),
    (seq.conditional("canny"), "conditional"),
    (seq.conditional("inpaint", "a cat"), "conditional"),
  ],
)
def test_edit_and_conditional_supervise_the_second_image_only(segs, kind):
  b = build(segs, kind)
  assert b.num_images == 2
  first = b.image_index == 0
  second = b.image_index == 1
  # positions that predict a slot of image 0 carry no weight; all 341 slots of image 1 do
  nxt = np.append(b.image_index[1:], -1)
  assert b.feature_weight[nxt == 0].sum() == 0
  assert (b.feature_weight[nxt == 1] > 0).sum() == 341
  assert first.sum() == second.sum() == 341


def test_grounding_boxes_as_position_tokens():
  boxes = [(0.1, 0.2, 0.5, 0.9), (0.0, 0.0, 1.0, 1.0)]
  b = build(seq.grounding("the red square", boxes), "grounding")
  sup = b.text_target[b.text_mask]
  assert bytes(int(t) - 10 for t in sup[:14]).decode() == "the red square"
  assert list(sup[14:-1] - SP.pos0) == seq.box_to_bins(boxes[0]) + seq.box_to_bins(boxes[1])
  assert sup[-1] == 2


def _caption():
  caption = "a red circle at the top and a blue square below it"
  spans = [(0, 12), (28, 41)]
  boxes = [(0.1, 0.0, 0.4, 0.3), (0.5, 0.6, 0.9, 0.95)]
  return caption, spans, boxes


def test_grounded_caption_starts_with_the_unsupervised_marker():
  caption, spans, boxes = _caption()
  b = build(seq.grounded_caption(caption, spans, boxes), "grounding")
  after = 1 + 1 + 341 + 1  # bos [IMG] slots [/IMG]
  marker = encode(seq.GROUNDING_PROMPT)
  assert list(b.tokens[after : after + len(marker)]) == marker
  # the marker is given (no position predicts it); caption, boxes and </s> are supervised
  assert not b.text_mask[after - 1 : after + len(marker) - 1].any()
  sup = b.text_target[b.text_mask]
  box_ids = [SP.pos0 + v for v in seq.box_to_bins(boxes[0])]
  want = encode(caption[:12]) + box_ids
  want += encode(caption[12:41]) + [SP.pos0 + v for v in seq.box_to_bins(boxes[1])]
  assert list(sup) == want + encode(caption[41:]) + [SP.eos]
  # an i2t caption of the same image differs from the first text token on
  i2t = build(seq.i2t(caption), "i2t")
  assert list(i2t.tokens[:after]) == list(b.tokens[:after])
  assert i2t.tokens[after] != b.tokens[after]


def test_grounding_prompt_is_the_training_prefix():
  caption, spans, boxes = _caption()
  full = build(seq.grounded_caption(caption, spans, boxes), "grounding").tokens
  for k in range(len(spans)):
    prompt = seq.build_prompt(seq.grounding_prompt(caption, spans[: k + 1], boxes[:k]), encode, SP)[
      "tokens"
    ]
    n = len(prompt)
    np.testing.assert_array_equal(full[:n], prompt)
    assert list(full[n : n + 4] - SP.pos0) == seq.box_to_bins(boxes[k])  # what it must answer
  one = seq.grounding_prompt("a red circle", [(0, 12)])
  assert one == [seq.Image(0), seq.Text(seq.GROUNDING_PROMPT), seq.Text("a red circle")]
  with pytest.raises(ValueError, match="boxes of the 1 phrase"):
    seq.grounding_prompt(caption, spans)
  with pytest.raises(ValueError, match="must end after"):
    seq.grounding_prompt(caption, spans[::-1], boxes[:1])
  with pytest.raises(ValueError, match="not inside the caption"):
    seq.grounding_prompt("a dot", [(0, 12)])
  with pytest.raises(ValueError, match="one box per phrase"):
    seq.grounded_caption(caption, spans, boxes[:1])
  with pytest.raises(ValueError, match="outside the caption"):
    seq.grounded_caption("short", spans[:1], boxes[:1])
  assert list(SP.positions) == list(range(SP.pos0, SP.pos0 + seq.NUM_POSITION_TOKENS))


def test_box_round_trip_and_errors():
  rng = np.random.RandomState(0)
  for _ in range(200):
    x0, x1 = np.sort(rng.rand(2))
    y0, y1 = np.sort(rng.rand(2))
    box = [x0, y0, x1, y1]
    bins = seq.box_to_bins(box)
    assert all(0 <= v < 224 for v in bins)
    np.testing.assert_allclose(seq.bins_to_box(bins), box, atol=1 / 448 + 1e-12)
    assert seq.box_to_bins(seq.bins_to_box(bins)) == bins
  for bad in ([0.5, 0.1, 0.2, 0.9], [-0.1, 0, 1, 1], [0, 0, 1.2, 1], [0, 0, 1], [0, 0, np.nan, 1]):
    with pytest.raises(ValueError, match="box"):
      seq.box_to_bins(bad)


def test_text_only_and_partial_scales():
  b = build(seq.text_only("xyz"), "text")
  assert b.text_mask.sum() == 4  # x predicted from bos ... </s>
  b = build([seq.Text("p"), seq.Image(0, supervised=True, scales=(4, 3))], "t2i")
  assert set(b.target_scale[b.feature_weight > 0]) == {4, 3}
  assert (b.feature_weight > 0).sum() == 5
  with pytest.raises(ValueError, match="scale indices"):
    build([seq.Image(0, scales=(5,))], "t2i")
  with pytest.raises(ValueError, match="unknown sequence kind"):
    build([], "painting")


def test_pack_layout():
  exs = [
    build(seq.i2t("y"), "i2t"),
    build(seq.edit("x"), "edit"),
    build(seq.text_only("z"), "text"),
  ]
  n = [len(e) for e in exs]
  row = seq.pack(exs, seq_len=sum(n) + 5, max_images=3, pad_id=0)
  assert row["packed"] == 3 and row["num_images"] == 3
  assert list(np.unique(row["segment_ids"])) == [0, 1, 2, 3]
  assert (row["segment_ids"] == 0).sum() == 5
  assert row["positions"][n[0]] == 0 and row["positions"][n[0] - 1] == n[0] - 1
  # the edit example's images become 1 and 2 of the row
  assert set(row["image_index"][n[0] : n[0] + n[1]]) == {-1, 1, 2}
  assert list(row["kind_id"][[0, n[0], n[0] + n[1]]]) == [1, 3, 6]
  with pytest.raises(ValueError, match="longer than seq_len"):
    seq.pack(exs, seq_len=10, max_images=3, pad_id=0)
  row = seq.pack(exs, seq_len=sum(n) + 5, max_images=1, pad_id=0)
  assert row["packed"] == 1


def numpy_reference_loss(rows, logits, pred, feats):
  """The loss written out by hand from docs/DESIGN.md §7, position by position."""
  ce_terms, mse_terms = [], []
  for b, row in enumerate(rows):
    T = len(row["tokens"])
    for p in range(T - 1):
      if row["segment_ids"][p] == 0 or row["segment_ids"][p + 1] != row["segment_ids"][p]:
        continue
      if row["text_mask"][p]:
        z = logits[b, p].astype(np.float64)
        lse = np.log(np.exp(z - z.max()).sum()) + z.max()
        ce_terms.append(lse - z[row["text_target"][p]])
      if row["image_index"][p + 1] >= 0 and row["feature_weight"][p] > 0:
        scale = int(seq.SLOT_SCALE[row["image_token"][p + 1]])
        w = {4: 1024, 3: 512, 2: 64, 1: 8, 0: 1}[scale]
        mse_terms.append(w * np.mean((pred[b, p] - feats[b, p + 1]) ** 2))
  return 0.02 * np.mean(ce_terms) + 1.0 * np.mean(mse_terms), len(ce_terms), len(mse_terms)


def test_loss_equals_numpy_reference_on_a_mixed_batch():
  import jax.numpy as jnp

  rng = np.random.RandomState(0)
  exs = [
    build(seq.t2i("a red circle"), "t2i"),
    build(seq.i2t("blue"), "i2t"),
    build(seq.chat([("Q?", "A.")]), "chat"),
    build(seq.edit("bigger"), "edit"),
    build(seq.conditional("colorize"), "conditional"),
    build(seq.grounding("dot", [(0.1, 0.1, 0.3, 0.4)]), "grounding"),
    build([seq.Text("p"), seq.Image(0, supervised=True, scales=(4, 3, 2))], "t2i"),
    build(seq.text_only("hello world"), "text"),
  ]
  rows = [
    seq.pack(exs[:2], 1280, 4, 0),
    seq.pack(exs[2:4], 1280, 4, 0),
    seq.pack(exs[4:6], 1280, 4, 0),
    seq.pack(exs[6:], 1280, 4, 0),
  ]
  assert sum(r["packed"] for r in rows) == len(exs)
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "packed"}
  B, T, V, D = len(rows), 1280, 531, 8
  logits = rng.randn(B, T, V).astype(np.float32) * 3
  pred = rng.randn(B, T, D).astype(np.float32)
  feats = rng.randn(B, T, D).astype(np.float32) * (batch["image_index"] >= 0)[..., None]
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

  def ce(logits, b):
    return losses.text_ce(lambda x: x, jnp.asarray(logits), b["text_target"], b["text_mask"])

  m = losses.mllm_sums(ce(logits, jbatch), jnp.asarray(pred), jnp.asarray(feats), jbatch)
  # The paper's weights (the reference hard-codes 0.02 and 1.0); no router head.
  weights = {"text_weight": 0.02, "image_weight": 1.0, "router_weight": 0.0}
  # What training optimizes: the objective over the full batch's normalizers ...
  loss = losses.mllm_objective(m, losses.mllm_normalizers(jbatch), weights)
  ref, n_ce, n_mse = numpy_reference_loss(rows, logits, pred, feats)
  assert float(m["text_count"]) == n_ce and float(m["image_count"]) == n_mse
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  # ... and, as two microbatches whose shares add up, the accumulated step's loss.
  halves = [
    losses.mllm_objective(
      losses.mllm_sums(
        ce(logits[i : i + 2], {k: v[i : i + 2] for k, v in jbatch.items()}),
        jnp.asarray(pred[i : i + 2]),
        jnp.asarray(feats[i : i + 2]),
        {k: v[i : i + 2] for k, v in jbatch.items()},
      ),
      losses.mllm_normalizers(jbatch),
      weights,
    )
    for i in (0, 2)
  ]
  np.testing.assert_allclose(float(sum(halves)), ref, rtol=1e-5)
  s = losses.summarize(m, weights)
  np.testing.assert_allclose(s["loss"], ref, rtol=1e-5)
  assert {"mse_f0", "mse_f4", "text_ce/chat", "image_mse/edit", "text_ce/grounding"} <= set(s)
  # per-task image sums add up to the total
  np.testing.assert_allclose(
    float(m["task_image_mse_sum"].sum()), float(m["image_mse_sum"]), rtol=1e-5
  )


def test_router_labels_default_per_kind_and_override():
  b = build(seq.t2i("x"), "t2i")
  img = int(np.nonzero(b.tokens == SP.img_start)[0][0])
  assert b.router_label[img] == seq.KIND_SCALE["t2i"] and (b.router_label >= 0).sum() == 1
  b = build(seq.edit("y"), "edit")
  starts = np.nonzero(b.tokens == SP.img_start)[0]
  assert b.router_label[starts[0]] == -1 and b.router_label[starts[1]] == seq.KIND_SCALE["edit"]
  b = build([seq.Text("z"), seq.Image(0, supervised=True, route=4)], "t2i")
  assert set(b.router_label[b.router_label >= 0]) == {4}
  assert (build(seq.i2t("q"), "i2t").router_label == -1).all()
