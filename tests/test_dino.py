"""DINO ViT (HF ViTModel layout) vs transformers with random weights; the DINO score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from puma_jax import checkpoints, sharding
from puma_jax.convert import ConversionError, convert, import_module
from puma_jax.convert.core import write_safetensors
from puma_jax.evaluation import metrics
from puma_jax.models import vit
from tests.utils import rel_err, randomize_norms

MEAN = np.asarray(vit.IMAGENET_MEAN, np.float32)
STD = np.asarray(vit.IMAGENET_STD, np.float32)


def hf_model(pooler: bool, seed=0, **kw):
  torch.manual_seed(seed)
  cfg = transformers.ViTConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=40,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
    **kw,
  )
  model = transformers.ViTModel(cfg, add_pooling_layer=pooler).eval()
  randomize_norms(model, seed)
  return model


def hf_hidden(model, pixels):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state


@pytest.mark.parametrize("pooler", [False, True])
def test_vit_parity(tmp_path, pooler):
  hf = hf_model(pooler)
  hf.save_pretrained(tmp_path / "hf")  # hub layout: encoder.layer.N.attention.attention.query
  model = checkpoints.load_module(
    convert("dino-vit", tmp_path / "hf", tmp_path / "ours"), family="dino-vit"
  )
  assert model.config.layer_norm_eps == 1e-6
  pixels = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  graphdef, state = nnx.split(model)
  ours = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, pixels)
  ref = hf_hidden(hf, pixels).numpy()
  assert rel_err(ours, ref) < 1e-4
  if not pooler:  # bfloat16 compute (float32 parameters) against the float32 reference
    bf = checkpoints.load_module(tmp_path / "ours", dtype=jnp.bfloat16, family="dino-vit")
    g16, s16 = nnx.split(bf)
    out16 = jax.jit(lambda s, x: nnx.merge(g16, s)(x))(s16, pixels)
    assert out16.dtype == jnp.bfloat16
    assert rel_err(out16.astype(jnp.float32), ref) < 1e-2


def test_in_memory_layout(tmp_path):
  """transformers 5's module names (layers.N.attention.q_proj) convert to the same weights."""
  hf = hf_model(False, seed=3)
  hf.save_pretrained(tmp_path / "hub")
  (tmp_path / "mem").mkdir()
  (tmp_path / "mem" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
  write_safetensors(
    {k: v.numpy() for k, v in hf.state_dict().items()}, tmp_path / "mem" / "model.safetensors"
  )
  a = checkpoints.param_arrays(import_module("dino-vit", tmp_path / "hub")[0])
  b = checkpoints.param_arrays(import_module("dino-vit", tmp_path / "mem")[0])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_dino_score(tmp_path):
  hf = hf_model(False, seed=1)
  hf.save_pretrained(tmp_path / "hf")
  scorer = metrics.DINOScorer.load(convert("dino-vit", tmp_path / "hf", tmp_path / "ours"))
  rs = np.random.RandomState(1)
  gen = rs.uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
  ref = rs.uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
  fg = hf_hidden(hf, (gen - MEAN) / STD)[:, 0].numpy()
  fr = hf_hidden(hf, (ref - MEAN) / STD)[:, 0].numpy()
  want = (fg * fr).sum(-1) / np.linalg.norm(fg, axis=-1) / np.linalg.norm(fr, axis=-1)
  assert rel_err(scorer(gen, ref), want) < 1e-4
  assert rel_err(scorer.features(gen), fg) < 1e-4
  np.testing.assert_allclose(scorer(gen, gen), 1.0, rtol=1e-5)
  with pytest.raises(metrics.MetricInputError, match=r"references: values span"):
    scorer(gen, ref * 2 - 1)


def test_real_size_param_count():
  ours = nnx.eval_shape(lambda: vit.ViTModel(vit.dino_vits16(), rngs=nnx.Rngs(0)))
  assert sharding.count_params(ours) == 21_665_664
  cfg = transformers.ViTConfig(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    image_size=224,
    patch_size=16,
  )
  with torch.device("meta"):
    hf = transformers.ViTModel(cfg, add_pooling_layer=False)
  assert sum(p.numel() for p in hf.parameters()) == 21_665_664


def test_conversion_errors(tmp_path):
  hf = hf_model(False)
  hf.save_pretrained(tmp_path / "hf")
  cfg_path = tmp_path / "hf" / "config.json"
  import json

  cfg = json.loads(cfg_path.read_text())
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "model.safetensors").write_bytes(
    (tmp_path / "hf" / "model.safetensors").read_bytes()
  )
  (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
  with pytest.raises(ConversionError, match=r"parameter\(s\) not filled.*encoder\.layer\.2"):
    import_module("dino-vit", tmp_path / "bad")
  (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "mish"}))
  with pytest.raises(ConversionError, match="hidden_act='mish'"):
    import_module("dino-vit", tmp_path / "bad")
  with pytest.raises(metrics.MissingWeightsError, match="dino-vit"):
    metrics.DINOScorer.load(None)
  model = nnx.eval_shape(
    lambda: vit.ViTModel(
      vit.ViTConfig(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
      ),
      rngs=nnx.Rngs(0),
    )
  )
  with pytest.raises(ValueError, match="NCHW"):
    model.check_input(np.zeros((1, 3, 32, 32), np.float32))


def test_preprocessor_config_is_followed(tmp_path):
  """The checkpoint's preprocessor_config.json (resample, mean/std) drives the DINO inputs."""
  import json

  hf = hf_model(False, seed=2)
  hf.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "preprocessor_config.json").write_text(
    json.dumps(
      {
        "do_normalize": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "size": 32,
      }
    )
  )
  out = convert("dino-vit", tmp_path / "hf", tmp_path / "ours")
  assert (out / "preprocessor_config.json").exists()
  scorer = metrics.DINOScorer.load(out)
  assert scorer.preprocessing == {"method": "linear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
  x = np.random.RandomState(2).uniform(0, 1, (2, 48, 48, 3)).astype(np.float32)
  small = np.asarray(jax.image.resize(x, (2, 32, 32, 3), "linear", antialias=True))
  want = hf_hidden(hf, (small - 0.5) / 0.5)[:, 0].numpy()
  assert rel_err(scorer.features(x), want) < 1e-4
  (out / "preprocessor_config.json").write_text(json.dumps({"resample": 0}))
  with pytest.raises(metrics.MetricInputError, match="resample=0"):
    metrics.DINOScorer.load(out)
