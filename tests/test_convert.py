"""The conversion framework: source formats, strictness, clear errors, nothing lost."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from puma_jax import checkpoints
from puma_jax.convert import ConversionError, convert, core, import_module
from puma_jax.convert.__main__ import main as convert_main
from tests.utils import randomize_norms, rel_err

HF_CFG = dict(
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=2,
  image_size=16,
  patch_size=4,
)


@pytest.fixture()
def hf_dir(tmp_path):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_CFG)).eval()
  randomize_norms(model)
  model.save_pretrained(tmp_path / "hf")
  return tmp_path / "hf", model


def run_cli(src, dst, capsys):
  code = convert_main(["clip-vision", f"--src={src}", f"--dst={dst}"])
  return code, capsys.readouterr().err


def reference(model, seed=0):
  x = np.random.RandomState(seed).randn(1, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    return x, model(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()


def check_loads(dst, model):
  ours = checkpoints.load_module(dst)
  x, ref = reference(model)
  assert rel_err(ours(x), ref) < 1e-4


def rewrite_weights(src, fn):
  path = src / "model.safetensors"
  tensors = {k: np.array(v) for k, v in core.read_safetensors(path).items()}
  fn(tensors)
  core.write_safetensors(tensors, path)


def test_sharded_safetensors_with_index(hf_dir, tmp_path):
  src, model = hf_dir
  tensors = core.read_safetensors(src / "model.safetensors")
  names = sorted(tensors)
  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  shutil.copy(src / "config.json", shard_dir)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    fname = f"model-0000{i + 1}-of-00002.safetensors"
    core.write_safetensors({k: np.array(tensors[k]) for k in part}, shard_dir / fname)
    weight_map.update({k: fname for k in part})
  (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  convert("clip-vision", shard_dir, tmp_path / "out")
  check_loads(tmp_path / "out", model)


def test_pytorch_bin_read_with_weights_only(hf_dir, tmp_path):
  src, model = hf_dir
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shutil.copy(src / "config.json", bin_dir)
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  convert("clip-vision", bin_dir, tmp_path / "out")
  check_loads(tmp_path / "out", model)


def test_bin_with_pickled_object_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ("unpickled!",))

  torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="safely"):
    core.read_torch_bin(tmp_path / "pytorch_model.bin")


def test_bfloat16_safetensors_roundtrip(tmp_path):
  import ml_dtypes

  a = np.random.RandomState(0).randn(3, 5).astype(ml_dtypes.bfloat16)
  core.write_safetensors({"a": a, "b": np.arange(4, dtype=np.int64)}, tmp_path / "x.safetensors")
  back = core.read_safetensors(tmp_path / "x.safetensors")
  np.testing.assert_array_equal(np.asarray(back["a"], np.float32), np.asarray(a, np.float32))
  # interoperable with the reference implementation
  from safetensors.torch import load_file

  t = load_file(tmp_path / "x.safetensors")
  assert t["a"].dtype == torch.bfloat16 and t["b"].tolist() == [0, 1, 2, 3]


def test_missing_directory(tmp_path, capsys):
  code, err = run_cli(tmp_path / "nope", tmp_path / "out", capsys)
  assert code == 2 and "nope" in err and "does not exist" in err


def test_missing_tensor(hf_dir, tmp_path, capsys):
  src, _ = hf_dir
  rewrite_weights(src, lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
  code, err = run_cli(src, tmp_path / "out", capsys)
  assert code == 2
  assert "vision_model.encoder.layers.1.mlp.fc2.bias" in err and "missing" in err
  assert not (tmp_path / "out").exists()


def test_unexpected_tensor(hf_dir, tmp_path, capsys):
  src, _ = hf_dir
  rewrite_weights(
    src, lambda t: t.__setitem__("encoder.layers.0.extra_gate", np.zeros(3, np.float32))
  )
  code, err = run_cli(src, tmp_path / "out", capsys)
  assert code == 2 and "unexpected" in err and "extra_gate" in err


def test_wrong_shape(hf_dir, tmp_path, capsys):
  src, _ = hf_dir
  rewrite_weights(
    src, lambda t: t.__setitem__("encoder.layers.0.mlp.fc1.weight", np.zeros((48, 31), np.float32))
  )
  code, err = run_cli(src, tmp_path / "out", capsys)
  assert code == 2
  assert "encoder.layers.0.mlp.fc1.weight" in err and "(48, 31)" in err and "(32, 48)" in err


def test_layer_beyond_config(hf_dir, tmp_path, capsys):
  src, _ = hf_dir
  cfg = json.loads((src / "config.json").read_text())
  cfg["num_hidden_layers"] = 1
  (src / "config.json").write_text(json.dumps(cfg))
  code, err = run_cli(src, tmp_path / "out", capsys)
  assert code == 2 and "layers.1" in err and "does not have" in err


def test_truncated_safetensors(hf_dir, tmp_path, capsys):
  src, _ = hf_dir
  path = src / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 100])
  code, err = run_cli(src, tmp_path / "out", capsys)
  assert code == 2 and "truncated" in err and "model.safetensors" in err
  path.write_bytes(data[:5])
  code, err = run_cli(src, tmp_path / "out", capsys)
  assert code == 2 and "truncated" in err


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("hidden_act", "swiglu_xyz", "hidden_act"),
    ("patch_size", 5, "patch_size"),
    ("num_attention_heads", 5, "num_attention_heads"),
  ],
)
def test_unsupported_config_value(hf_dir, tmp_path, capsys, field, value, match):
  src, _ = hf_dir
  cfg = json.loads((src / "config.json").read_text())
  cfg[field] = value
  (src / "config.json").write_text(json.dumps(cfg))
  code, err = run_cli(src, tmp_path / "out", capsys)
  assert code == 2 and match in err and "config.json" in err


def test_existing_destination_is_not_overwritten(hf_dir, tmp_path, capsys):
  src, model = hf_dir
  dst = tmp_path / "out"
  assert run_cli(src, dst, capsys)[0] == 0
  before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
  code, err = run_cli(src, dst, capsys)
  assert code == 2 and "already" in err
  assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before
  check_loads(dst, model)


def test_load_module_errors(hf_dir, tmp_path):
  src, _ = hf_dir
  with pytest.raises(checkpoints.CheckpointError, match="not a directory"):
    checkpoints.load_module(tmp_path / "absent")
  dst = convert("clip-vision", src, tmp_path / "out")
  with pytest.raises(checkpoints.CheckpointError, match="holds a 'clip-vision' model"):
    checkpoints.load_module(dst, family="llama")
  info = json.loads((dst / checkpoints.CONFIG_FILE).read_text())
  info["config"]["intermediate_size"] = 50
  (dst / checkpoints.CONFIG_FILE).write_text(json.dumps(info))
  with pytest.raises(checkpoints.CheckpointError, match="fc1/kernel: stored"):
    checkpoints.load_module(dst)


def test_rules_work_in_both_directions(hf_dir):
  src, _ = hf_dir
  from puma_jax.convert import clip as clip_convert

  module, cfg = import_module("clip-vision", src)
  flat = checkpoints.param_arrays(module)
  back = core.map_to_source(flat, clip_convert.rules(cfg))
  original = clip_convert.read_tensors(src)
  assert set(back) == set(original)
  for k in original:
    np.testing.assert_array_equal(back[k], original[k])
