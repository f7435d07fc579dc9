"""Adversarial inputs to `convert` / `export`: each a one-line ConversionError naming the bad
thing, exit code 2 from the CLI, and nothing already saved changed."""

import json
import math
import os
import re
import shutil
import struct

import pytest
import torch
import transformers

from puma_jax.convert import ConversionError, core
from puma_jax.convert import clip as clip_convert
from puma_jax.convert import config_check
from puma_jax.convert import llama as llama_convert
from puma_jax.convert import unet as unet_convert
from puma_jax.convert import vae as vae_convert
from puma_jax.convert import vit as vit_convert
from puma_jax.convert.__main__ import main as convert_main
from puma_jax.models.clip import CLIPVisionConfig
from tests.utils import tree_digest

HF_CFG = dict(
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=1,
  num_attention_heads=2,
  image_size=16,
  patch_size=4,
)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_CFG)).eval()
  d = tmp_path_factory.mktemp("hf") / "hf"
  model.save_pretrained(d)
  return d, model


@pytest.fixture()
def src(hf_src, tmp_path):
  d = tmp_path / "src"
  shutil.copytree(hf_src[0], d)
  return d


def cli(src, dst, capsys, family="clip-vision"):
  code = convert_main([family, f"--src={src}", f"--dst={dst}"])
  err = capsys.readouterr().err.strip()
  return code, err


def assert_refused(src, dst, capsys, match, family="clip-vision"):
  """The CLI exits 2 with one line matching `match`; neither src nor dst changed."""
  before = tree_digest(src), tree_digest(dst)
  code, err = cli(src, dst, capsys, family)
  assert code == 2, err
  assert len(err.splitlines()) == 1, err
  assert re.search(match, err), err
  assert (tree_digest(src), tree_digest(dst)) == before
  siblings = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")]
  assert not siblings, siblings


def write_raw_safetensors(path, header, data: bytes):
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


# --- safetensors headers ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "header,match",
  [
    ([1, 2], "header is a JSON list, not an object"),
    (None, "header is a JSON NoneType, not an object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "tensor 'w': header entry lacks 'data_offsets'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, "tensor 'w': data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "tensor 'w': data_offsets"),
    ({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, "tensor 'w': shape"),
    ({"w": [1]}, "tensor 'w': header entry is a JSON list"),
    (
      {
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
      },
      "tensors 'v' .*and 'w' .*overlap|tensors 'w' .*and 'v' .*overlap",
    ),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "truncated.*tensor 'w'"),
  ],
)
def test_bad_safetensors_header(src, tmp_path, capsys, header, match):
  write_raw_safetensors(src / "model.safetensors", header, bytes(12))
  with pytest.raises(ConversionError, match=match):
    core.read_safetensors(src / "model.safetensors")
  assert_refused(src, tmp_path / "out", capsys, "model.safetensors")


def test_overlapping_offsets_are_refused_like_the_official_loader(tmp_path):
  header = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
  }
  write_raw_safetensors(tmp_path / "x.safetensors", header, bytes(8))
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  with pytest.raises(SafetensorError, match="invalid offset"):
    load_file(tmp_path / "x.safetensors")
  with pytest.raises(ConversionError, match="overlap"):
    core.read_safetensors(tmp_path / "x.safetensors")


# --- .bin and index files ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "payload,match",
  [
    ([torch.zeros(2)], "holds a list, not a state dict"),
    (torch.zeros(2), "holds a Tensor, not a state dict"),
    ({1: torch.zeros(2)}, "key 1 is a int"),
  ],
)
def test_bin_not_a_state_dict(src, tmp_path, capsys, payload, match):
  os.remove(src / "model.safetensors")
  torch.save(payload, src / "pytorch_model.bin")
  with pytest.raises(ConversionError, match=match):
    core.read_torch_bin(src / "pytorch_model.bin")
  assert_refused(src, tmp_path / "out", capsys, "pytorch_model.bin")


def _shard(src):
  os.rename(src / "model.safetensors", src / "model-00001-of-00001.safetensors")


@pytest.mark.parametrize(
  "index,match",
  [
    ([1, 2], "holds a JSON list, not an object"),
    ({"weight_map": []}, "index has no weight_map"),
    ({"weight_map": {"x": 3}}, r"weight_map\['x'\] is 3"),
    ({"weight_map": {"x": "../outside.safetensors"}}, "outside the source directory"),
    ({"weight_map": {"x": "/etc/passwd"}}, "outside the source directory"),
  ],
)
def test_bad_index(src, tmp_path, capsys, index, match):
  _shard(src)
  (src / "model.safetensors.index.json").write_text(json.dumps(index))
  (tmp_path / "outside.safetensors").write_bytes(b"should never be read")
  assert_refused(src, tmp_path / "out", capsys, match)


def test_index_symlink_escaping_src_is_refused(src, tmp_path, capsys):
  _shard(src)
  shutil.move(src / "model-00001-of-00001.safetensors", tmp_path / "real.safetensors")
  os.symlink(tmp_path / "real.safetensors", src / "model-00001-of-00001.safetensors")
  names = core.read_safetensors(tmp_path / "real.safetensors")
  (src / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in names}})
  )
  assert_refused(src, tmp_path / "out", capsys, "outside the source directory")


# --- config.json fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("num_attention_heads", 0, "num_attention_heads=0 .* must be a positive integer"),
    ("patch_size", 0, "patch_size=0 .* must be a positive integer"),
    ("hidden_size", "32", r"hidden_size='32' \(str\) must be of type int"),
    ("hidden_size", True, r"hidden_size=True \(bool\) must be of type int"),
    ("hidden_size", 32.5, r"hidden_size=32.5 \(float\) must be of type int"),
    ("layer_norm_eps", float("nan"), "layer_norm_eps=nan .* must be a finite number"),
    ("layer_norm_eps", -1e-5, "layer_norm_eps=-1e-05 .* must be a positive number"),
    ("hidden_act", ["gelu"], r"hidden_act=\['gelu'\] \(list\) must be of type str"),
  ],
)
def test_bad_config_field(src, tmp_path, capsys, field, value, match):
  cfg = json.loads((src / "config.json").read_text())
  cfg[field] = value
  (src / "config.json").write_text(json.dumps(cfg))  # NaN is written as the JSON token NaN
  with pytest.raises(ConversionError, match=match):
    clip_convert.load_config(src)
  assert_refused(src, tmp_path / "out", capsys, f"config.json: {field}=")


def test_config_json_list(src, tmp_path, capsys):
  (src / "config.json").write_text("[1, 2]")
  assert_refused(src, tmp_path / "out", capsys, "config.json: holds a JSON list, not an object")


@pytest.mark.parametrize(
  "module,hf,match",
  [
    (llama_convert, {"vocab_size": 0, "hidden_size": 8, "num_attention_heads": 2}, "vocab_size=0"),
    (
      llama_convert,
      {"vocab_size": 8, "hidden_size": "8", "num_attention_heads": 2},
      "hidden_size='8'",
    ),
    (
      llama_convert,
      {"vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2, "rope_theta": float("inf")},
      "rope_theta=inf",
    ),
    (
      llama_convert,
      {"vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2, "rms_norm_eps": float("nan")},
      "rms_norm_eps=nan",
    ),
    (llama_convert, {"vocab_size": 8, "rope_scaling": [1]}, "rope_scaling=.* is not an object"),
    (vit_convert, {"patch_size": 0}, "patch_size=0"),
    (vit_convert, {"image_size": [1, 2, 3]}, "image_size"),
    (vae_convert, {"block_out_channels": [0, 64]}, r"block_out_channels\[0\]=0"),
    (vae_convert, {"act_fn": 3}, "act_fn=3"),
    (unet_convert, {"norm_eps": float("nan")}, "norm_eps=nan"),
    (unet_convert, {"layers_per_block": "2"}, "layers_per_block='2'"),
  ],
)
def test_every_converter_checks_its_fields(module, hf, match):
  reader = getattr(module, "config_from_hf", None) or module.config_from_diffusers
  with pytest.raises(ConversionError, match=match):
    reader(hf, "config.json")


def test_checker_accepts_what_hf_writes():
  # JSON ints for floats, None for optional fields, lists for tuples: all fine.
  kw = config_check.check_fields(CLIPVisionConfig, {"layer_norm_eps": 1, "hidden_size": 8}, "c")
  assert kw == {"layer_norm_eps": 1.0, "hidden_size": 8}
  assert isinstance(kw["layer_norm_eps"], float)
  assert not math.isnan(kw["layer_norm_eps"])


# --- destinations -----------------------------------------------------------------------------


def test_dst_non_empty_is_refused(src, tmp_path, capsys):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "puma_config.json").write_text('{"mine": 1}')
  (dst / "tokenizer_config.json").write_text('{"user": "file"}')
  assert_refused(src, dst, capsys, "is not empty")


def test_dst_existing_file(src, tmp_path, capsys):
  (tmp_path / "out").write_text("a file")
  assert_refused(src, tmp_path / "out", capsys, "exists and is not a directory")


@pytest.mark.parametrize("where", ["same", "inside"])
def test_dst_equal_to_or_inside_src(src, capsys, where):
  dst = src if where == "same" else src / "converted"
  before = tree_digest(src)
  code, err = cli(src, dst, capsys)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert ("the same as" if where == "same" else "inside") in err
  assert tree_digest(src) == before and not (src / "converted").exists()


def test_dst_on_read_only_directory(src, tmp_path, capsys):
  if os.geteuid() == 0:  # root ignores permission bits: use a filesystem that refuses mkdir
    before = tree_digest(src)
    code, err = cli(src, "/sys/puma_convert_out", capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search("read-only|cannot create the output", err), err
    assert tree_digest(src) == before
    return
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    assert_refused(src, ro / "out", capsys, "read-only")
  finally:
    ro.chmod(0o755)


def test_empty_dst_is_filled_and_a_failure_leaves_nothing(src, tmp_path, capsys, monkeypatch):
  dst = tmp_path / "out"
  dst.mkdir()
  from puma_jax import checkpoints

  def broken_save(*a, **k):
    raise checkpoints.CheckpointError("disk full (simulated)")

  monkeypatch.setattr(checkpoints, "save_module", broken_save)
  code, err = cli(src, dst, capsys)
  assert code == 2 and "disk full" in err
  assert dst.is_dir() and not any(dst.iterdir())
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp sibling left
  monkeypatch.undo()
  assert cli(src, dst, capsys)[0] == 0
  assert (dst / "puma_config.json").exists() and (dst / "params").is_dir()


def test_export_never_writes_into_an_hf_directory(tmp_path, capsys):
  """An HF directory holding `.bin` weights: export into it is refused, its config.json kept."""
  from puma_jax.convert import export as export_cli
  from tests.llama_helpers import make_hf

  model = make_hf(
    tmp_path / "hf",
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
  )
  (tmp_path / "hf_bin").mkdir()
  shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "hf_bin")
  torch.save(model.state_dict(), tmp_path / "hf_bin" / "pytorch_model.bin")
  assert convert_main(["llama", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'ours'}"]) == 0
  capsys.readouterr()
  before = tree_digest(tmp_path / "hf_bin")
  code = export_cli.main(["llama", f"--src={tmp_path / 'ours'}", f"--dst={tmp_path / 'hf_bin'}"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and "is not empty" in err, err
  assert tree_digest(tmp_path / "hf_bin") == before
  # into the converted directory itself (its source): refused too
  code = export_cli.main(
    ["llama", f"--src={tmp_path / 'ours'}", f"--dst={tmp_path / 'ours' / 'hf'}"]
  )
  assert code == 2 and "inside --src" in capsys.readouterr().err
  # a new directory: written whole
  assert export_cli.main(["llama", f"--src={tmp_path / 'ours'}", f"--dst={tmp_path / 'new'}"]) == 0
  assert (tmp_path / "new" / "config.json").exists()
