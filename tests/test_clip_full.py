"""Full CLIP (text + vision towers, projections) vs transformers' CLIPModel; CLIP-I / CLIP-T."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from puma_jax import checkpoints, sharding
from puma_jax.convert import ConversionError, convert, import_module
from puma_jax.convert import clip_full
from puma_jax.evaluation import clip_tokenizer, metrics
from puma_jax.models import clip_text
from tests import clip_vocab
from tests.utils import rel_err, randomize_norms

VOCAB = 2 * 256 + len(clip_vocab.MERGES) + 2  # clip_vocab's size; specials are the last two ids
BOS, EOS = VOCAB - 2, VOCAB - 1


def hf_config(eos_token_id: int, **text):
  return transformers.CLIPConfig(
    text_config=dict(
      vocab_size=VOCAB,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      bos_token_id=BOS,
      eos_token_id=eos_token_id,
      pad_token_id=EOS,
      **text,
    ),
    vision_config=dict(
      hidden_size=48,
      intermediate_size=40,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
    ),
    projection_dim=24,
  )


def make_model(tmp_path, eos_token_id, seed=0):
  torch.manual_seed(seed)
  model = transformers.CLIPModel(hf_config(eos_token_id)).eval()
  randomize_norms(model, seed)
  with torch.no_grad():
    model.logit_scale.fill_(1.234)
  src = tmp_path / "hf"
  model.save_pretrained(src)
  clip_vocab.write(src)
  return model, src


def hf_image(model, pixels):
  with torch.no_grad():
    out = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  return getattr(out, "pooler_output", out).numpy()


def hf_text(model, ids, mask=None):
  with torch.no_grad():
    out = model.get_text_features(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=None if mask is None else torch.from_numpy(mask),
    )
  return getattr(out, "pooler_output", out).numpy()


@pytest.mark.parametrize("eos_rule", ["first_eos", "legacy_argmax"])
def test_clip_parity(tmp_path, eos_rule):
  eos_id = EOS if eos_rule == "first_eos" else clip_text.LEGACY_EOS_ID
  hf, src = make_model(tmp_path, eos_id)
  out = convert("clip", src, tmp_path / "ours")
  assert (out / "vocab.json").exists() and (out / "merges.txt").exists()
  model = checkpoints.load_module(out, family="clip")
  assert model.config.text_config.eos_token_id == eos_id
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, px, ids, m: nnx.merge(graphdef, s)(px, ids, m))

  rs = np.random.RandomState(0)
  pixels = rs.randn(3, 32, 32, 3).astype(np.float32)
  tok = clip_tokenizer.load(out)
  ids, mask = clip_tokenizer.tokenize(tok, ["a photo of a cat", "dog", "a photo of a dog " * 5], 16)
  assert (ids == EOS).any(1).all() and ids[2, -1] == EOS  # truncation keeps the end token
  img, txt = run(state, pixels, ids, mask)
  assert rel_err(img, hf_image(hf, pixels)) < 1e-4
  assert rel_err(txt, hf_text(hf, ids, mask)) < 1e-4
  # Without a padding mask the causal mask alone decides; pooling must still match.
  img2, txt2 = run(state, pixels, ids, np.ones_like(mask))
  assert rel_err(txt2, hf_text(hf, ids)) < 1e-4
  # Ids without the end token tell the two pooling rules apart (first-EOS: position 0; legacy:
  # position of the largest id), so a model applying the wrong rule fails here.
  raw = rs.randint(3, EOS, (3, 16)).astype(np.int32)
  raw_ref = hf_text(hf, raw)
  assert rel_err(run(state, pixels, raw, np.ones_like(raw))[1], raw_ref) < 1e-4
  # Hidden states of the text tower, all positions.
  with torch.no_grad():
    ref_h = hf.text_model(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)
    ).last_hidden_state.numpy()
  h = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).text_model(i, m))(state, ids, mask)
  valid = mask.astype(bool)
  assert rel_err(np.asarray(h)[valid], ref_h[valid]) < 1e-4
  np.testing.assert_allclose(np.asarray(model.logit_scale[...]), 1.234, rtol=1e-6)


def test_clip_scores(tmp_path):
  hf, src = make_model(tmp_path, EOS, seed=1)
  scorer = metrics.CLIPScorer.load(convert("clip", src, tmp_path / "ours"))
  rs = np.random.RandomState(1)
  gen = rs.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  ref = rs.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  captions = ["a photo of a cat", "a dog"]
  mean = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
  std = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)
  fe_g, fe_r = hf_image(hf, (gen - mean) / std), hf_image(hf, (ref - mean) / std)
  ids, mask = clip_tokenizer.tokenize(scorer.tokenizer, captions, 16)
  fe_t = hf_text(hf, ids, mask)
  cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert rel_err(scorer.clip_i(gen, ref), cos(fe_g, fe_r)) < 1e-4
  assert rel_err(scorer.clip_t(gen, captions), cos(fe_g, fe_t)) < 1e-4
  # Different sizes on the two sides are each resized to the tower's resolution.
  big = np.asarray(jax.image.resize(ref, (2, 48, 64, 3), "linear"))
  direct = metrics.cosine(scorer.image_embeds(gen), scorer.image_embeds(big))
  np.testing.assert_allclose(scorer.clip_i(gen, big), direct, rtol=1e-5)
  with pytest.raises(metrics.MetricInputError, match="3 captions for 2 images"):
    scorer.clip_t(gen, captions + ["x"])
  with pytest.raises(metrics.MetricInputError, match="one string"):
    scorer.clip_t(gen[:1], "a cat")
  with pytest.raises(metrics.MetricInputError, match="differ in batch size"):
    scorer.clip_i(gen, ref[:1])


def test_resize_center_crop_geometry():
  x = jnp.arange(2 * 40 * 60 * 3, dtype=jnp.float32).reshape(2, 40, 60, 3)
  y = metrics.resize_center_crop(x, 20)
  assert y.shape == (2, 20, 20, 3)
  # Shortest side 40 -> 20 halves the image (60 -> 30); the crop keeps columns 5..24.
  full = jax.image.resize(x, (2, 20, 30, 3), "cubic", antialias=True)
  np.testing.assert_array_equal(y, full[:, :, 5:25])
  assert metrics.resize_center_crop(x[:, :20, :20], 20) is not None


def test_real_size_param_count():
  ours = nnx.eval_shape(lambda: clip_text.CLIPModel(clip_text.vit_b32(), rngs=nnx.Rngs(0)))
  assert sharding.count_params(ours) == 151_277_313
  cfg = transformers.CLIPConfig(
    text_config=dict(eos_token_id=2),
    vision_config=dict(
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      image_size=224,
      patch_size=32,
    ),
    projection_dim=512,
  )
  with torch.device("meta"):
    hf = transformers.CLIPModel(cfg)
  assert sum(p.numel() for p in hf.parameters()) == 151_277_313
  # The converter reads that config into exactly our ViT-B/32 preset, also when the towers list
  # only the fields that differ from transformers' defaults (old hub configs do).
  assert clip_full.config_from_hf(json.loads(cfg.to_json_string())) == clip_text.vit_b32()
  sparse = {
    "text_config_dict": {"eos_token_id": 2},
    "vision_config_dict": {"patch_size": 32},
    "projection_dim": 512,
  }
  assert clip_full.config_from_hf(sparse) == clip_text.vit_b32()


def test_conversion_errors(tmp_path):
  hf, src = make_model(tmp_path, EOS)
  from safetensors.torch import load_file, save_file

  sd = load_file(src / "model.safetensors")
  sd.pop("text_projection.weight")
  save_file(sd, src / "model.safetensors")
  with pytest.raises(ConversionError, match=r"text_projection\.weight"):
    import_module("clip", src)
  cfg = json.loads((src / "config.json").read_text())
  del cfg["text_config"]
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match="text_config"):
    import_module("clip", src)
  with pytest.raises(metrics.MissingWeightsError, match=r"'clip'.*nowhere"):
    metrics.CLIPScorer.load(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
    (tmp_path / "vocab_only").mkdir()
    (tmp_path / "vocab_only" / "vocab.json").write_text("{}")
    clip_tokenizer.load(tmp_path / "vocab_only")


def test_text_input_checks():
  model = nnx.eval_shape(lambda: clip_text.CLIPModel(clip_text.tiny(), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="max_position_embeddings=16"):
    model.text_model.check_input(jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="integers"):
    model.text_model.check_input(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="eos_token_id=200"):
    clip_text.CLIPTextConfig(vocab_size=100, eos_token_id=200)
