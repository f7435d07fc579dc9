"""`python -m puma_jax.convert puma-release`: a public-layout PUMA snapshot (diffusers classes,
random weights) -> a release whose decoders sample the same images as the PyTorch pipeline with
the same noise; diffusers' private config keys; bad input leaves no destination behind."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from puma_jax import checkpoints, reconstruct, release
from puma_jax import tokenizer as ptok
from puma_jax.convert import ConversionError, import_module
from puma_jax.convert import puma_decoder as cpd
from puma_jax.convert import vae as cvae
from puma_jax.convert.__main__ import main as convert_main
from puma_jax.diffusion import sampler as SM
from puma_jax.features import synthetic_image
from tests.utils import rel_err

import transformers

from tests import test_reconstruct_e2e as e2e

SDXL = "stable-diffusion-xl-base-1.0"
SCALES = {"f0": 256, "f2": 16}  # the snapshot's subset: unet_256 and unet_16


def _run(args):
  """convert_main(args) -> (exit code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = convert_main(["puma-release", *map(str, args)])
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
  """SNAP/stable-diffusion-xl-base-1.0/{unet_256, unet_16, vae} as published, plus a HF CLIP.
  unet_256's config.json is diffusers' `save_config`; unet_16's is `dict(unet.config)` dumped
  (it carries `_use_default_values`)."""
  tmp = tmp_path_factory.mktemp("snap")
  snap = tmp / "SNAP"
  tclip = e2e.torch_clip(seed=0)
  tclip.save_pretrained(tmp / "clip_hf")
  decoders = {}
  for scale, tokens in SCALES.items():
    unet, mapping, pos = e2e.torch_decoder(tokens, seed=10 * tokens)
    folder = e2e.save_public_decoder(unet, mapping, pos, snap / SDXL / f"unet_{tokens}")
    if tokens == 16:
      cfg = dict(unet.config)
      assert "_use_default_values" in cfg
      (folder / "config.json").write_text(json.dumps(cfg))
    decoders[scale] = (unet, mapping, pos)
  vae = e2e.torch_vae(seed=0)
  vae.save_pretrained(snap / SDXL / "vae")
  return {
    "snap": snap,
    "clip": tmp / "clip_hf",
    "tclip": tclip,
    "vae": vae,
    "decoders": decoders,
    "tmp": tmp,
  }


@pytest.fixture(scope="module")
def converted(snapshot):
  dst = snapshot["tmp"] / "R"
  code, out, err = _run([f"--src={snapshot['snap']}", f"--dst={dst}", f"--clip={snapshot['clip']}"])
  assert code == 0, err
  return dst, out


def test_release_layout(converted, snapshot):
  dst, out = converted
  rel = release.Release.open(dst)
  assert rel.name == "puma-public" and rel.scales == ("f0", "f2")
  assert sorted(rel.manifest["parts"]) == ["clip", "decoders", "vae"] and not rel.has("puma")
  assert rel.tokenizer == "byte"
  assert rel.image_size == 16 and rel.manifest["clip_image_size"] == 32  # 8 x VAE factor 2
  assert rel.manifest["parts"]["decoders"]["f0"]["source"].endswith(f"{SDXL}/unet_256")
  assert rel.manifest["parts"]["vae"]["source"].endswith(f"{SDXL}/vae")  # found by default
  for scale, tokens in SCALES.items():
    cfg = checkpoints.load_info(rel.decoder(scale))["config"]
    assert (cfg["num_tokens"], cfg["use_embeds"]) == (tokens, tokens == 256)
  # One progress line per part (2 decoders, vae, clip), then the summary.
  lines = out.strip().splitlines()
  assert [ln.split("]")[0] for ln in lines[:4]] == ["[1/4", "[2/4", "[3/4", "[4/4"]
  assert all("done in" in ln for ln in lines[:4]) and "decoders/f2" in lines[1]
  assert "scales f0, f2" in lines[4]
  # Built in a temporary sibling and renamed: nothing else is left next to it.
  assert sorted(p.name for p in dst.parent.iterdir()) == ["R", "SNAP", "clip_hf"]


@pytest.mark.parametrize("scale", ["f0", "f2"])
def test_converted_decoders_sample_like_pytorch(converted, snapshot, monkeypatch, scale):
  """The release's decoder + CLIP + VAE reconstruct the same images as the PyTorch pipeline
  (transformers CLIP, diffusers UNet + mapping layer (+ positional embedding), DDPM, VAE) fed
  the same initial latents and step noise."""
  rel = release.Release.open(converted[0])
  steps = 6
  rec = reconstruct.load(
    str(rel.decoder(scale)), str(rel.clip), str(rel.vae), scale, SM.SamplerSettings(num_steps=steps)
  )
  images = [synthetic_image(48, seed=i) for i in range(2)]
  ours = rec(images, seed=3)
  parts = (snapshot["tclip"], *snapshot["decoders"][scale], snapshot["vae"])
  ref = e2e.torch_pipeline(parts, images, scale, SM.sample_keys(3, 2), steps, 2.0, monkeypatch)
  err = rel_err(ours, ref)
  print(f"release {scale}: rel_err {err:.2e}")
  assert ours.shape == (2, 16, 16, 3) and err < 1e-3


def test_private_config_keys_are_metadata(snapshot):
  """Any `_`-key (as in `dict(unet.config)` and save_config's files) converts; an unknown
  public key still stops the conversion, naming it."""
  folder = snapshot["snap"] / SDXL / "unet_256"
  saved = json.loads((folder / "config.json").read_text())
  assert {"_class_name", "_diffusers_version"} <= set(saved)
  unet = snapshot["decoders"]["f0"][0]
  for cfg in (saved, dict(unet.config), {**saved, "_some_future_metadata": [1, 2]}):
    c = cpd.config_from_sources(cfg, {"embed_img_pos": (1, 256, e2e.CTX)}, folder)
    assert c.num_tokens == 256 and c.unet.cross_attention_dim == e2e.CTX
  with pytest.raises(ConversionError, match="bogus_field"):
    cpd.config_from_sources({**saved, "bogus_field": 1}, {}, folder)
  vcfg = dict(snapshot["vae"].config)
  assert "_use_default_values" in vcfg
  assert cvae.config_from_diffusers(vcfg).scaling_factor == pytest.approx(0.13025)
  with pytest.raises(ConversionError, match="bogus_field"):
    cvae.config_from_diffusers({**vcfg, "bogus_field": 1})


def _dir_state(path):
  return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def test_bad_input_exit_2_and_nothing_written(snapshot, tmp_path):
  snap, clip = snapshot["snap"], snapshot["clip"]
  code, _, err = _run([f"--dst={tmp_path / 'x'}"])
  assert code == 2 and "--src" in err
  code, _, err = _run([f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'x'}"])
  assert code == 2 and "nope" in err and not (tmp_path / "x").exists()
  code, _, err = _run([f"--src={clip}", f"--dst={tmp_path / 'x'}", f"--clip={clip}"])
  assert code == 2 and "unet_256" in err  # a folder without decoders
  code, _, err = _run([f"--src={snap}", f"--dst={tmp_path / 'x'}"])
  assert code == 2 and "--clip" in err  # no CLIP given or found

  # A non-empty destination is refused before any work and left as it was.
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  code, out, err = _run([f"--src={snap}", f"--dst={full}", f"--clip={clip}"])
  assert code == 2 and str(full) in err and "not empty" in err and out == ""
  assert _dir_state(full) == ["keep.txt"] and (full / "keep.txt").read_text() == "mine"

  # A decoder folder with a wrong tensor fails midway (after unet_256 converted): the message
  # names the folder and the tensor; no destination and no staging directory are left.
  from safetensors.numpy import load_file, save_file

  bad = tmp_path / "bad"
  shutil.copytree(snap, bad)
  wfile = bad / SDXL / "unet_16" / "diffusion_pytorch_model.safetensors"
  sd = load_file(str(wfile))
  sd["conv_in.weight"] = np.ascontiguousarray(sd["conv_in.weight"][:, :3])
  save_file(sd, str(wfile))
  before = _dir_state(tmp_path)
  code, out, err = _run([f"--src={bad}", f"--dst={tmp_path / 'R2'}", f"--clip={clip}"])
  assert code == 2 and "conv_in.weight" in err and "unet_16" in err, err
  assert "[1/4] decoders/f0" in out and "failed" in out
  assert _dir_state(tmp_path) == before  # no R2, no .R2.partial-*

  # An unknown public config key in a decoder's config.json: exit 2 naming it.
  cfg_path = bad / SDXL / "unet_16" / "config.json"
  shutil.copy(snap / SDXL / "unet_16" / "diffusion_pytorch_model.safetensors", wfile)
  cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "bogus_field": 3}))
  code, _, err = _run([f"--src={bad}", f"--dst={tmp_path / 'R3'}", f"--clip={clip}"])
  assert code == 2 and "bogus_field" in err and not (tmp_path / "R3").exists()


def test_llm_assembles_puma_and_tokenizer(snapshot, tmp_path):
  """--llm: puma/ (the CLIP and the LLaMA assembled) and tokenizer/ instead of clip/; the
  tokenizer gives PUMA's tokens the ids the model was built with."""
  from tests.llama_helpers import make_hf
  from tests.test_tokenizer import tiny_tokenizer_dir

  llm = tmp_path / "llama_hf"
  tok_dir = tiny_tokenizer_dir(tmp_path / "tok")
  n_vocab = len(transformers.AutoTokenizer.from_pretrained(str(tok_dir)))
  hf = make_hf(
    llm,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=n_vocab,
    max_position_embeddings=1024,
  )
  for f in tok_dir.iterdir():
    shutil.copy(f, llm / f.name)
  only16 = tmp_path / "snap16"
  shutil.copytree(snapshot["snap"] / SDXL / "unet_16", only16 / "unet_16")  # a subset, flat
  vae = tmp_path / "vae_conv"
  from puma_jax.convert import convert

  convert("vae", snapshot["snap"] / SDXL / "vae", vae)  # an already converted part is copied
  code, out, err = _run(
    [
      f"--src={only16}",
      f"--dst={tmp_path / 'R'}",
      f"--vae={vae}",
      f"--clip={snapshot['clip']}",
      f"--llm={llm}",
    ]
  )
  assert code == 0, err
  rel = release.Release.open(tmp_path / "R")
  assert rel.scales == ("f2",) and rel.has("puma") and not rel.has("clip")
  assert "(converted)" in rel.manifest["parts"]["vae"]["source"]
  assert rel.manifest["tokenizer"] == "tokenizer" and rel.manifest["clip_image_size"] == 32
  model = checkpoints.load_module(rel.puma, family="puma")
  assert model.config.img_start_id == n_vocab and model.config.pos0_id == n_vocab + 2
  _, _, special = ptok.load(rel.tokenizer)
  assert (special.img_start, special.img_end, special.pos0) == (n_vocab, n_vocab + 1, n_vocab + 2)
  clip_ref, _ = import_module("clip-vision", snapshot["clip"])
  ours, want = checkpoints.param_arrays(model.clip), checkpoints.param_arrays(clip_ref)
  assert ours.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(ours[k], want[k], err_msg=k)
  emb = np.asarray(model.llm.embed_tokens.embedding[...])
  np.testing.assert_array_equal(emb[:n_vocab], hf.model.embed_tokens.weight.detach().numpy())
  # A LLaMA without tokenizer files cannot make a usable release: exit 2, nothing written.
  for f in tok_dir.iterdir():
    (llm / f.name).unlink()
  code, _, err = _run(
    [
      f"--src={only16}",
      f"--dst={tmp_path / 'R4'}",
      f"--vae={vae}",
      f"--clip={snapshot['clip']}",
      f"--llm={llm}",
    ]
  )
  assert code == 2 and "tokenizer" in err and not (tmp_path / "R4").exists()
