"""Training and inference see the same sequences (issue 13's "a target shifted by one slot, a
mask that hides the wrong positions, generation feeding back something other than what training
taught": bugs that parity tests cannot catch).

On a tiny random PumaModel and held-out synthetic records, the per-token log-probabilities of an
answer / caption under the training path (the row `data.rows` builds, its uint8 images
normalized as `training.mllm` does, `losses.text_ce`) equal those of the inference path (the
prompt the pipeline builds, its images through `PumaPipeline.pixels`, prefilled into the KV cache,
then the answer teacher-forced one token at a time). For generated images, the features the
feature-generation loop emits are what the training forward predicts, slot by slot, when the
image slots hold those very features.

Every test runs with the byte tokenizer and a real BPE one (tests/text_tokenizers.py). With the
byte tokenizer `encode(a + b) == encode(a) + encode(b)` always, so a prompt that is not tokenized
as training tokenizes the same text cannot show; the tests marked "across a merge" choose texts
for which, with BPE, the text where the prompt stops and the text that follows it tokenize
differently joined than apart (asserted in the test).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax import sequence as seq
from puma_jax.data import parse, rows
from puma_jax.data import synthetic as S
from puma_jax.data.schema import Example
from puma_jax.inference import generation, pipelines, prompts, text
from puma_jax.models import clip as clip_lib, puma
from puma_jax.training import losses, mllm
from tests import text_tokenizers

SIZE = 32  # the tiny CLIP's input side (the demo's images)
SEQ_LEN = 896  # configs' tiny seq_len


@pytest.fixture(scope="module")
def model(tokenizer):
  return puma.PumaModel(text_tokenizers.puma_config(tokenizer), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def pipe(model, tokenizer):
  return pipelines.PumaPipeline(
    model, encode=tokenizer.encode, decode=tokenizer.decode, special=tokenizer.special
  )


def held_out(family: str, i: int = 0) -> dict:
  return S.SyntheticSource(family, "eval", image_size=SIZE, num_train=50, num_eval=8)[i]


def encoder(tok) -> rows.MLLMEncoder:
  return rows.MLLMEncoder(tok.encode, tok.special, SEQ_LEN, 2, SIZE)


def training_batch(row: dict) -> dict:
  """A one-row device batch as `training.mllm.train_step` sees it (images normalized)."""
  batch = {k: jnp.asarray(v)[None] for k, v in row.items() if k != "num_images"}
  batch["images"] = clip_lib.normalize_uint8(batch["images"])
  return batch


@functools.partial(jax.jit, static_argnames="graphdef")
def _training_ce(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  out = model(batch, logits=False)
  return losses.text_ce(model.llm.logits, out["hidden"], batch["text_target"], batch["text_mask"])


def training_logprobs(model, row: dict):
  """(log-probabilities, target ids) of the row's supervised text positions, in order."""
  ce = _training_ce(*nnx.split(model), training_batch(row))
  mask = np.asarray(row["text_mask"], bool)
  return -np.asarray(ce)[0][mask], np.asarray(row["text_target"])[mask]


@functools.partial(jax.jit, static_argnames="graphdef")
def _teacher_forced_logits(graphdef, state, arrays, images, answer):
  """The decode path of `inference.text._generate` (prefill into the cache, then one token
  per step), fed `answer` instead of its own samples."""
  model = nnx.merge(graphdef, state)
  llm, x = prompts.puma_inputs(model, arrays, images, None)
  cache = llm.init_cache(1, x.shape[1] + answer.shape[0])
  hidden, cache = llm.decode_embeddings(x, attention_mask=arrays["mask"], cache=cache)

  def step(cache, t):
    h, cache = llm.decode_embeddings(llm.embed(t[None, None]), cache=cache)
    return cache, llm.logits(h)[0, 0]

  _, rest = jax.lax.scan(step, cache, answer[:-1])
  return jnp.concatenate([llm.logits(hidden[:, -1:])[0], rest])


def inference_logprobs(model, prompt: dict, answer: list[int], pixels):
  """Log-probabilities of `answer` after `prompt` on the inference path, and its logits."""
  arrays, images, _ = prompts.prompt_arrays(model, [prompt], len(answer), images=pixels)
  ids = jnp.asarray(answer, jnp.int32)
  logits = _teacher_forced_logits(*nnx.split(model), jax.tree.map(jnp.asarray, arrays), images, ids)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return np.asarray(logp[jnp.arange(len(answer)), ids]), np.asarray(logits)


def parsed(family: str, rec: dict) -> Example:
  ex = parse.Parser(family, family, parse.ParseOptions())(rec)
  assert isinstance(ex, Example), ex
  return ex


def answer_ids(tok, text_: str) -> list[int]:
  return list(tok.encode(" " + text_)) + [tok.special.eos]


def test_chat_answer_logprobs_equal_and_every_answer_ends_in_eos(model, pipe, tokenizer):
  tok, sp = tokenizer, tokenizer.special
  # A two-question record: the first answer is what a one-question prompt must produce.
  rec = next(r for r in (held_out("chat", i) for i in range(8)) if len(r["conversations"]) == 4)
  ex = parsed("chat", rec)
  row = encoder(tok)(ex)
  got_train, targets = training_logprobs(model, row)
  q1, a1 = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
  q2, a2 = rec["conversations"][2]["value"], rec["conversations"][3]["value"]
  # Training supervises each answer followed by </s>, nothing else.
  assert list(targets) == answer_ids(tok, a1) + answer_ids(tok, a2)
  # The pipeline's prompt is the training row up to the first answer, token for token.
  prompt = seq.build_prompt(rows.chat_prompt(q1.replace("<image>\n", "")), tok.encode, sp)
  n = len(prompt["tokens"])
  np.testing.assert_array_equal(prompt["tokens"], row["tokens"][:n])
  np.testing.assert_array_equal(prompt["image_token"], row["image_token"][:n])
  first = answer_ids(tok, a1)
  got_inf, logits = inference_logprobs(model, prompt, first, pipe.pixels([rec["image"]]))
  np.testing.assert_allclose(got_inf, got_train[: len(first)], rtol=1e-4, atol=1e-5)
  # The decode function generation runs picks the same first token as these logits.
  out = text.generate_text(model, [prompt], 1, images=pipe.pixels([rec["image"]]))
  assert out[0][0] == int(np.argmax(logits[0]))
  # The second turn follows the first answer's </s> in the LLaVA-1.5 layout.
  words = tok.text(row["tokens"])  # special ids dropped
  assert f" ASSISTANT: {a1}USER: {q2} ASSISTANT: {a2}" in words


def test_later_turn_answer_logprobs_equal_across_a_merge(model, pipe, tokenizer):
  """A later question follows `USER: ` (its trailing space, then the question): with BPE,
  `USER: ` and a question that starts with a merged word tokenize differently joined. The
  prompt of the second answer, the training layout of the conversation so far
  (`rows.chat_segments`), is still the training row's prefix token for token, and the second
  answer's log-probabilities after it are training's."""
  tok, sp = tokenizer, tokenizer.special
  img = held_out("chat", 0)["image"]
  q1, a1 = "How many shapes are there?", "There are two."
  q2, a2 = "is the cat on the mat?", "It is a box."
  # " is" is one BPE token joined, "Ġ" then "is" apart; bytes are bytes either way.
  assert tok.merges_across("USER: ", q2) == (tok.name == "bpe")
  turns = [("human", "<image>\n" + q1), ("gpt", a1), ("human", q2), ("gpt", a2)]
  rec = {"image": img, "conversations": [{"from": f, "value": v} for f, v in turns]}
  ex = parsed("chat", rec)
  row = encoder(tok)(ex)
  got_train, targets = training_logprobs(model, row)
  second = answer_ids(tok, a2)
  assert list(targets) == answer_ids(tok, a1) + second
  prompt = seq.build_prompt(rows.chat_segments(ex.conversation[:3]), tok.encode, sp)
  # The prompt ends in the question as training lays it out: `USER: `, the question, apart.
  tail = [*tok.encode("USER: "), *tok.encode(q2), *tok.encode(" ASSISTANT:")]
  assert list(prompt["tokens"][-len(tail) :]) == tail
  n = len(prompt["tokens"])
  np.testing.assert_array_equal(prompt["tokens"], row["tokens"][:n])
  np.testing.assert_array_equal(prompt["image_token"], row["image_token"][:n])
  assert row["tokens"][n - len(tail) - 1] == sp.eos  # the first answer's </s>
  got_inf, _ = inference_logprobs(model, prompt, second, pipe.pixels([img]))
  np.testing.assert_allclose(got_inf, got_train[-len(second) :], rtol=1e-4, atol=1e-5)


def test_chat_prompt_strips_like_the_parser(tokenizer):
  tok, sp = tokenizer, tokenizer.special
  a = seq.build_prompt(rows.chat_prompt("  How many?\n"), tok.encode, sp)
  b = seq.build_prompt(rows.chat_prompt("How many?"), tok.encode, sp)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  after_image = b["tokens"][int(np.nonzero(b["tokens"] == sp.img_end)[0][-1]) + 1 :]
  assert tok.text(after_image) == "\nHow many? ASSISTANT:"


def test_caption_logprobs_equal(model, pipe, tokenizer):
  tok, sp = tokenizer, tokenizer.special
  rec = held_out("pairs", 1)
  ex = Example(kind="i2t", images=(rec["image"],), text=rec["caption"])
  got_train, targets = training_logprobs(model, encoder(tok)(ex))
  assert list(targets) == list(tok.encode(rec["caption"])) + [sp.eos]
  prompt = seq.build_prompt(seq.i2t(rec["caption"])[:1], tok.encode, sp)
  got_inf, _ = inference_logprobs(model, prompt, list(targets), pipe.pixels([rec["image"]]))
  np.testing.assert_allclose(got_inf, got_train, rtol=1e-4, atol=1e-5)


def test_grounding_box_and_caption_logprobs_equal_across_a_merge(model, pipe, tokenizer):
  """The grounding prompt (`sequence.grounding_prompt`, as `PumaPipeline.ground` and the
  synthetic evaluation ask) stops at the asked phrase's end; training goes on with its box,
  then the rest of the caption. Byte-level BPE merges only within a word and its leading
  space, so the phrase here ends in a space: joined, ` sat` is one BPE token, apart `Ġ` and
  `sat`. The prompt is the training row's prefix and the box and the rest of the caption get
  training's log-probabilities."""
  tok, sp = tokenizer, tokenizer.special
  img = held_out("grounding", 0)["image"]
  caption, end, box = "the cat sat on the mat", 8, [0.25, 0.5, 0.75, 1.0]
  phrase, rest = caption[:end], caption[end:]
  assert phrase == "the cat " and tok.merges_across(phrase, rest) == (tok.name == "bpe")
  ex = Example(
    kind="grounding",
    images=(img,),
    text=caption,
    phrases=((0, end),),
    boxes=np.array([box], np.float32),
  )
  row = encoder(tok)(ex)
  got_train, targets = training_logprobs(model, row)
  answer = [sp.pos0 + b for b in seq.box_to_bins(box)] + list(tok.encode(rest)) + [sp.eos]
  assert list(targets) == list(tok.encode(phrase)) + answer
  prompt = seq.build_prompt(seq.grounding_prompt(caption, [(0, end)]), tok.encode, sp)
  n = len(prompt["tokens"])
  assert list(prompt["tokens"][-len(tok.encode(phrase)) :]) == list(tok.encode(phrase))
  np.testing.assert_array_equal(prompt["tokens"], row["tokens"][:n])
  np.testing.assert_array_equal(prompt["image_token"], row["image_token"][:n])
  got_inf, _ = inference_logprobs(model, prompt, answer, pipe.pixels([img]))
  np.testing.assert_allclose(got_inf, got_train[-len(answer) :], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokenizer", ["byte"], indirect=True)  # no text: one tokenizer
def test_pipeline_pixels_are_the_training_normalization(model, pipe):
  img = held_out("pairs", 2)["image"]
  a = model.encode_images(pipe.pixels([img]))
  b = model.encode_images(clip_lib.normalize_uint8(jnp.asarray(img)[None, None]))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def generated_vs_training(model, tok, ex: Example, prompt: dict, source_pixels=None):
  """(generated features (341, F), training predictions at the generated image's slots fed
  those features (341, F), router logits of both) for one example whose last image is
  generated."""
  feats, router = generation.generate_features(model, [prompt], "f0", images=source_pixels)
  row = encoder(tok)(ex)
  batch = training_batch(row)
  own = model.encode_images(batch["images"])  # (1, M, 341, F): the input images' features
  gen_index = len(ex.images) - 1
  batch["image_features"] = own.at[0, gen_index].set(feats[0])
  out = model(batch, logits=False)
  slots = np.nonzero(np.asarray(row["image_index"]) == gen_index)[0]
  img = slots[0] - 1  # [IMG]: it predicts slot 0, slot j predicts slot j + 1
  assert row["tokens"][img] == tok.special.img_start
  pred = np.asarray(out["feature_pred"])[0, img : img + seq.IMAGE_TOKENS]
  # Those positions are exactly the ones the training loss supervises, each with the next slot.
  assert np.all(np.asarray(row["feature_weight"])[img : img + seq.IMAGE_TOKENS] > 0)
  assert np.sum(np.asarray(row["feature_weight"]) > 0) == seq.IMAGE_TOKENS
  routed = np.asarray(out["router_logits"])[0, img]
  return np.asarray(feats)[0], pred, np.asarray(router)[0], routed


def test_t2i_generation_feeds_back_what_training_predicts(model, tokenizer):
  tok = tokenizer
  rec = held_out("pairs", 0)
  ex = Example(kind="t2i", images=(rec["image"],), text=rec["caption"])
  prompt = seq.build_prompt(seq.t2i(rec["caption"])[:1], tok.encode, tok.special, open_image=True)
  gen, pred, r_gen, r_train = generated_vs_training(model, tok, ex, prompt)
  np.testing.assert_allclose(gen, pred, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(r_gen, r_train, rtol=1e-4, atol=1e-5)


def test_edit_generation_feeds_back_what_training_predicts(model, pipe, tokenizer):
  tok = tokenizer
  rec = held_out("edit", 1)
  ex = parsed("edit", rec)
  segs = seq.edit(rec["instruction"])[:2]
  prompt = seq.build_prompt(segs, tok.encode, tok.special, open_image=True)
  gen, pred, r_gen, r_train = generated_vs_training(
    model, tok, ex, prompt, pipe.pixels([rec["source"]])
  )
  np.testing.assert_allclose(gen, pred, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(r_gen, r_train, rtol=1e-4, atol=1e-5)


def test_stage_eval_step_sums_the_same_log_probabilities(model, tokenizer):
  """The stage's own eval step (training.mllm.eval_step: normalization, objective) adds up
  exactly the per-token losses compared above."""
  rec = held_out("pairs", 1)
  ex = Example(kind="i2t", images=(rec["image"],), text=rec["caption"])
  row = encoder(tokenizer)(ex)
  graphdef, frozen, params, rest = nnx.split(model, mllm.MLLMStage.frozen, nnx.Param, ...)
  batch = {k: jnp.asarray(v)[None] for k, v in row.items() if k != "num_images"}
  weights = {"text_weight": 1.0, "image_weight": 1.0, "router_weight": 0.0}
  sums = mllm.eval_step(params, frozen, rest, batch, graphdef=graphdef, weights=weights)
  logp, _ = training_logprobs(model, row)
  np.testing.assert_allclose(float(sums["text_ce_sum"]), -logp.sum(), rtol=1e-5)
