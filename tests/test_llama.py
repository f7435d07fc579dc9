"""LLaMA: parity with transformers, conversion CLI and export, scan/remat, sharding, packing."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax import checkpoints, sharding
from puma_jax.convert import ConversionError, import_module
from puma_jax.convert import __main__ as convert_cli
from puma_jax.convert import export as export_cli
from puma_jax.models import llama
from tests.llama_helpers import CONFIGS, LLAMA3_ROPE, fwd, hf_logits, make_hf
from tests.utils import rel_err

IDS = np.random.RandomState(0).randint(0, 128, (2, 40))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> (torch model, HF dir, converted dir), built once per module."""
  out = {}
  for name, kw in CONFIGS.items():
    root = tmp_path_factory.mktemp(name)
    model = make_hf(root / "hf", **kw)
    assert convert_cli.main(["llama", f"--src={root / 'hf'}", f"--dst={root / 'ours'}"]) == 0
    out[name] = (model, root / "hf", root / "ours")
  return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logit_parity_cli(converted, name):
  torch_model, _, ours = converted[name]
  model = checkpoints.load_module(ours)
  ref = hf_logits(torch_model, IDS)
  out = fwd(model, IDS)
  assert out.dtype == np.float32 and out.shape == ref.shape
  assert rel_err(out, ref) < 1e-4
  scanned = llama.set_scan_layers(model, True)
  assert "layers" in nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  assert rel_err(fwd(scanned, IDS), ref) < 1e-4
  unscanned = llama.set_scan_layers(scanned, False)
  assert rel_err(fwd(unscanned, IDS), ref) < 1e-4


def test_config_fields_from_hf(converted):
  _, hf_dir, ours = converted["llama3_rope_mqa"]
  _, cfg = checkpoints.load_config(ours)
  assert (
    cfg.rope_type,
    cfg.rope_factor,
    cfg.rope_original_max_position_embeddings,
    cfg.num_key_value_heads,
    cfg.rope_theta,
  ) == ("llama3", 8.0, 32, 1, 500000.0)
  _, cfg = checkpoints.load_config(converted["tied_bias_headdim"][2])
  assert cfg.tie_word_embeddings and cfg.attention_bias and cfg.mlp_bias and cfg.head_dim == 24
  assert llama.LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_legacy_rope_scaling_config(tmp_path):
  """Pre-v5 config.json: `rope_theta` and `rope_scaling` with the old `type` key."""
  from puma_jax.convert.llama import config_from_hf

  legacy = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "rope_theta": 500000.0,
    "rope_scaling": {
      **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"},
      "type": "llama3",
    },
  }
  cfg = config_from_hf(legacy)
  assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0
  with pytest.raises(ConversionError, match="rope_type='yarn'"):
    config_from_hf({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_scan_remat_gradients_match(converted):
  """Scan + rematerialization changes the schedule, not the math: same loss and gradients."""
  _, hf_dir, _ = converted["gqa"]
  base, cfg = import_module("llama", hf_dir)
  full, _ = import_module("llama", hf_dir, config=cfg.replace(remat_policy="full"))
  dots, _ = import_module("llama", hf_dir, config=cfg.replace(remat_policy="dots"))
  variants = [base, llama.set_scan_layers(full, True), dots]

  def loss_and_grads(model):
    graphdef, params = nnx.split(model)

    def loss(p):
      logits = nnx.merge(graphdef, p)(IDS[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), IDS[:, 1:, None], -1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    grads = nnx.to_pure_dict(grads)
    if model.config.scan_layers:
      grads = llama.restack(grads, model.config.num_hidden_layers, to_scanned=False)
    return value, grads

  v0, g0 = loss_and_grads(variants[0])
  for m in variants[1:]:
    v, g = loss_and_grads(m)
    assert abs(float(v) - float(v0)) < 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      assert rel_err(a, b) < 1e-4


def test_embeddings_entry_points(converted):
  torch_model, _, ours = converted["gqa"]
  model = checkpoints.load_module(ours)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids):
    m = nnx.merge(graphdef, state)
    hidden, cache = m.decode_embeddings(m.embed(ids))
    assert cache is None
    return hidden, m.logits(hidden)

  hidden, logits = run(state, IDS)
  assert hidden.shape == (2, 40, 64) and logits.dtype == jnp.float32
  assert rel_err(logits, hf_logits(torch_model, IDS)) < 1e-4


def test_export_round_trip(converted, tmp_path):
  import transformers

  for name in ("gqa", "llama3_rope_mqa", "tied_bias_headdim"):
    torch_model, _, ours = converted[name]
    dst = tmp_path / name
    assert export_cli.main(["llama", f"--src={ours}", f"--dst={dst}"]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(dst).eval()
    assert rel_err(hf_logits(back, IDS), hf_logits(torch_model, IDS)) < 1e-5
    assert (
      back.config.rope_parameters["rope_type"] == torch_model.config.rope_parameters["rope_type"]
    )
  # Sharded, bfloat16 and from a scanned model: index file plus shards that HF reads back.
  model = llama.set_scan_layers(checkpoints.load_module(converted["gqa"][2]), True)
  from puma_jax.convert.llama import export_hf

  dst = export_hf(model, tmp_path / "sharded", dtype="bfloat16", max_shard_bytes=20_000)
  index = json.loads((dst / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  back = transformers.LlamaForCausalLM.from_pretrained(dst, dtype="float32").eval()
  assert rel_err(hf_logits(back, IDS), hf_logits(converted["gqa"][0], IDS)) < 3e-2


def test_sharded_source_checkpoint(converted, tmp_path):
  """A sharded HF checkpoint (index + shards) converts to the same weights."""
  torch_model, _, _ = converted["mha"]
  torch_model.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  model, _ = import_module("llama", tmp_path / "hf")
  assert rel_err(fwd(model, IDS), hf_logits(torch_model, IDS)) < 1e-4


def test_bf16_compute(tmp_path):
  """bf16 compute, float32 parameters, vs the float32 reference; HF's default init scale so
  activations have realistic magnitudes (bf16 error grows with them, for HF as much as us)."""
  import torch

  torch_model = make_hf(tmp_path / "hf", num_key_value_heads=2, initializer_range=0.02)
  assert convert_cli.main(["llama", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'o'}"]) == 0
  model = checkpoints.load_module(tmp_path / "o", dtype=jnp.bfloat16)
  assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
  out = fwd(model, IDS)
  ref = hf_logits(torch_model, IDS)
  assert out.dtype == np.float32
  err = rel_err(out, ref)
  hf_own = rel_err(hf_logits(torch_model.to(torch.bfloat16), IDS), ref)
  assert err < 1e-2 and err < 1.5 * hf_own


def test_llama3_8b_param_count():
  for scan in (False, True):
    abstract = nnx.eval_shape(
      lambda: llama.LlamaForCausalLM(llama.llama3_8b(scan_layers=scan), rngs=nnx.Rngs(0))
    )
    assert sharding.count_params(abstract) == 8_030_261_248


def test_sharded_forward_equals_unsharded(converted):
  _, _, ours = converted["gqa"]
  ref = fwd(checkpoints.load_module(ours), IDS)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  for scan in (False, True):
    model = checkpoints.load_module(ours, mesh=mesh)
    if scan:
      model = sharding.shard_module(llama.set_scan_layers(model, True), mesh)
    q = (
      model.layers[0].self_attn.q_proj.kernel if not scan else model.layers.self_attn.q_proj.kernel
    )
    want = ("fsdp", "tensor") if not scan else (None, "fsdp", "tensor")
    assert tuple(q[...].sharding.spec) == want
    graphdef, state = nnx.split(model)
    with sharding.use_mesh(mesh):
      ids = jax.device_put(IDS, sharding.batch_sharding(mesh, 2))
      out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
    assert rel_err(out, ref) < 1e-5


def test_packed_sequences_equal_separate_runs(converted):
  _, _, ours = converted["llama3_rope_mqa"]
  model = checkpoints.load_module(ours)
  a, b, c = IDS[0, :13], IDS[1, :20], IDS[1, 20:27]
  packed = np.zeros((1, 48), np.int64)
  seg = np.zeros((1, 48), np.int32)  # 0: padding at the end
  packed[0, :13], packed[0, 13:33], packed[0, 33:40] = a, b, c
  seg[0, :13], seg[0, 13:33], seg[0, 33:40] = 1, 2, 3
  out = fwd(model, packed, segment_ids=seg)
  for piece, lo in ((a, 0), (b, 13), (c, 33)):
    alone = fwd(model, piece[None])[0]
    assert rel_err(out[0, lo : lo + len(piece)], alone) < 1e-5


def test_padding_mask_matches_hf(converted):
  torch_model, _, ours = converted["gqa"]
  model = checkpoints.load_module(ours)
  mask = np.ones_like(IDS)
  mask[0, :7] = 0  # left padding
  ref = hf_logits(torch_model, IDS, mask)
  out = fwd(model, IDS, attention_mask=mask)
  assert rel_err(out[0, 7:], ref[0, 7:]) < 1e-4 and rel_err(out[1], ref[1]) < 1e-4


def test_bad_inputs(converted, tmp_path):
  _, hf_dir, ours = converted["gqa"]
  model = checkpoints.load_module(ours)
  with pytest.raises(ValueError, match="token_ids out of range.*vocab_size=128"):
    model(np.array([[1, 2, 128]]))
  with pytest.raises(ValueError, match="token_ids out of range"):
    model(np.array([[-1, 2]]))
  bad = tmp_path / "bad"
  shutil.copytree(hf_dir, bad)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
  with pytest.raises(ConversionError, match="num_key_value_heads=3"):
    import_module("llama", bad)
  assert convert_cli.main(["llama", f"--src={bad}", f"--dst={tmp_path / 'out'}"]) == 2
  with pytest.raises(ValueError, match="num_key_value_heads=3"):
    llama.tiny(num_attention_heads=4, num_key_value_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    llama.tiny(remat_policy="sometimes")
  (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
  with pytest.raises(ConversionError, match=r"lm_head.weight.*has shape \(128, 64\)"):
    import_module("llama", bad)


def test_tokenizer_files_travel(converted, tmp_path):
  from tests.test_tokenizer import tiny_tokenizer_dir

  _, hf_dir, _ = converted["gqa"]
  src = tmp_path / "hf"
  shutil.copytree(hf_dir, src)
  tiny_tokenizer_dir(src)
  assert convert_cli.main(["llama", f"--src={src}", f"--dst={tmp_path / 'ours'}"]) == 0
  assert (tmp_path / "ours" / "tokenizer.json").exists()
  assert export_cli.main(["llama", f"--src={tmp_path / 'ours'}", f"--dst={tmp_path / 'back'}"]) == 0
  assert (tmp_path / "back" / "tokenizer.json").exists()
