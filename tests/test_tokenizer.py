"""PUMA tokenizer: special tokens from local files, box tokens, growing the model's vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from puma_jax import tokenizer as ptok
from puma_jax.models import llama
from tests.llama_helpers import fwd
from tests.utils import rel_err

CORPUS = ["hello world, this is a tiny corpus", "the cat sat on the mat", "a box around a cat"]


def tiny_tokenizer_dir(path):
  """A byte-level BPE tokenizer with LLaMA's <s> </s> <unk>, saved as HF files in `path`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS * 10, trainer)
  PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
  ).save_pretrained(str(path))
  return path


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_dir):
  return ptok.PumaTokenizer.from_dir(bpe_tokenizer_dir)  # the session's (tests/conftest.py)


def test_special_tokens(tok):
  base = tok.vocab_size - len(ptok.PUMA_SPECIAL_TOKENS)
  assert tok.num_added == 226
  assert tok.img_start_id == base and tok.img_end_id == base + 1
  assert tok.pos_ids == tuple(range(base + 2, base + 226))
  # The tokens are single, unsplittable vocabulary entries ...
  assert [tok.token_id(t) for t in ("[IMG]", "[/IMG]", "<pos_17>")] == [
    tok.img_start_id,
    tok.img_end_id,
    tok.pos_ids[17],
  ]
  assert tok.decode([tok.img_start_id, tok.pos_ids[223]]) == "[IMG]<pos_223>"
  assert tok.encode("cat", bos=False, eos=True)[-1] == tok.eos_id
  # Adding again is a no-op: the ids stay where they are.
  assert ptok.add_special_tokens(tok.hf) == 0


def test_saved_tokenizer_reloads_with_same_ids(tok, tmp_path):
  tok.save(tmp_path)
  again = ptok.PumaTokenizer.from_dir(tmp_path)
  assert again.num_added == 0
  assert (again.img_start_id, again.pos_ids) == (tok.img_start_id, tok.pos_ids)


def test_box_tokens(tok):
  ids = tok.box_to_ids([0, 10, 223.9, 224], image_size=224)
  assert ids == [tok.pos_ids[0], tok.pos_ids[10], tok.pos_ids[223], tok.pos_ids[223]]
  box = tok.ids_to_box(tok.box_to_ids([0.1, 0.2, 0.5, 0.9]))
  assert np.allclose(box, [0.1, 0.2, 0.5, 0.9], atol=1 / 224)
  with pytest.raises(ValueError, match="outside the image"):
    tok.box_to_ids([0, 0, 300, 10], image_size=224)
  with pytest.raises(ValueError, match="4 position token ids"):
    tok.ids_to_box([tok.img_start_id] * 4)


def test_missing_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    ptok.PumaTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings(tok, tied):
  cfg = llama.tiny(vocab_size=300, tie_word_embeddings=tied)
  model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  grown = ptok.prepare(model, tok, pad_to_multiple_of=64)
  n = grown.config.vocab_size
  assert n % 64 == 0 and n >= tok.vocab_size and n - 64 < tok.vocab_size
  old_e = np.asarray(model.embed_tokens.embedding[...])
  new_e = np.asarray(grown.embed_tokens.embedding[...])
  np.testing.assert_array_equal(new_e[:300], old_e)
  np.testing.assert_allclose(
    new_e[300:], np.broadcast_to(old_e.mean(0), (n - 300, 64)), rtol=1e-6, atol=1e-7
  )
  ids = np.array([[1, 5, 9, 17]])
  before, after = fwd(model, ids), fwd(grown, ids)
  assert rel_err(after[..., :300], before) < 1e-6
  if not tied:
    # Mean columns of the output matrix: every new token scores the average old logit.
    np.testing.assert_allclose(
      after[..., 300:], np.repeat(before.mean(-1, keepdims=True), n - 300, -1), rtol=1e-4, atol=1e-5
    )
  new_ids = np.array([[tok.img_start_id, tok.pos_ids[-1]]])
  assert np.isfinite(fwd(grown, new_ids)).all()
  with pytest.raises(ValueError, match="smaller"):
    ptok.resize_token_embeddings(grown, 10)
  assert ptok.resize_token_embeddings(grown, n) is grown
  scanned = ptok.resize_token_embeddings(llama.set_scan_layers(model, True), 320)
  assert rel_err(fwd(scanned, ids)[..., :300], before) < 1e-5
  assert grown.embed_tokens.embedding.get_metadata()["logical_axes"] == ("vocab", "embed")
  assert after.shape == (1, 4, n)


@pytest.mark.parametrize(
  "text",
  ["a cat [IMG] on a mat", "<pos_5><pos_17> box", "end</s> more", "<s>again", "[/IMG]", "<unk>"],
)
def test_user_text_cannot_inject_special_tokens(tok, text):
  """... but user text naming them stays text: only the sequence builder inserts special ids."""
  from puma_jax import sequence

  special_ids = {
    tok.img_start_id,
    tok.img_end_id,
    tok.eos_id,
    tok.bos_id,
    *tok.pos_ids,
    tok.hf.unk_token_id,
  }
  ids = tok.encode(text, bos=False)
  assert not special_ids & set(ids), ids
  assert tok.decode(ids) == text  # nothing lost: the characters are all there
  encode, _, special = ptok.load(str(tok.hf.name_or_path))
  built = sequence.build(sequence.t2i(text), encode, special, "t2i")
  toks = [t for t, slot in zip(built.tokens, built.image_index) if slot < 0]  # not feature slots
  assert toks.count(special.img_start) == 1 and toks.count(special.img_end) == 1
  assert toks.count(special.eos) == 1 and toks[-1] == special.eos
  assert toks.count(special.bos) == 1 and toks[0] == special.bos
  assert not set(range(special.pos0, special.pos0 + 224)) & set(toks)
