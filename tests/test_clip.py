"""CLIP vision encoder: parity with transformers.CLIPVisionModel, scales, sizes, sharding."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from puma_jax import checkpoints, sharding
from puma_jax.convert import core
from puma_jax.convert import clip as clip_convert
from puma_jax.convert.__main__ import main as convert_main
from puma_jax.models import clip, pooling
from tests.utils import randomize_norms, rel_err

CONFIGS = {
  # name: HF CLIPVisionConfig kwargs (the 16x16 grid ones also exercise the five scales)
  "quick_gelu_grid16": dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=2,
    hidden_act="quick_gelu",
  ),
  "gelu_grid8": dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=3,
    image_size=40,
    patch_size=5,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
  ),
  "wide_heads_grid16": dict(
    hidden_size=96,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=8,
    image_size=64,
    patch_size=4,
    hidden_act="quick_gelu",
  ),
}


def make_hf(name, seed=0):
  torch.manual_seed(seed)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CONFIGS[name])).eval()
  randomize_norms(model, seed)
  return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> (hf model, converted dir), converted through the CLI."""
  out = {}
  for name in CONFIGS:
    base = tmp_path_factory.mktemp(name)
    hf = make_hf(name)
    hf.save_pretrained(base / "hf")
    assert convert_main(["clip-vision", f"--src={base / 'hf'}", f"--dst={base / 'ours'}"]) == 0
    out[name] = (hf, base / "ours")
  return out


def hf_forward(hf, x_nhwc):
  with torch.no_grad():
    o = hf(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  return o.last_hidden_state.numpy(), o.pooler_output.numpy()


def images_for(name, batch=2, seed=0):
  c = CONFIGS[name]
  return (
    np.random.RandomState(seed).randn(batch, c["image_size"], c["image_size"], 3).astype(np.float32)
  )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_float32(converted, name):
  hf, ours_dir = converted[name]
  model = checkpoints.load_module(ours_dir)
  x = images_for(name)
  ref_last, ref_pooled = hf_forward(hf, x)
  last = model(jnp.asarray(x))
  assert last.dtype == jnp.float32
  assert rel_err(last, ref_last) < 1e-4
  assert rel_err(model.pooled(last), ref_pooled) < 1e-4


@pytest.mark.parametrize("name", ["quick_gelu_grid16", "gelu_grid8"])
def test_parity_bfloat16(converted, name):
  hf, ours_dir = converted[name]
  model = checkpoints.load_module(ours_dir, dtype=jnp.bfloat16)
  x = images_for(name, seed=1)
  ref_last, _ = hf_forward(hf, x)
  last = model(jnp.asarray(x))
  assert last.dtype == jnp.bfloat16
  assert rel_err(np.asarray(last, np.float32), ref_last) < 1e-2
  # every parameter is still stored in float32
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


def test_scales_equal_torch_avg_pool(converted):
  hf, ours_dir = converted["quick_gelu_grid16"]
  model = checkpoints.load_module(ours_dir)
  x = images_for("quick_gelu_grid16", batch=3, seed=2)
  feats = pooling.multi_granular(clip.patch_features(model, jnp.asarray(x)))
  ref_last, _ = hf_forward(hf, x)
  grid = torch.from_numpy(ref_last[:, 1:]).reshape(3, 16, 16, -1).permute(0, 3, 1, 2)
  assert [f.shape[1] for f in feats] == [256, 64, 16, 4, 1]
  for f, tokens in zip(feats, pooling.SCALE_TOKENS):
    k = 16 // int(np.sqrt(tokens))
    ref = torch.nn.functional.avg_pool2d(grid, k, k).flatten(2).transpose(1, 2).numpy()
    assert rel_err(f, ref) < 1e-4


def test_cli_subprocess_and_full_clipmodel(tmp_path):
  """`python -m puma_jax.convert` on a full CLIPModel dir (text tower skipped explicitly)."""
  torch.manual_seed(3)
  vis = CONFIGS["gelu_grid8"]
  full = transformers.CLIPModel(
    transformers.CLIPConfig(
      vision_config=vis,
      projection_dim=16,
      text_config=dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=99,
      ),
    )
  ).eval()
  randomize_norms(full, 3)
  full.save_pretrained(tmp_path / "hf")
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "puma_jax.convert",
      "clip-vision",
      f"--src={tmp_path / 'hf'}",
      f"--dst={tmp_path / 'ours'}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr
  model = checkpoints.load_module(tmp_path / "ours", family="clip-vision")
  x = images_for("gelu_grid8", seed=4)
  with torch.no_grad():
    ref = full.vision_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  assert rel_err(model(jnp.asarray(x)), ref) < 1e-4


def test_sharded_equals_unsharded(converted):
  assert jax.device_count() == 8
  _, ours_dir = converted["wide_heads_grid16"]
  x = jnp.asarray(images_for("wide_heads_grid16", batch=4, seed=5))
  single = checkpoints.load_module(ours_dir)
  expected = np.asarray(single(x))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = checkpoints.load_module(ours_dir, mesh=mesh)
  kernel = model.encoder.layers[0].mlp.fc1.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  graphdef, state = nnx.split(model)
  with sharding.use_mesh(mesh):
    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, 4))
    out = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x_sharded)
  assert len(out.sharding.device_set) == 8
  assert rel_err(out, expected) < 1e-5


def test_sharded_init_materializes_sharded():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  cfg = clip.tiny()
  model = sharding.init_sharded(lambda: clip.CLIPVisionModel(cfg, rngs=nnx.Rngs(0)), mesh)
  k = model.encoder.layers[1].self_attn.q_proj.kernel[...]
  assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert k.addressable_shards[0].data.shape == (cfg.hidden_size // 4, cfg.hidden_size // 2)
  ref = clip.CLIPVisionModel(cfg, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(
    np.asarray(k), np.asarray(ref.encoder.layers[1].self_attn.q_proj.kernel[...])
  )


def test_real_size_vit_l14_eval_shape():
  """ViT-L/14 built abstractly: 303,179,776 parameters, tensor for tensor HF's shapes."""
  cfg = clip.vit_l14()
  abstract = nnx.eval_shape(lambda: clip.CLIPVisionModel(cfg, rngs=nnx.Rngs(0)))
  assert sharding.count_params(abstract) == 303_179_776
  with torch.device("meta"):
    hf = transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
      )
    )
  hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  assert sum(np.prod(s) for s in hf_shapes.values()) == 303_179_776
  # Every HF tensor (as zero-stride stand-ins) maps onto our parameters with matching shapes.
  stand_ins = {
    ("vision_model." + k if not k.startswith("vision_model.") else k): np.broadcast_to(
      np.zeros((), np.float32), s
    )
    for k, s in hf_shapes.items()
  }
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  targets = {k: (v.shape, np.float32) for k, v in core.flatten_state(params).items()}
  mapped = core.map_to_target(stand_ins, clip_convert.rules(cfg), targets)
  assert set(mapped) == set(targets)


def test_preprocess_pil_matches_public_transform():
  from PIL import Image

  rng = np.random.RandomState(0)
  img = rng.randint(0, 256, (300, 200, 3), np.uint8)
  x = clip.preprocess_pil([img, Image.fromarray(img)])
  assert x.shape == (2, 224, 224, 3) and x.dtype == np.float32
  # torchvision's Resize((224, 224), BILINEAR) on a PIL image is PIL's resize; ToTensor; Normalize
  ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), np.float32) / 255
  ref = (ref - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
  np.testing.assert_allclose(x[0], ref, atol=1e-6)
  np.testing.assert_array_equal(x[0], x[1])
  # the in-graph twin agrees up to PIL's 8-bit resampling
  y = clip.preprocess(jnp.asarray(img[None] / 255.0, jnp.float32))
  assert float(jnp.abs(y - x[:1]).mean()) < 0.02


@pytest.mark.parametrize(
  "shape,match",
  [
    ((2, 32, 32), "NHWC"),
    ((32, 32, 3), "add a batch axis"),
    ((2, 3, 32, 32), "looks NCHW"),
    ((2, 32, 32, 4), r"\(batch, 32, 32, 3\)"),
    ((2, 16, 16, 3), r"\(batch, 32, 32, 3\)"),
  ],
)
def test_bad_image_shapes(shape, match):
  model = clip.CLIPVisionModel(clip.tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    model(jnp.zeros(shape))


def test_bad_preprocess_inputs():
  with pytest.raises(ValueError, match="1, 3 or 4 channels"):
    clip.preprocess_pil([np.zeros((8, 8, 5), np.uint8)])
  with pytest.raises(ValueError, match="uint8"):
    clip.preprocess_pil([np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match="channels"):
    clip.preprocess(jnp.zeros((1, 8, 8, 2)))


def test_patch_features_uint8_in_chunks_equals_one_batch():
  model = clip.CLIPVisionModel(clip.tiny(), rngs=nnx.Rngs(0))
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  whole = np.asarray(clip.patch_features(model, clip.normalize_uint8(images)))
  chunked = clip.patch_features_uint8(model, images, chunk=2)  # 2 + 2 + 1
  assert isinstance(chunked, np.ndarray) and chunked.shape == (5, 256, 64)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="chunk=0"):
    clip.patch_features_uint8(model, images, chunk=0)
