"""puma_jax.tools.memory_plan: byte counts against hand computations, paper scale, CLI."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from configs import pretrain
from puma_jax.tools import memory_plan as mp

ROOT = Path(__file__).resolve().parents[1]
F32 = 4


def _tiny(remat="none", accum=1):
  c = pretrain.get_config("tiny")
  with c.unlocked():
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.model.llm.remat_policy = remat
    c.train.grad_accum_steps = accum
  return c


def _tiny_hand_elements(c):
  """Per-device parameter elements on an 8-way FSDP mesh, written out from the rules in
  docs/DEVELOPING.md: a dimension named `embed` (or `conv_in`) is split 8 ways when 8 divides
  it; `mlp`/`heads`/`vocab` go to the tensor axis (size 1 here); everything else replicates."""
  llm, clip = c.model.llm, c.model.clip
  d, v, f, n = llm.hidden_size, llm.vocab_size, llm.intermediate_size, llm.num_hidden_layers
  q = llm.num_attention_heads * llm.head_dim
  kv = llm.num_key_value_heads * llm.head_dim
  F = clip.hidden_size
  assert d % 8 == 0 and F % 8 == 0
  layer = 2 * d + (d * q + 2 * d * kv + q * d + 3 * d * f) // 8
  llm_total = v * d // 8 + d * v // 8 + d + n * layer
  projector = F * d // 8 + d + d * d // 8 + d // 8  # fc1 (embed, mlp), fc2 (mlp, embed)
  head = d * d // 8 + d + d * F // 8 + F // 8  # fc1 (embed, mlp), fc2 (mlp, embed)
  embeds = 5 * d // 8 + 256 * d // 8  # scale_embed, pos_embed (None, embed)
  router = d * 5 // 8 + 5
  trainable = llm_total + projector + head + embeds + router
  c_in, p = clip.num_channels, clip.patch_size  # conv_in = 3 channels: 8 does not divide
  ci, npos = clip.intermediate_size, (clip.image_size // p) ** 2 + 1
  clip_layer = 4 * F + 4 * F * F // 8 + 3 * F + F // 8 + F * ci // 8 + ci + ci * F // 8 + F // 8
  frozen = F // 8 + p * p * c_in * F + npos * F // 8 + clip.num_hidden_layers * clip_layer + 4 * F
  return trainable, frozen


def test_tiny_fsdp8_static_bytes_match_hand_computation():
  c = _tiny()
  plan = mp.make_plan(c, 8, 32, processes=1)
  assert plan.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  trainable, frozen = _tiny_hand_elements(c)
  assert plan.details["trainable_params"] == trainable * F32
  assert plan.rows["params"] == (trainable + frozen) * F32
  assert plan.rows["grads"] == trainable * F32
  # AdamW mu + nu for trainable parameters only, plus a few int32 step counters
  extra = plan.rows["optimizer"] - 2 * trainable * F32
  assert 0 < extra <= 16 * 4, extra
  # gradient accumulation keeps the accumulator and the microbatch gradient
  assert mp.make_plan(_tiny(accum=2), 8, 32, processes=2).rows["grads"] == 2 * trainable * F32


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_tiny_activation_bytes_match_formula(remat):
  c = _tiny(remat)
  plan = mp.make_plan(c, 8, 32, processes=2)  # global batch 16 -> 2 rows per device
  llm = c.model.llm
  d, f, hd, n, v = (
    llm.hidden_size,
    llm.intermediate_size,
    llm.head_dim,
    llm.num_hidden_layers,
    llm.vocab_size,
  )
  q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
  t = c.seq_len
  tokens = 2 * t
  s = llm.num_attention_heads * t
  b = 4  # tiny computes in float32
  per_layer = {
    "none": b * (4 * d + 2 * q + 2 * kv + 4 * f) + s * (5 + b),
    "full": b * d,
    "dots": b * (3 * d + 2 * q + 2 * kv + 2 * f) + 4 * s,
  }[remat]
  outside = b * (7 * d + 2 * c.model.clip.hidden_size)
  assert plan.details["tokens_per_device"] == tokens
  assert plan.rows["activations"] == tokens * (n * per_layer + outside)
  # chunked cross-entropy: one chunk's logits per row at a time, plus the sorted hidden copy
  chunk = c.loss.ce_chunk
  assert 0 < chunk < t
  assert plan.rows["logits"] == 2 * chunk * (8 + b) * v + tokens * b * d
  with c.unlocked():
    c.loss.ce_chunk = 0
  assert mp.make_plan(c, 8, 32, processes=2).rows["logits"] == tokens * (8 + b) * v


def test_tensor_axis_splits_activations_and_vocab():
  c = _tiny()
  with c.unlocked():
    c.mesh.fsdp, c.mesh.tensor = 4, 2
  plan = mp.make_plan(c, 8, 32, processes=1)
  assert plan.mesh == {"data": 1, "fsdp": 4, "tensor": 2}
  base = mp.make_plan(_tiny(), 8, 32, processes=1)
  # same global batch on 4 batch shards instead of 8: twice the tokens, half the vocabulary
  assert plan.details["tokens_per_device"] == 2 * base.details["tokens_per_device"]
  # the chunked cross-entropy's sorted hidden copy (d per token) is not split over `tensor`
  hidden = lambda p: p.details["tokens_per_device"] * F32 * c.model.llm.hidden_size
  assert plan.rows["logits"] - hidden(plan) == base.rows["logits"] - hidden(base)


@pytest.fixture(scope="module")
def paper_plan():
  """The paper's setup with "dots" remat and no accumulation (the shipped paper config uses
  the fix this plan recommends: full remat, 2 microbatches)."""
  c = pretrain.get_config("paper")
  with c.unlocked():
    c.train.grad_accum_steps = 1
    c.model.llm.remat_policy = "dots"
  return c, mp.make_plan(c, 256, 32)


def test_paper_256_parameter_bytes_are_ceil_divided(paper_plan):
  c, plan = paper_plan
  assert plan.mesh == {"data": 1, "fsdp": 256, "tensor": 1}
  assert plan.global_batch == 2048
  tensors = {t.path: t for t in plan.details["tensors"]}
  v, d = c.model.llm.vocab_size, c.model.llm.hidden_size
  emb = tensors["llm.embed_tokens.embedding"]
  assert emb.shape == (v, d)
  assert emb.bytes_per_device == v * math.ceil(d / 256) * F32
  # stacked (scanned) q_proj: (layers, embed, heads), only embed is FSDP-sharded
  qp = tensors["llm.layers.self_attn.q_proj.kernel"]
  n, h = c.model.llm.num_hidden_layers, c.model.llm.num_attention_heads * c.model.llm.head_dim
  assert qp.shape == (n, d, h) and qp.bytes_per_device == n * (d // 256) * h * F32
  total = sum(math.prod(t.shape) for t in tensors.values())
  assert total == plan.details["n_trainable"] + plan.details["n_frozen"]
  assert plan.rows["params"] == sum(t.bytes_per_device for t in tensors.values())

  # Recomputed from the specs: a dimension carrying `fsdp` is ceil-divided by 256, all else whole
  def by_hand(t):
    dims = [
      math.ceil(n / 256) if i < len(t.spec) and t.spec[i] == "fsdp" else n
      for i, n in enumerate(t.shape)
    ]
    return math.prod(dims) * F32

  assert all(t.bytes_per_device == by_hand(t) for t in tensors.values())
  replicated = sum(math.prod(t.shape) for t in tensors.values() if "fsdp" not in t.spec)
  assert plan.rows["params"] == pytest.approx(
    ((total - replicated) / 256 + replicated) * F32, rel=1e-3
  )
  assert total * F32 / 256 < plan.rows["params"] < 1.5 * total * F32 / 256
  assert plan.rows["optimizer"] >= 2 * plan.details["trainable_params"]
  assert plan.rows["optimizer"] < 2 * plan.details["trainable_params"] + 1024


def test_paper_verdict_and_fixes(paper_plan):
  c, plan = paper_plan
  assert not plan.fits  # 8 rows x 2048 tokens per V100 with dots remat: scores alone don't fit
  text = mp.verdict(c, plan)
  assert "DOES NOT FIT" in text and "--config.train.grad_accum_steps=" in text
  fixed = c.copy_and_resolve_references()
  with fixed.unlocked():
    fixed.train.grad_accum_steps = 2
    fixed.model.llm.remat_policy = "full"
  p2 = mp.make_plan(fixed, 256, 32, static=plan.details["static"])
  assert p2.fits and mp.verdict(fixed, p2).startswith("FITS")
  assert p2.rows["params"] == plan.rows["params"]
  assert p2.rows["activations"] < plan.rows["activations"] / 10
  shipped = pretrain.get_config("paper")
  assert mp.make_plan(shipped, 256, 32, static=plan.details["static"]).fits


def test_bad_mesh_errors():
  with pytest.raises(ValueError, match="does not divide --devices=255"):
    mp.resolve_mesh({"data": 2, "fsdp": -1, "tensor": 1}, 255)
  with pytest.raises(ValueError, match="needs 16 devices but --devices=8"):
    mp.resolve_mesh({"data": 2, "fsdp": 8, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="unknown axis"):
    mp.resolve_mesh({"model": 2}, 8)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    mp.make_plan(_tiny(accum=3), 8, 32, processes=1)


def test_cli_paper_prints_table_and_verdict():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "puma_jax.tools.memory_plan",
      "--config=configs/pretrain.py:paper",
      "--devices=256",
      "--device_memory_gb=32",
      "--config.train.grad_accum_steps=1",
      "--config.model.llm.remat_policy=dots",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  for word in (
    "params",
    "grads",
    "optimizer",
    "activations",
    "logits",
    "total",
    "DOES NOT FIT",
    "grad_accum_steps=",
  ):
    assert word in out.stdout, out.stdout
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "puma_jax.tools.memory_plan",
      "--config=configs/pretrain.py",
      "--devices=6",
      "--config.mesh.tensor=4",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert bad.returncode == 2 and "does not divide --devices=6" in bad.stderr, bad.stderr[-2000:]


def test_fitting_plan_names_the_cheapest_remat_that_fits(paper_plan):
  c, plan = paper_plan
  roomy = c.copy_and_resolve_references()
  with roomy.unlocked():
    roomy.train.grad_accum_steps = 2
    roomy.model.llm.remat_policy = "full"
  p80 = mp.make_plan(roomy, 256, 80, static=plan.details["static"])  # 80 GB cards
  best, bp = mp.cheapest_remat(roomy, p80)
  assert best != "full" and bp.fits
  assert mp.REMAT_ORDER.index(best) < mp.REMAT_ORDER.index("full")
  assert f"--config.model.llm.remat_policy={best}" in mp.verdict(roomy, p80)
  p32 = mp.make_plan(roomy, 256, 32, static=plan.details["static"])
  if mp.cheapest_remat(roomy, p32)[0] == "full":
    assert "'full' is the cheapest policy that fits" in mp.verdict(roomy, p32)
