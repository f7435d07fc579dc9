"""The KV cache is updated in place while decoding: the same tokens as the old copying scheme,
and no whole-cache copy or concatenation inside the compiled decode loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax.models import llama


def decode_fn(graphdef, batch, slots, steps):
  def gen(state, tokens):
    m = nnx.merge(graphdef, state)
    logits, cache = m(tokens, cache=m.init_cache(batch, slots))

    def body(_, carry):
      prev, cache, out = carry
      logits, cache = m(prev[:, None], cache=cache)
      nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
      return nxt, cache, out + logits[:, -1].sum()

    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (first, cache, jnp.float32(0)))

  return gen


@pytest.mark.parametrize("scan", [False, True])
def test_inplace_cache_matches_copy_and_copies_nothing_in_the_loop(scan, monkeypatch):
  cfg = llama.tiny(num_hidden_layers=3, scan_layers=scan)
  model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 256, (4, 5)), jnp.int32)
  res, hlo = {}, {}
  for mode in ("copy", "inplace"):
    monkeypatch.setattr(llama, "CACHE_UPDATE", mode)
    f = jax.jit(decode_fn(graphdef, 4, 16, 6))
    res[mode] = f(state, tokens)
    hlo[mode] = f.lower(state, tokens).compile().as_text()
  np.testing.assert_array_equal(res["copy"][1].k, res["inplace"][1].k)
  np.testing.assert_allclose(float(res["copy"][2]), float(res["inplace"][2]), rtol=1e-6)

  shape = re.escape(f"f32[3,4,16,{cfg.num_key_value_heads},{cfg.head_dim}]")
  # (the zero-filled initial cache is a broadcast + copy in the entry computation)
  whole = re.compile(shape + r"\{[^}]*\} (copy|concatenate)\(")

  def in_loop(text):
    """Whole-cache copies outside the entry computation (i.e. in loop bodies)."""
    comp, hits = None, 0
    for ln in text.splitlines():
      if ln and not ln.startswith(" ") and "{" in ln:
        comp = "ENTRY" if ln.startswith("ENTRY") else ln.split()[0]
      if comp != "ENTRY" and whole.search(ln):
        hits += 1
    return hits

  assert in_loop(hlo["inplace"]) == 0
  assert in_loop(hlo["copy"]) > 0  # the check sees the old scheme's copies
