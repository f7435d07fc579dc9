"""PumaModel: packing, cached generation (features and text) vs full forwards, sizes, errors.

The model tests run with the byte tokenizer and a real BPE one (tests/text_tokenizers.py): a
model sized and numbered for each ([IMG], positions and pad = </s> at other ids)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax import sequence as seq, sharding
from puma_jax.inference import generation, text
from puma_jax.training import losses
from puma_jax.models import puma

from tests import text_tokenizers


@pytest.fixture(scope="module")
def model(tokenizer):
  m = puma.PumaModel(text_tokenizers.puma_config(tokenizer), rngs=nnx.Rngs(0))
  # non-trivial norms and embeddings so that a wrong slot or position shows
  for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    if path[-1] == "scale":
      var.value = 1 + 0.2 * jax.random.normal(jax.random.key(len(path)), var.value.shape)
  return m


def build(tok, segs, kind):
  return seq.build(segs, tok.encode, tok.special, kind)


def rows_to_batch(rows, images):
  b = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0] if k != "packed"}
  b["images"] = images
  return b


def test_packing_equals_separate_examples(model, tokenizer):
  tok, pad = tokenizer, tokenizer.special.pad
  rng = np.random.RandomState(0)
  ex1, ex2 = build(tok, seq.edit("bigger"), "edit"), build(tok, seq.i2t("a blue square"), "i2t")
  imgs = jnp.asarray(rng.randn(3, 32, 32, 3).astype(np.float32))
  packed = seq.pack([ex1, ex2], 1280, 3, pad)
  assert packed["packed"] == 2
  sep = [seq.pack([ex1], 1280, 3, pad), seq.pack([ex2], 1280, 3, pad)]
  forward = jitted_forward(model)
  out_p = forward(rows_to_batch([packed], imgs[None]))
  out_s = forward(rows_to_batch(sep, jnp.stack([imgs, jnp.concatenate([imgs[2:], imgs[:2]])])))
  n1, n2 = len(ex1), len(ex2)
  for key in ("logits", "feature_pred", "router_logits"):
    np.testing.assert_allclose(out_p[key][0, :n1], out_s[key][0, :n1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
      out_p[key][0, n1 : n1 + n2], out_s[key][1, :n2], rtol=1e-4, atol=1e-5
    )
  weights = {"text_weight": 0.02, "image_weight": 1.0, "router_weight": 0.1}
  lp, _ = losses.mllm_loss(
    out_p["logits"],
    out_p["feature_pred"],
    out_p["features"],
    rows_to_batch([packed], None),
    weights,
    router_logits=out_p["router_logits"],
  )
  ls, _ = losses.mllm_loss(
    out_s["logits"],
    out_s["feature_pred"],
    out_s["features"],
    rows_to_batch(sep, None),
    weights,
    router_logits=out_s["router_logits"],
  )
  np.testing.assert_allclose(float(lp), float(ls), rtol=1e-5)


def jitted_forward(model):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda b: nnx.merge(graphdef, state)(b))


def reference_features(model, prompt, images, num_slots):
  """Coarse-to-fine generation by repeated full forward passes (no cache). Every pass has the
  same length (the tail is causally invisible), so one compiled forward serves them all."""
  m = prompt["num_images"]
  gen = np.zeros((seq.IMAGE_TOKENS, model.config.feature_dim), np.float32)
  feats_in = np.asarray(model.encode_images(images[None]))[0]  # (M, 341, F)
  forward = jitted_forward(model)
  n = len(prompt["tokens"])
  out = []
  for j in range(num_slots):
    batch = {
      "tokens": np.concatenate([prompt["tokens"], np.zeros(num_slots, np.int32)])[None],
      "image_index": np.concatenate(
        [prompt["image_index"], np.where(np.arange(num_slots) < j, m, -1)]
      )[None],
      "image_token": np.concatenate([prompt["image_token"], np.arange(num_slots)])[None],
      "image_features": np.concatenate([feats_in[:m], gen[None]])[None],
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    pred = np.asarray(forward(batch)["feature_pred"])[0, n + j - 1]
    gen[j] = pred
    out.append(pred)
  return np.stack(out)


def test_cached_feature_generation_equals_full_forwards(model, tokenizer):
  tok, sp = tokenizer, tokenizer.special
  rng = np.random.RandomState(1)
  images = jnp.asarray(rng.randn(2, 1, 32, 32, 3).astype(np.float32))
  prompts = [
    seq.build_prompt([seq.Image(0), seq.Text("make it red")], tok.encode, sp, True),
    seq.build_prompt([seq.Image(0), seq.Text("x")], tok.encode, sp, True),
  ]
  feats, router = generation.generate_features(model, prompts, "f2", images=images)
  assert feats.shape == (2, 21, model.config.feature_dim) and router.shape == (2, 5)
  for i in range(2):
    ref = reference_features(model, prompts[i], images[i], 21)
    np.testing.assert_allclose(np.asarray(feats[i]), ref, rtol=1e-4, atol=1e-5)
  assert generation.scale_slice(feats, "f3").shape == (2, 4, model.config.feature_dim)
  with pytest.raises(ValueError, match="f0 needs 341"):
    generation.scale_slice(feats, "f0")


def test_cached_text_generation_equals_full_forwards(model, tokenizer):
  tok, sp = tokenizer, tokenizer.special
  rng = np.random.RandomState(2)
  images = jnp.asarray(rng.randn(2, 1, 32, 32, 3).astype(np.float32))
  prompts = [
    seq.build_prompt(seq.chat([("What is it?", "")])[:-1], tok.encode, sp),
    seq.build_prompt([seq.Image(0), seq.Text("Caption:")], tok.encode, sp),
  ]
  got = text.generate_text(model, prompts, 12, images=images, stop_tokens=())
  feats_in = model.encode_images(images)
  forward = jitted_forward(model)
  for i, pr in enumerate(prompts):
    n = len(pr["tokens"])
    pad = lambda a, v: list(a) + [v] * 12
    toks, idx, slot = pad(pr["tokens"], 0), pad(pr["image_index"], -1), pad(pr["image_token"], -1)
    ref = []
    for j in range(12):
      batch = {
        "tokens": jnp.asarray([toks]),
        "image_index": jnp.asarray([idx]),
        "image_token": jnp.asarray([slot]),
        "image_features": feats_in[i : i + 1],
      }
      nxt = int(jnp.argmax(forward(batch)["logits"][0, n + j - 1]))
      ref.append(nxt)
      toks[n + j] = nxt
    assert got[i] == ref


def test_paper_config_parameter_breakdown():
  abstract = nnx.eval_shape(lambda: puma.PumaModel(puma.paper(), rngs=nnx.Rngs(0)))
  b = puma.param_breakdown(abstract)
  llama3_8b, grown = 8_030_261_248, 226 * 4096 * 2  # embeddings and lm_head grow by 226 rows
  assert b["llm"] == llama3_8b + grown
  assert b["clip"] == 303_179_776
  assert b["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
  assert b["head"] == 4096 * 4096 + 4096 + 4096 * 1024 + 1024
  assert b["scale_pos_embed"] == (5 + 256) * 4096
  assert b["router"] == 4096 * 5 + 5
  assert b["total"] == sharding.count_params(abstract) == 8_378_338_309


def test_bad_inputs(model, tokenizer):
  tok, sp = tokenizer, tokenizer.special
  p = seq.build_prompt([seq.Image(0), seq.Text("q")], tok.encode, sp, True)
  with pytest.raises(ValueError, match=r"images must be preprocessed \(batch, images, 32, 32, 3\)"):
    generation.generate_features(model, [p], "f3", images=jnp.zeros((1, 1, 224, 224, 3)))
  with pytest.raises(ValueError, match="unknown scale 'f9'"):
    generation.generate_features(model, [p], "f9", images=jnp.zeros((1, 1, 32, 32, 3)))
  long = seq.build_prompt([seq.Text("x" * 2100)], tok.encode, sp, True)
  assert len(long["tokens"]) > 2048
  with pytest.raises(ValueError, match="exceeds the context length 2048"):
    generation.generate_features(model, [long], "f3")
  with pytest.raises(ValueError, match="must end with \\[IMG\\]"):
    generation.generate_features(model, [seq.build_prompt([seq.Text("x")], tok.encode, sp)], "f4")
  with pytest.raises(ValueError, match="uses 1 images, more than the 0"):
    text.generate_text(model, [p], 4, features=jnp.zeros((1, 0, 341, 64)))
  with pytest.raises(ValueError, match="clip.image_size=64 / patch_size=2"):
    puma.PumaConfig(llm=model.config.llm, clip=model.config.clip.replace(image_size=64))


def test_sampled_text_generation_runs_and_is_seeded(model, tokenizer):
  p = [seq.build_prompt([seq.Text("hello")], tokenizer.encode, tokenizer.special)]
  a = text.generate_text(model, p, 6, temperature=0.9, top_k=20, top_p=0.9, seed=3, stop_tokens=())
  b = text.generate_text(model, p, 6, temperature=0.9, top_k=20, top_p=0.9, seed=3, stop_tokens=())
  assert a == b and len(a[0]) == 6 and all(0 <= t < model.config.llm.vocab_size for t in a[0])
