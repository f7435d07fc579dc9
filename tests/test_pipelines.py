"""PumaPipeline with tiny random components: every task runs, features route to decoders.

The prompt-building tests run with the byte tokenizer and a real BPE one (tests/
text_tokenizers.py), on `text_pipe` (no decoders); the decoding tests with bytes only."""

import numpy as np
import pytest
from flax import nnx

from puma_jax import sequence as seq
from puma_jax.diffusion.sampler import SamplerSettings
from puma_jax.inference import generation, pipelines, router
from puma_jax.models import puma, puma_decoder, vae

from puma_jax.tokenizer import ByteTokenizer  # noqa: E402
from tests import text_tokenizers

TOK = ByteTokenizer()  # the tests without the `tokenizer` fixture


@pytest.fixture(scope="module")
def pipe():
  model = puma.PumaModel(puma.tiny(), rngs=nnx.Rngs(0))
  width = model.config.feature_dim

  def dec(tokens, seed):
    cfg = puma_decoder.tiny_config(tokens, sample_size=8).replace(mapping_dim=width)
    return puma_decoder.PumaDecoder(cfg, rngs=nnx.Rngs(seed))

  decoders = {"f4": dec(1, 1), "f3": dec(4, 2)}
  v = vae.AutoencoderKL(vae.tiny_config(), rngs=nnx.Rngs(3))
  return pipelines.PumaPipeline(
    model,
    encode=TOK.encode,
    decode=TOK.decode,
    special=TOK.special,
    decoders=decoders,
    vae=v,
    settings=SamplerSettings(num_steps=2),
  )


@pytest.fixture(scope="module")
def text_pipe(tokenizer, request):
  """A pipeline for `tokenizer` that generates but decodes nothing: for bytes the module's
  `pipe`, for BPE one around a PumaModel sized and numbered for the tokenizer."""
  if tokenizer.name == "byte":
    return request.getfixturevalue("pipe")
  model = puma.PumaModel(text_tokenizers.puma_config(tokenizer), rngs=nnx.Rngs(0))
  return pipelines.PumaPipeline(
    model, encode=tokenizer.encode, decode=tokenizer.decode, special=tokenizer.special
  )


def images(n, seed=0):
  return [np.random.RandomState(seed + i).randint(0, 256, (40, 48, 3), np.uint8) for i in range(n)]


def test_text_to_image_one_image_per_scale(pipe):
  out = pipe.text_to_image(["a red circle", "two squares"], scales=("f4", "f3"), seed=0)
  assert set(out) == {"f4", "f3"}
  for s in ("f4", "f3"):
    assert out[s].shape == (2, 16, 16, 3) and out[s].dtype == np.uint8
  again = pipe.text_to_image(["a red circle", "two squares"], scales=("f4", "f3"), seed=0)
  np.testing.assert_array_equal(out["f3"], again["f3"])
  other = pipe.text_to_image(["a red circle", "two squares"], scales=("f3",), seed=1)
  assert not np.array_equal(out["f3"], other["f3"])


def test_features_routed_to_the_right_scale(text_pipe, tokenizer):
  pipe, tok = text_pipe, tokenizer
  feats = pipe.text_to_image(["a red circle"], scales=("f3",), return_features=True)["f3"]
  prompts = [seq.build_prompt([seq.Text("a red circle")], tok.encode, tok.special, True)]
  full, _ = generation.generate_features(pipe.model, prompts, "f3")
  np.testing.assert_allclose(feats, np.asarray(full[:, 1:5]), rtol=1e-6)
  assert pipe.uncond_features("f3").shape == (4, pipe.model.config.feature_dim)


def test_edit_conditional_chat_ground_run(pipe):
  out = pipe.edit(images(2), ["make it blue", "move it left"], scales=("f4",))
  assert out["f4"].shape == (2, 16, 16, 3)
  auto = pipe.conditional(images(1), "colorize", return_features=True)
  assert auto["chosen"][0] in ("f0", "f1", "f2", "f3", "f4")
  answers = pipe.chat(images(2), ["What colour?", "How many?"], max_new_tokens=4)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  boxes = pipe.ground(images(1), ["the circle"])
  assert len(boxes) == 1 and len(boxes[0]) == 4


def test_ground_asks_as_training_lays_out_and_always_answers(text_pipe, tokenizer, monkeypatch):
  """The prompt is the training row's prefix up to the phrase (data rows of a caption that
  starts with the phrase), and decoding is restricted to 4 position tokens. The last phrase
  ends in a space: with BPE, "a box " and the caption's rest "around the cat" tokenize
  differently joined (" around" one token, apart "Ġ" then "around"), and the prompt must still
  be the training row's prefix."""
  from puma_jax.data import rows
  from puma_jax.data.schema import Example
  from puma_jax.inference import text

  pipe, tok, sp = text_pipe, tokenizer, tokenizer.special
  calls, real = [], text.generate_text
  monkeypatch.setattr(
    text, "generate_text", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw)
  )
  phrases = ["the circle", "a small red square", "a box "]
  rests = [" in the middle", " in the middle", "around the cat"]
  assert tok.merges_across(phrases[-1], rests[-1]) == (tok.name == "bpe")
  boxes = pipe.ground(images(3), phrases)
  assert [len(b) for b in boxes] == [4, 4, 4]
  assert all(0 < v < 1 for b in boxes for v in b)
  ((args, kw),) = calls
  assert list(kw["allowed_tokens"]) == list(sp.positions) and kw["stop_tokens"] == ()
  assert args[2] == 4
  # without the restriction the same random model does not answer with position tokens only
  free = real(*args, images=kw["images"], stop_tokens=())
  assert any(t not in sp.positions for row in free[:2] for t in row)
  for phrase, rest, prompt, img in zip(phrases, rests, args[1], images(3)):
    ex = Example(
      kind="grounding",
      images=(img,),
      text=phrase + rest,
      phrases=((0, len(phrase)),),
      boxes=np.array([[0.25, 0.25, 0.75, 0.75]], np.float32),
    )
    segs, kind = rows.segments(ex)
    train = seq.build(segs, tok.encode, sp, kind).tokens
    np.testing.assert_array_equal(train[: len(prompt["tokens"])], prompt["tokens"])
    caption = seq.build(seq.i2t(ex.text), tok.encode, sp, "i2t").tokens
    assert not np.array_equal(caption[: len(prompt["tokens"])], prompt["tokens"])
    assert list(train[len(prompt["tokens"]) :][:4] - sp.pos0) == [56, 56, 168, 168]


def test_router_defaults_and_errors(pipe):
  assert router.default_scale("t2i") == "f3"
  assert router.default_scale("conditional", "inpaint") == "f0"
  assert router.default_scale("conditional", "canny") == "f1"
  assert router.choose("t2i", np.eye(5)[[4, 0]]) == ["f4", "f0"]
  with pytest.raises(ValueError, match="no default output scale for sequence kind 'chat'"):
    router.default_scale("chat")
  with pytest.raises(ValueError, match="no decoder for scale f0"):
    pipe.text_to_image(["x"], scales=("f0",))
  with pytest.raises(ValueError, match="unknown scale 'f7'"):
    pipe.text_to_image(["x"], scales=("f7",))
  with pytest.raises(ValueError, match="scale f2 .*num_tokens=4"):
    pipelines.PumaPipeline(
      pipe.model,
      encode=TOK.encode,
      decode=TOK.decode,
      special=TOK.special,
      decoders={"f2": pipe.decoders["f3"]},
    )


def unbuilt_pipeline(width=8):
  """A PumaPipeline whose model and decoders are stand-ins holding only their configs: every
  check below must refuse its input before anything is computed."""
  from types import SimpleNamespace as NS

  pipe = pipelines.PumaPipeline.__new__(pipelines.PumaPipeline)
  pipe.model = NS(config=NS(clip=NS(image_size=16), feature_dim=width))
  pipe.decoders = {"f3": NS(config=NS(mapping_dim=width, num_tokens=4))}
  pipe.vae, pipe.encode, pipe.special = object(), TOK.encode, TOK.special
  return pipe


def test_bad_inputs_are_refused_by_name():
  """Mismatched counts, empty or NaN inputs, no scales: a ValueError naming the input, not a
  silently shorter, repeated or black result."""
  pipe = unbuilt_pipeline()
  w = pipe.model.config.feature_dim
  cases = [
    (lambda: pipe.edit(images(2), ["make it blue"]), "2 image.*1 instructions"),
    (lambda: pipe.edit(images(1), ["a", "b"], scales=("f4",)), "1 image.*2 instructions"),
    (lambda: pipe.chat(images(1), ["a?", "b?"]), "1 image.*2 questions"),
    (lambda: pipe.ground(images(2), ["the circle"]), "2 image.*1 phrases"),
    (lambda: pipe.ground([], []), "images is empty"),
    (lambda: pipe.answer_boxes([{}], images(2)), "2 image.*1 prompts"),
    (lambda: pipe.text_to_image([], scales=("f4",)), "prompts is empty"),
    (lambda: pipe.text_to_image([3], scales=("f4",)), r"prompts\[0\] is a int"),
    (lambda: pipe.text_to_image(["x"], scales=()), r"scales=\(\) names no scale"),
    (lambda: pipe.edit(images(1), ["x"], scales=[]), r"scales=\(\) names no scale"),
    (
      lambda: pipe.conditional([np.zeros((0, 0, 3), np.uint8)], "canny"),
      r"images\[0\] is "
      "empty",
    ),
    (lambda: pipe.chat([np.zeros((0, 4, 3), np.uint8)], ["q"]), r"images\[0\] is empty"),
    (lambda: pipe.decode_features("f3", np.full((1, 4, w), np.nan)), "NaN or infinite"),
    (lambda: pipe.decode_features("f3", np.zeros((0, 4, w))), r"got \(0, 4"),
    (lambda: pipe.decode_features("f3", np.zeros((1, 1, w))), r"\(B >= 1, 4,"),
  ]
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      call()
  from PIL import Image

  with pytest.raises(ValueError, match="0x0"):
    pipe.pixels([Image.new("RGB", (0, 0))])
