"""The tokenizers the train/infer consistency, packing, pipeline and PumaModel tests run with.

`byte`: `ByteTokenizer`, one token per UTF-8 byte, so `encode(a + b) == encode(a) + encode(b)`
for any strings: a prompt/answer split that tokenizes differently from the joined text cannot
show with it. `bpe`: the tiny byte-level BPE tokenizer of `tests.test_tokenizer.
tiny_tokenizer_dir` (~300 tokens plus PUMA's 226), loaded as training and the pipelines load a
tokenizer directory (`puma_jax.tokenizer.load`: its pad is `</s>`, its special ids are not the
byte tokenizer's). The conftest's `tokenizer` fixture gives both, with ids `byte` and `bpe`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from puma_jax import sequence as seq
from puma_jax import tokenizer as ptok
from puma_jax.models import puma


@dataclasses.dataclass(frozen=True)
class Tok:
  name: str
  encode: Callable[[str], Sequence[int]]
  decode: Callable[[Sequence[int]], str]
  special: seq.SpecialTokens
  vocab_size: int  # ids the model must embed

  def text(self, ids) -> str:
    """The text of `ids` without the special ids ([IMG], [/IMG], <s>, </s>, pad at feature
    slots, positions) that the sequence builder inserts."""
    sp = self.special
    drop = {sp.bos, sp.eos, sp.pad, sp.img_start, sp.img_end, *sp.positions}
    return self.decode([int(i) for i in ids if int(i) not in drop])

  def merges_across(self, a: str, b: str) -> bool:
    """Whether `a + b` tokenizes differently from `a` then `b`: a merge across the boundary."""
    return list(self.encode(a + b)) != list(self.encode(a)) + list(self.encode(b))


def byte() -> Tok:
  t = ptok.ByteTokenizer()
  return Tok("byte", t.encode, t.decode, t.special, t.vocab_size)


def from_dir(path) -> Tok:
  encode, decode, special = ptok.load(str(path))
  return Tok("bpe", encode, decode, special, ptok.PumaTokenizer.from_dir(path).vocab_size)


def puma_config(tok: Tok, **kw) -> puma.PumaConfig:
  """`puma.tiny` for `tok`: its special ids, a vocabulary covering its ids rounded up to a
  multiple of 64 (the byte tokenizer's 485 ids give `puma.tiny`'s default 512)."""
  cfg = puma.tiny(vocab_size=-(-tok.vocab_size // 64) * 64, **kw)
  sp = tok.special
  return cfg.replace(
    llm=cfg.llm.replace(bos_token_id=sp.bos, eos_token_id=sp.eos),
    img_start_id=sp.img_start,
    img_end_id=sp.img_end,
    pos0_id=sp.pos0,
    pad_id=sp.pad,
  )
