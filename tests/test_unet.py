"""SDXL UNet: parity with diffusers' UNet2DConditionModel, conversion, sharding, bad input."""

from __future__ import annotations

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from puma_jax import checkpoints, sharding
from puma_jax.convert import ConversionError, core, import_module
from puma_jax.convert import unet as unet_convert
from puma_jax.convert.__main__ import main as convert_main
from puma_jax.models import unet
from tests import unet_ref
from tests.utils import rel_err

_CACHE: dict = {}


def converted(name, tmp_path_factory):
  """(torch model, converted dir) per config, built once per session."""
  if name not in _CACHE:
    kw = unet_ref.CONFIGS[name]
    # The seed is the config's place in CONFIGS, not the cache size: a config's weights do not
    # depend on which tests ran before (or alone).
    model = unet_ref.torch_unet(kw, seed=sorted(unet_ref.CONFIGS).index(name))
    base = tmp_path_factory.mktemp(name)
    model.save_pretrained(base / "src")
    assert convert_main(["sdxl-unet", f"--src={base / 'src'}", f"--dst={base / 'dst'}"]) == 0
    _CACHE[name] = (model, base)
  return _CACHE[name]


@pytest.mark.parametrize("name", sorted(unet_ref.CONFIGS))
def test_parity_float32(name, tmp_path_factory):
  model, base = converted(name, tmp_path_factory)
  kw = unet_ref.CONFIGS[name]
  # conv_proj_nomid: a scalar timestep (broadcast over the batch on both sides)
  x = unet_ref.inputs(kw, seed=1, scalar_t=name == "conv_proj_nomid")
  ref = unet_ref.torch_forward(model, x)
  jm = checkpoints.load_module(base / "dst", family="sdxl-unet")
  out = unet_ref.jit_forward(jm)(
    x["sample"], x["timesteps"], x["context"], **unet_ref.unet_kwargs(x)
  )
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  assert rel_err(out, ref) < 1e-4


def test_parity_bfloat16(tmp_path_factory):
  """bfloat16 compute against diffusers in float32.

  A whole UNet with random weights loses ~1-2% (max-abs error over max-abs output) in bfloat16;
  diffusers' own bfloat16 run does the same (1.1e-2 .. 1.8e-2 on these configs), so the max-abs
  bound is 2e-2, and both it and the RMS error are bounded relative to diffusers' own.
  """
  import torch

  model, base = converted("sdxl_like", tmp_path_factory)
  x = unet_ref.inputs(unet_ref.CONFIGS["sdxl_like"], seed=2)
  ref = unet_ref.torch_forward(model, x)
  jm = checkpoints.load_module(base / "dst", dtype=jnp.bfloat16)
  out = unet_ref.jit_forward(jm)(
    x["sample"], x["timesteps"], x["context"], **unet_ref.unet_kwargs(x)
  )
  assert out.dtype == jnp.float32
  err = rel_err(out, ref)
  torch_bf16 = unet_ref.torch_forward(copy.deepcopy(model).to(torch.bfloat16), x, torch.bfloat16)
  torch_err = rel_err(torch_bf16, ref)
  assert 1e-5 < err < 2e-2 and err < 2.5 * torch_err, (err, torch_err)
  assert unet_ref.rel_rms(out, ref) < 2.5 * unet_ref.rel_rms(torch_bf16, ref)


def test_export_table_round_trips(tmp_path_factory):
  """Our parameters mapped back through the table give diffusers' state dict exactly."""
  model, base = converted("asym_depth", tmp_path_factory)
  jm = checkpoints.load_module(base / "dst")
  cfg = unet_convert.load_config(base / "src")
  back = core.map_to_source(checkpoints.param_arrays(jm), unet_convert.rules(cfg))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_real_size_parameter_counts():
  count = lambda cfg: sharding.count_params(
    nnx.eval_shape(lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
  )
  assert count(unet.sdxl_unet_config()) == 2_567_463_684
  assert count(unet.sdxl_unet_config(addition_embed_type=None)) == 2_562_218_244


def test_sharded_forward_equals_unsharded():
  cfg = unet.tiny_config()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  build = lambda: unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(3))
  sharded = sharding.init_sharded(build, mesh)
  kernel = sharded.down_blocks[1].attentions[0].transformer_blocks[0].ff.proj.kernel[...]
  assert len(kernel.sharding.device_set) > 1  # really distributed
  kw = dict(unet_ref.CONFIGS["sdxl_like"])
  x = unet_ref.inputs(kw, batch=4, seed=4)
  ref = unet_ref.jit_forward(build())(
    x["sample"], x["timesteps"], x["context"], **unet_ref.unet_kwargs(x)
  )
  with sharding.use_mesh(mesh):
    xs = {k: jax.device_put(v, sharding.batch_sharding(mesh, np.ndim(v))) for k, v in x.items()}
    out = unet_ref.jit_forward(sharded)(
      xs["sample"], xs["timesteps"], xs["context"], **unet_ref.unet_kwargs(xs)
    )
  assert rel_err(out, ref) < 1e-5


def test_remat_same_gradients():
  cfg = unet.tiny_config(
    block_out_channels=(16, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    transformer_layers_per_block=2,
    attention_head_dim=2,
    sample_size=8,
  )
  x = unet_ref.inputs(dict(unet_ref.CONFIGS["sdxl_like"], sample_size=8), seed=5)

  def grads(remat):
    m = unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0), remat=remat)
    g, p = nnx.split(m, nnx.Param)
    loss = lambda p: jnp.mean(
      nnx.merge(g, p)(x["sample"], x["timesteps"], x["context"], **unet_ref.unet_kwargs(x)) ** 2
    )
    return jax.jit(jax.grad(loss))(p)

  a, b = grads(False), grads(True)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def tiny_model():
  return unet.UNet2DConditionModel(unet.tiny_config(), rngs=nnx.Rngs(0))


def test_bad_inputs(tiny_model):
  x = unet_ref.inputs(unet_ref.CONFIGS["sdxl_like"])
  call = lambda **kw: tiny_model(
    **{
      **dict(sample=x["sample"], timesteps=x["timesteps"], context=x["context"]),
      **unet_ref.unet_kwargs(x),
      **kw,
    }
  )
  with pytest.raises(ValueError, match="NCHW"):
    call(sample=x["sample"].transpose(0, 3, 1, 2))
  with pytest.raises(ValueError, match="cross_attention_dim=32"):
    call(context=x["context"][..., :16])
  with pytest.raises(ValueError, match="text_embeds"):
    call(text_embeds=None)
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
    call(time_ids=x["time_ids"][:, :5])
  with pytest.raises(ValueError, match="timesteps"):
    call(timesteps=np.zeros((3,), np.int32))


def test_bad_configs():
  with pytest.raises(ValueError, match="heads"):
    unet.tiny_config(attention_head_dim=(2, 5, 4))
  with pytest.raises(ValueError, match="up_block_types"):
    unet.tiny_config(up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
  with pytest.raises(ValueError, match="reverse_transformer_layers_per_block"):
    unet.tiny_config(transformer_layers_per_block=((1,), (1,), (2,)))
  with pytest.raises(ValueError, match="unknown field"):
    unet.UNetConfig.from_dict({"sample_size": 8, "class_embed_type": "timestep"})
  cfg = unet.tiny_config()
  assert unet.UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_conversion_errors(tmp_path_factory, tmp_path):
  model, base = converted("sdxl_like", tmp_path_factory)
  src = base / "src"
  # A missing tensor is named.
  bad = tmp_path / "missing"
  unet_ref.save_state_dict(model, bad, drop=("up_blocks.0.attentions.1.proj_out.bias",))
  with pytest.raises(ConversionError, match=r"up_blocks\.0\.attentions\.1\.proj_out\.bias"):
    import_module("sdxl-unet", bad)
  # An unsupported feature in config.json is named.
  cfgdir = tmp_path / "cfg"
  shutil.copytree(src, cfgdir)
  d = json.loads((cfgdir / "config.json").read_text())
  (cfgdir / "config.json").write_text(json.dumps({**d, "class_embed_type": "timestep"}))
  with pytest.raises(ConversionError, match="class_embed_type"):
    import_module("sdxl-unet", cfgdir)
  # The CLI reports it with exit status 2.
  assert convert_main(["sdxl-unet", f"--src={cfgdir}", f"--dst={tmp_path / 'out'}"]) == 2
  # A config that does not match the weights: the tensor and shapes are named.
  (cfgdir / "config.json").write_text(json.dumps({**d, "cross_attention_dim": 48}))
  with pytest.raises(ConversionError, match=r"attn2\.to_k\.weight.*needs \(48, 64\)"):
    import_module("sdxl-unet", cfgdir)


def test_fp16_variant_file_names(tmp_path_factory, tmp_path):
  model, base = converted("conv_proj_nomid", tmp_path_factory)
  variant = tmp_path / "unet"
  # A float16 copy: the session's reference model is shared with the parity tests, and
  # model.half(); model.float() would leave its weights rounded to float16.
  copy.deepcopy(model).half().save_pretrained(variant, variant="fp16")
  assert (variant / "diffusion_pytorch_model.fp16.safetensors").exists()
  jm, _ = import_module("sdxl-unet", variant)
  ref = checkpoints.param_arrays(checkpoints.load_module(base / "dst"))
  got = checkpoints.param_arrays(jm)
  assert sorted(got) == sorted(ref)
  assert max(rel_err(got[k], ref[k]) for k in ref) < 1e-3  # fp16 rounding only


def test_position_code_adds_a_place_to_every_transformer_token_and_no_parameter():
  """UNetConfig.position_code (ours, the demo decoders): the same parameters as SDXL's layout,
  a different function, and the code itself: one function of the place over the image at every
  resolution, entries of RMS 1/sqrt(2)."""
  from puma_jax.models import layers

  code = layers.grid_position_code(16, 16, 32)
  assert code.shape == (256, 32) and np.sqrt((code**2).mean()) == pytest.approx(0.5**0.5, rel=1e-3)
  assert np.allclose(code[0, :8], 0.0) and np.allclose(code[0, 8:16], 1.0)  # place (0, 0): y = 0
  # a 2x2 grid's top-left place sits at (3.5, 3.5) on the 16-cell grid: between cells 3 and 4
  y = layers.grid_position_code(2, 2, 32)[0, 0]
  assert y == pytest.approx(np.sin(3.5))
  with pytest.raises(ValueError, match="position_code='learned'"):
    unet.tiny_config(position_code="learned")

  def build(code):
    return unet.UNet2DConditionModel(
      unet.tiny_config(addition_embed_type=None, position_code=code), rngs=nnx.Rngs(0)
    )

  plain, placed = build("none"), build("sincos2d")
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(plain) == count(placed)
  nnx.update(placed, nnx.state(plain, nnx.Param))
  r = np.random.RandomState(0)
  x = jnp.asarray(r.randn(1, 16, 16, 4), jnp.float32)
  ctx = jnp.asarray(r.randn(1, 5, 32), jnp.float32)
  run = lambda m, x: np.asarray(m(x, jnp.asarray([500]), ctx))
  a, b = run(plain, x), run(placed, x)
  assert np.abs(a - b).max() > 1e-3
