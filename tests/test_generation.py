"""Text generation: HF `generate` parity, cache consistency, sampling, stop tokens, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from puma_jax.convert import import_module
from puma_jax.inference import generate_text
from puma_jax.inference import prompts, text
from puma_jax.models import llama
from tests.llama_helpers import make_hf
from tests.utils import rel_err

RS = np.random.RandomState(1)
PROMPTS = [RS.randint(3, 128, n).tolist() for n in (5, 11, 3, 8)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  hf = make_hf(root, num_key_value_heads=2)
  ours, _ = import_module("llama", root)
  return hf, ours


def left_pad(prompts, pad=0):
  p = max(map(len, prompts))
  ids = np.array([[pad] * (p - len(x)) + list(x) for x in prompts])
  mask = np.array([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
  return ids, mask


def hf_generate(hf, prompts, n, eos=None):
  ids, mask = left_pad(prompts)
  with torch.no_grad():
    out = hf.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=n,
      do_sample=False,
      eos_token_id=eos,
      pad_token_id=0,
    )
  return out[:, ids.shape[1] :].numpy()


def test_greedy_matches_hf_generate(models):
  hf, ours = models
  ref = hf_generate(hf, PROMPTS, 32)
  got = generate_text(ours, PROMPTS, 32, stop_tokens=())
  assert [len(g) for g in got] == [32] * len(PROMPTS)
  np.testing.assert_array_equal(np.array(got), ref)


def test_stop_tokens_match_hf(models):
  hf, ours = models
  free = generate_text(ours, PROMPTS, 24, stop_tokens=())
  stop = free[0][5]  # a token row 0 emits at step 5
  got = generate_text(ours, PROMPTS, 24, stop_tokens=[stop])
  ref = hf_generate(hf, PROMPTS, 24, eos=stop)
  for row, g, f in zip(ref, got, free):
    want = f[: f.index(stop) + 1] if stop in f else f
    assert g == want
    assert list(row[: len(g)]) == g  # HF pads after its eos; the prefix agrees
  assert got[0][-1] == stop and len(got[0]) <= 6


def uncached_greedy(model, prompts, n):
  """Reference without a cache: the whole sequence re-run each step (one fixed-size buffer,
  later slots masked, so it compiles once)."""
  ids, mask = left_pad(prompts)
  p = ids.shape[1]
  buf = np.zeros((len(prompts), p + n), np.int32)
  valid = np.zeros_like(buf)
  buf[:, :p], valid[:, :p] = ids, mask
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, attention_mask=m))
  for step in range(n):
    logits = np.asarray(f(state, buf, valid))
    buf[:, p + step] = logits[:, p + step - 1].argmax(-1)
    valid[:, p + step] = 1
  return buf[:, p:]


def test_cached_equals_uncached(models):
  _, ours = models
  got = generate_text(ours, PROMPTS, 12, stop_tokens=())
  np.testing.assert_array_equal(np.array(got), uncached_greedy(ours, PROMPTS, 12))


def test_prefill_and_decode_step_logits(models):
  """Step-by-step cached logits equal the full forward's logits at every position."""
  _, ours = models
  ids, mask = left_pad(PROMPTS)
  seq = np.concatenate([ids, RS.randint(3, 128, (len(PROMPTS), 4))], axis=1)
  full_mask = np.concatenate([mask, np.ones((len(PROMPTS), 4), int)], axis=1)
  graphdef, state = nnx.split(ours)
  full = np.asarray(
    jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, attention_mask=m))(state, seq, full_mask)
  )
  p = ids.shape[1]
  logits, cache = text.prefill(ours, ids, mask, slots=32)
  assert rel_err(logits, full[:, p - 1]) < 1e-5
  for j in range(4):
    logits, cache = text.decode_step(ours, seq[:, p + j], cache)
    assert rel_err(logits, full[:, p + j]) < 1e-5
  assert int(cache.index) == p + 4
  np.testing.assert_array_equal(np.asarray(cache.length), [len(x) + 4 for x in PROMPTS])


def test_padded_batch_inputs(models):
  _, ours = models
  want = generate_text(ours, PROMPTS, 6, stop_tokens=())
  ids, mask = left_pad(PROMPTS, pad=7)
  assert generate_text(ours, ids, 6, attention_mask=mask, stop_tokens=()) == want
  p = ids.shape[1]
  right = np.array([list(x) + [9] * (p - len(x)) for x in PROMPTS])
  rmask = np.array([[1] * len(x) + [0] * (p - len(x)) for x in PROMPTS])
  assert generate_text(ours, right, 6, attention_mask=rmask, stop_tokens=()) == want
  assert generate_text(ours, np.array(PROMPTS[1]), 6, stop_tokens=()) == [want[1]]


def test_scanned_model_generates_the_same(models):
  _, ours = models
  scanned = llama.set_scan_layers(ours, True)
  assert generate_text(scanned, PROMPTS, 8, stop_tokens=()) == generate_text(
    ours, PROMPTS, 8, stop_tokens=()
  )


def test_sampling_options(models):
  _, ours = models
  greedy = generate_text(ours, PROMPTS, 8, stop_tokens=())
  assert generate_text(ours, PROMPTS, 8, temperature=1.0, top_k=1, stop_tokens=()) == greedy
  assert generate_text(ours, PROMPTS, 8, temperature=1.0, top_p=1e-6, stop_tokens=()) == greedy
  a = generate_text(ours, PROMPTS, 8, temperature=1.5, seed=3, stop_tokens=())
  assert a == generate_text(ours, PROMPTS, 8, temperature=1.5, seed=3, stop_tokens=())
  assert a != generate_text(ours, PROMPTS, 8, temperature=1.5, seed=4, stop_tokens=())
  assert a != greedy


def test_sample_logits_distribution():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1, 0.0 + 1e-9]]))
  keys = jax.random.split(jax.random.key(0), 4000)

  @jax.jit
  def counts(temperature, top_k, top_p):
    draw = jax.vmap(
      lambda k: text.sample_logits(logits, k, text.Sampler(False, True), temperature, top_k, top_p)
    )
    return jnp.bincount(draw(keys).ravel(), length=5) / len(keys)

  def draw(temperature=1.0, top_k=0, top_p=1.0):
    return np.asarray(counts(temperature, top_k, top_p))

  np.testing.assert_allclose(draw(), [0.4, 0.3, 0.2, 0.1, 0.0], atol=0.03)
  np.testing.assert_allclose(draw(top_k=2), [4 / 7, 3 / 7, 0, 0, 0], atol=0.03)
  # Nucleus 0.5: 0.4 alone is short of it, so the second token joins; the rest are cut.
  np.testing.assert_allclose(draw(top_p=0.5), [4 / 7, 3 / 7, 0, 0, 0], atol=0.03)
  # top-k first, then the nucleus of the renormalized rest: {0.4, 0.3, 0.2} -> 0.44, 0.33.
  np.testing.assert_allclose(draw(top_k=3, top_p=0.5), [4 / 7, 3 / 7, 0, 0, 0], atol=0.03)
  np.testing.assert_allclose(draw(top_k=3, top_p=0.4), [1, 0, 0, 0, 0], atol=0.0)
  cold = draw(temperature=0.25)
  w = np.array([0.4, 0.3, 0.2, 0.1]) ** 4
  np.testing.assert_allclose(cold[:4], w / w.sum(), atol=0.03)


def test_no_recompile_within_bucket(models):
  _, ours = models
  generate_text(ours, [[5, 6, 7]], 10, stop_tokens=())
  n = text._generate._cache_size()
  generate_text(ours, [[5, 6, 7, 8, 9, 10]], 14, stop_tokens=())  # same (16, 16) bucket
  assert text._generate._cache_size() == n


def test_allowed_tokens_restrict_every_generated_token(models):
  _, ours = models
  allowed = list(range(40, 50))
  free = generate_text(ours, PROMPTS, 8, stop_tokens=())
  assert any(t not in allowed for row in free for t in row)  # unmasked, the model goes elsewhere
  got = generate_text(ours, PROMPTS, 8, stop_tokens=(), allowed_tokens=allowed)
  assert all(len(row) == 8 and set(row) <= set(allowed) for row in got)
  # greedy under the mask is the argmax over the allowed tokens, not just any allowed token
  ids, mask = left_pad(PROMPTS)
  last, _ = text.prefill(ours, ids, mask, slots=32)
  want = np.asarray(allowed)[np.asarray(last)[:, allowed].argmax(-1)]
  np.testing.assert_array_equal([row[0] for row in got], want)
  # sampling: top-k applies to the allowed tokens only (k=1 is the masked greedy)
  hot = generate_text(
    ours, PROMPTS, 8, temperature=2.0, seed=1, stop_tokens=(), allowed_tokens=allowed
  )
  assert all(set(row) <= set(allowed) for row in hot) and hot != got
  k1 = generate_text(
    ours, PROMPTS, 8, temperature=1.0, top_k=1, stop_tokens=(), allowed_tokens=allowed
  )
  assert k1 == got
  # another mask is a traced value: no recompilation
  n = text._generate._cache_size()
  other = generate_text(ours, PROMPTS, 8, stop_tokens=(), allowed_tokens=[7, 8])
  assert text._generate._cache_size() == n and all(set(row) <= {7, 8} for row in other)
  with pytest.raises(ValueError, match="allowed_tokens is empty"):
    generate_text(ours, PROMPTS, 4, allowed_tokens=[])
  with pytest.raises(ValueError, match="allowed_tokens out of range.*vocab_size=128"):
    generate_text(ours, PROMPTS, 4, allowed_tokens=[3, 128])


def test_bad_generation_inputs(models):
  _, ours = models
  with pytest.raises(ValueError, match="longer than the context.*max_position_embeddings=128"):
    generate_text(ours, [[5] * 129], 4)
  with pytest.raises(ValueError, match="exceeds the context"):
    generate_text(ours, [[5] * 100], 40)
  with pytest.raises(ValueError, match="prompt 1: token ids out of range.*vocab_size=128"):
    generate_text(ours, [[3, 4], [5, 300]], 4)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    generate_text(ours, [[]], 4)
  with pytest.raises(ValueError, match="top_p"):
    generate_text(ours, [[3]], 4, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="attention_mask shape"):
    generate_text(ours, np.ones((2, 4), int), 4, attention_mask=np.ones((2, 3)))
  with pytest.raises(ValueError, match="images/features are for a PumaModel"):
    generate_text(ours, [[3]], 4, images=np.zeros((1, 1, 8, 8, 3)))


def test_left_pad_aligns_rows_at_the_right():
  out = prompts.left_pad(
    [{"tokens": [1, 2, 3], "image_index": [-1, 0, 0]}, {"tokens": [4], "image_index": [-1]}],
    fill={"image_index": -1},
  )
  assert out["tokens"].shape == (2, 16) and out["tokens"].dtype == np.int32
  np.testing.assert_array_equal(out["tokens"][:, -3:], [[1, 2, 3], [0, 0, 4]])
  np.testing.assert_array_equal(out["image_index"][0, -4:], [-1, -1, 0, 0])
  np.testing.assert_array_equal(out["mask"].sum(1), [3, 1])
  assert out["mask"][1, -1] and not out["mask"][1, -2]
  with pytest.raises(ValueError, match="no prompts"):
    prompts.left_pad([])


def test_sharded_generation_equals_unsharded(models):
  """Parameters sharded fsdp x tensor over 8 fake devices (stacked layers): same tokens."""
  from puma_jax import sharding

  _, ours = models
  want = generate_text(ours, PROMPTS, 6, stop_tokens=())
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  sharded = sharding.shard_module(llama.set_scan_layers(ours, True), mesh)
  assert len(sharded.layers.mlp.up_proj.kernel[...].sharding.device_set) == 8
  with sharding.use_mesh(mesh):
    assert generate_text(sharded, PROMPTS, 6, stop_tokens=()) == want
