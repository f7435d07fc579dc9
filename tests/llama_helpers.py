"""Tiny HF LLaMA checkpoints shared by the LLaMA, generation and tokenizer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.utils import randomize_norms

LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 32,
}

# name -> HF LlamaConfig overrides; together they cover GQA, MHA, MQA, llama3 scaling, tied
# embeddings, biases and an explicit head_dim.
CONFIGS = {
  "gqa": dict(num_key_value_heads=2),
  "mha": dict(num_key_value_heads=4, rope_theta=500.0),
  "llama3_rope_mqa": dict(
    num_key_value_heads=1, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE)
  ),
  "tied_bias_headdim": dict(
    num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=24
  ),
}


def hf_config(**kw):
  import transformers

  base = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
  )
  base.update(kw)
  return transformers.LlamaConfig(**base)


def make_hf(path: Path, seed: int = 0, **kw):
  """A random HF LlamaForCausalLM (norms randomized, biases random) saved to `path`."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(hf_config(**kw)).eval()
  randomize_norms(model, seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
  model.save_pretrained(path)
  return model


def hf_logits(model, ids, attention_mask=None) -> np.ndarray:
  import torch

  with torch.no_grad():
    am = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
    return model(torch.tensor(np.asarray(ids)), attention_mask=am).logits.float().numpy()


def fwd(model, ids, **kw) -> np.ndarray:
  """`model(ids, **kw)` under one jit (eager op-by-op dispatch is slow on a loaded CPU)."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(model)
  model.check_ids(np.asarray(ids))
  out = jax.jit(lambda s, x, kw: nnx.merge(graphdef, s)(x, **kw))(state, np.asarray(ids), kw)
  return np.asarray(out)
