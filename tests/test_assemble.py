"""Assembling a PumaModel from converted CLIP and LLaMA checkpoints (CLI), vocabulary growth."""

import numpy as np
import torch
import transformers

from puma_jax.assemble import main as assemble_main
from puma_jax.convert import convert
from puma_jax import checkpoints
from puma_jax import tokenizer as ptok
from tests.test_tokenizer import tiny_tokenizer_dir
from tests.utils import randomize_norms


def test_assemble_from_converted_parts(tmp_path):
  torch.manual_seed(0)
  clip_hf = transformers.CLIPVisionModel(
    transformers.CLIPVisionConfig(
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=32,
      patch_size=2,
    )
  ).eval()
  randomize_norms(clip_hf)
  clip_hf.save_pretrained(tmp_path / "clip_hf")
  llama_hf = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=300,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=1024,
    )
  ).eval()
  llama_hf.save_pretrained(tmp_path / "llama_hf")
  convert("clip-vision", tmp_path / "clip_hf", tmp_path / "clip")
  convert("llama", tmp_path / "llama_hf", tmp_path / "llama")
  assert (
    assemble_main(
      [
        f"--clip={tmp_path / 'clip'}",
        f"--llm={tmp_path / 'llama'}",
        f"--dst={tmp_path / 'puma'}",
        "--router",
      ]
    )
    == 0
  )
  model = checkpoints.load_module(tmp_path / "puma", family="puma")
  c = model.config
  assert c.llm.vocab_size == 300 + 226 and c.img_start_id == 300 and c.pos0_id == 302
  emb = np.asarray(model.llm.embed_tokens.embedding[...])
  ref = llama_hf.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(emb[:300], ref)
  # float32 means of 300 rows: rounding is relative to the rows' size, not the (small) mean's
  np.testing.assert_allclose(
    emb[300:], np.broadcast_to(ref.mean(0), (226, 32)), rtol=1e-6, atol=1e-6 * np.abs(ref).max()
  )
  head = np.asarray(model.llm.lm_head.kernel[...])
  np.testing.assert_allclose(head[:, :300], llama_hf.lm_head.weight.detach().numpy().T)
  q = np.asarray(model.clip.encoder.layers[0].self_attn.q_proj.kernel[...])
  np.testing.assert_array_equal(
    q, clip_hf.state_dict()["encoder.layers.0.self_attn.q_proj.weight"].numpy().T
  )
  # refuses to overwrite, with a clear error
  assert (
    assemble_main(
      [f"--clip={tmp_path / 'clip'}", f"--llm={tmp_path / 'llama'}", f"--dst={tmp_path / 'puma'}"]
    )
    == 2
  )
  # --tokenizer stores the tokenizer beside the weights when its PUMA ids match the model's
  tok_dir = tiny_tokenizer_dir(tmp_path / "tok")  # 300 tokens, like the LLaMA above
  assert (
    assemble_main(
      [
        f"--clip={tmp_path / 'clip'}",
        f"--llm={tmp_path / 'llama'}",
        f"--dst={tmp_path / 'puma_tok'}",
        f"--tokenizer={tok_dir}",
      ]
    )
    == 0
  )
  _, _, special = ptok.load(str(tmp_path / "puma_tok"))
  assert (special.img_start, special.pos0) == (c.img_start_id, c.pos0_id)


def test_assemble_tokenizer_with_other_ids(tmp_path, capsys):
  llama_hf = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=301,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      max_position_embeddings=1024,
    )
  ).eval()
  llama_hf.save_pretrained(tmp_path / "llama_hf")
  clip_hf = transformers.CLIPVisionModel(
    transformers.CLIPVisionConfig(
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=32,
      patch_size=2,
    )
  ).eval()
  clip_hf.save_pretrained(tmp_path / "clip_hf")
  convert("clip-vision", tmp_path / "clip_hf", tmp_path / "clip")
  convert("llama", tmp_path / "llama_hf", tmp_path / "llama")
  args = [
    f"--clip={tmp_path / 'clip'}",
    f"--llm={tmp_path / 'llama'}",
    f"--dst={tmp_path / 'puma'}",
  ]
  assert assemble_main(args + [f"--tokenizer={tiny_tokenizer_dir(tmp_path / 'tok')}"]) == 2
  assert "img_start_id: tokenizer 300, model 301" in capsys.readouterr().err
  assert assemble_main(args + [f"--tokenizer={tmp_path / 'missing'}"]) == 2
  assert "does not exist" in capsys.readouterr().err
