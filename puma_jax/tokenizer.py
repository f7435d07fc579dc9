"""PUMA's tokenizer: a local HF LLaMA tokenizer plus PUMA's special tokens.

Added (as special, unsplittable tokens): `[IMG]`, `[/IMG]` (around each image's 341 feature
slots) and 224 grounding position tokens `<pos_0>` .. `<pos_223>`, one per pixel row/column of
the 224x224 encoder input, for boxes written `[x_min, y_min, x_max, y_max]`.

The model's embedding and output matrices must grow to match: `resize_token_embeddings` gives
the new rows the mean of the old ones (a neutral start: the new tokens' initial logits equal the
average logit, instead of random spikes that random rows would produce).

Only local files are read (`local_files_only=True`); nothing is fetched from the hub.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax import sharding
from puma_jax.sequence import NUM_POSITION_TOKENS, SpecialTokens

IMG_START = "[IMG]"
IMG_END = "[/IMG]"
NUM_POS_TOKENS = 224


def pos_token(i: int) -> str:
  if not 0 <= i < NUM_POS_TOKENS:
    raise ValueError(f"position token index {i} outside [0, {NUM_POS_TOKENS})")
  return f"<pos_{i}>"


PUMA_SPECIAL_TOKENS: tuple[str, ...] = (IMG_START, IMG_END) + tuple(
  pos_token(i) for i in range(NUM_POS_TOKENS)
)


class ByteTokenizer:
  """A byte-level tokenizer for the tiny configs and the synthetic data (no files needed).

  ids: 0 pad, 1 <s>, 2 </s>, 3 [IMG], 4 [/IMG], 5..260 bytes, 261..484 grounding positions.
  Real runs use the LLaMA tokenizer with PUMA's tokens added (puma_jax.tokenizer).
  """

  BYTE0 = 5
  vocab_size = 5 + 256 + NUM_POSITION_TOKENS

  def __init__(self):
    self.special = SpecialTokens(bos=1, eos=2, pad=0, img_start=3, img_end=4, pos0=self.BYTE0 + 256)

  def encode(self, text: str) -> list[int]:
    return [self.BYTE0 + b for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(
      int(i) - self.BYTE0 for i in ids if self.BYTE0 <= int(i) < self.BYTE0 + 256
    ).decode("utf-8", errors="replace")


def load(name: str):
  """(encode, decode, SpecialTokens) for a tokenizer name: "byte" or a tokenizer directory."""
  if name == "byte":
    tok = ByteTokenizer()
    return tok.encode, tok.decode, tok.special
  tok = PumaTokenizer.from_dir(name)
  pos = tok.pos_ids
  if list(pos) != list(range(pos[0], pos[0] + len(pos))):
    raise ValueError(f"tokenizer {name}: the 224 position tokens must have consecutive ids")
  pad = tok.hf.pad_token_id if tok.hf.pad_token_id is not None else tok.eos_id
  special = SpecialTokens(
    bos=tok.bos_id,
    eos=tok.eos_id,
    pad=pad,
    img_start=tok.img_start_id,
    img_end=tok.img_end_id,
    pos0=pos[0],
  )
  return (lambda s: tok.encode(s, bos=False)), tok.decode, special


class PumaTokenizer:
  """Wraps an HF tokenizer (fast or slow) that holds PUMA's special tokens."""

  def __init__(self, hf_tokenizer, add_puma_tokens: bool = True):
    self.hf = hf_tokenizer
    if add_puma_tokens:
      self.num_added = add_special_tokens(hf_tokenizer)
    missing = [t for t in PUMA_SPECIAL_TOKENS if t not in hf_tokenizer.get_vocab()]
    if missing:
      raise ValueError(
        f"tokenizer lacks PUMA token(s) {missing[:4]} (build it with add_puma_tokens=True)"
      )
    self.img_start_id = self.token_id(IMG_START)
    self.img_end_id = self.token_id(IMG_END)
    self.pos_ids: tuple[int, ...] = tuple(
      self.token_id(pos_token(i)) for i in range(NUM_POS_TOKENS)
    )
    self._pos_index = {t: i for i, t in enumerate(self.pos_ids)}

  @classmethod
  def from_dir(cls, path: str | os.PathLike, add_puma_tokens: bool = True) -> PumaTokenizer:
    """Loads the tokenizer files of a local HF (or converted puma_jax) directory."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
      raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any(
      (path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
      raise FileNotFoundError(
        f"{path} holds no tokenizer files (tokenizer.json, "
        "tokenizer.model or tokenizer_config.json)"
      )
    return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True), add_puma_tokens)

  def save(self, dst: str | os.PathLike) -> None:
    self.hf.save_pretrained(str(dst))

  # -- ids -----------------------------------------------------------------------------------

  def token_id(self, token: str) -> int:
    i = self.hf.convert_tokens_to_ids(token)
    if i is None or (i == self.hf.unk_token_id and token != self.hf.unk_token):
      raise KeyError(f"token {token!r} is not in the vocabulary")
    return int(i)

  def __len__(self) -> int:
    return len(self.hf)

  @property
  def vocab_size(self) -> int:
    """Number of ids the model must embed (base vocabulary plus added tokens)."""
    return len(self.hf)

  @property
  def bos_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def eos_id(self) -> int | None:
    return self.hf.eos_token_id

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of `text`; `<s>` first when `bos` (added once, whether or not the tokenizer's
    own post-processor adds it) and `</s>` last when `eos`.

    `text` is user text (captions, prompts, answers): special-token strings in it (`[IMG]`,
    `<pos_5>`, `</s>`) are split into ordinary tokens, so a user's words can neither open an
    image slot nor end the sequence. Special ids come only from the sequence builder."""
    if not isinstance(text, str):
      raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
    ids = list(self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if eos and self.eos_id is not None:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  # -- grounding boxes -------------------------------------------------------------------------

  def box_to_ids(
    self, box: Sequence[float], image_size: float | Sequence[float] = 1.0
  ) -> list[int]:
    """[x_min, y_min, x_max, y_max] in pixels of an image of `image_size` (w, h) -> 4 position
    token ids (coordinates quantized to 224 bins; default: coordinates already in [0, 1])."""
    if len(box) != 4:
      raise ValueError(f"box must be [x_min, y_min, x_max, y_max]; got {list(box)}")
    w, h = (image_size, image_size) if np.isscalar(image_size) else image_size
    norm = np.asarray(box, np.float64) / np.asarray([w, h, w, h], np.float64)
    if np.any(norm < 0) or np.any(norm > 1):
      raise ValueError(f"box {list(box)} lies outside the image of size {(w, h)}")
    bins = np.minimum((norm * NUM_POS_TOKENS).astype(int), NUM_POS_TOKENS - 1)
    return [self.pos_ids[b] for b in bins]

  def ids_to_box(
    self, ids: Sequence[int], image_size: float | Sequence[float] = 1.0
  ) -> list[float]:
    """Inverse of `box_to_ids` (bin centers)."""
    if len(ids) != 4 or any(i not in self._pos_index for i in ids):
      raise ValueError(f"expected 4 position token ids, got {list(ids)}")
    w, h = (image_size, image_size) if np.isscalar(image_size) else image_size
    centers = [(self._pos_index[i] + 0.5) / NUM_POS_TOKENS for i in ids]
    return [centers[0] * w, centers[1] * h, centers[2] * w, centers[3] * h]


def add_special_tokens(hf_tokenizer) -> int:
  """Adds PUMA's tokens (unsplittable, not normalized) to an HF tokenizer; returns how many
  were new (0 when it already has them)."""
  from transformers import AddedToken

  vocab = hf_tokenizer.get_vocab()
  new = [
    AddedToken(t, special=True, normalized=False, single_word=False)
    for t in PUMA_SPECIAL_TOKENS
    if t not in vocab
  ]
  return int(hf_tokenizer.add_tokens(new, special_tokens=True)) if new else 0


def resize_token_embeddings(model, vocab_size: int, *, pad_to_multiple_of: int | None = None):
  """A copy of a LLaMA `model` whose input embedding and output matrices have `vocab_size` rows
  (rounded up to `pad_to_multiple_of`); new rows are the mean of the old rows. Shrinking is
  refused (it would silently drop trained tokens)."""
  from puma_jax.models.llama import LlamaForCausalLM

  cfg = model.config
  if pad_to_multiple_of:
    vocab_size = -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of
  old = cfg.vocab_size
  if vocab_size < old:
    raise ValueError(
      f"resize_token_embeddings: vocab_size={vocab_size} is smaller than the model's {old}"
    )
  if vocab_size == old:
    return model
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grow = lambda w, axis: jnp.concatenate(
    [
      w,
      jnp.repeat(
        w.mean(axis=axis, keepdims=True, dtype=jnp.float32).astype(w.dtype),
        vocab_size - old,
        axis=axis,
      ),
    ],
    axis=axis,
  )
  params["embed_tokens"]["embedding"] = grow(params["embed_tokens"]["embedding"], 0)
  if not cfg.tie_word_embeddings:
    params["lm_head"]["kernel"] = grow(params["lm_head"]["kernel"], 1)
  new_cfg = cfg.replace(vocab_size=vocab_size)
  param_dtype = params["embed_tokens"]["embedding"].dtype
  abstract = nnx.eval_shape(
    lambda: LlamaForCausalLM(new_cfg, dtype=model.dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  )
  return sharding.materialize(abstract, params)


def prepare(model, tokenizer: PumaTokenizer, *, pad_to_multiple_of: int | None = None):
  """Grows `model` to cover every id of `tokenizer` (no-op when it already does)."""
  if tokenizer.vocab_size <= model.config.vocab_size:
    return model
  return resize_token_embeddings(model, tokenizer.vocab_size, pad_to_multiple_of=pad_to_multiple_of)
