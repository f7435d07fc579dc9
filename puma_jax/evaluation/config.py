"""The eval config shared by configs/eval/*.py (every field commented where it is set)."""

from __future__ import annotations

import ml_collections

from puma_jax.models import pooling


def base(protocol: str, variant: str) -> ml_collections.ConfigDict:
  """`variant`: "paper" (converted checkpoints, the paper's protocol), "tiny" (random-weight tiny
  PUMA built in-process; slow on CPU) or "toy" (a deterministic stand-in generator; seconds)."""
  if variant not in ("paper", "tiny", "toy"):
    raise ValueError(f"unknown eval variant {variant!r}; choose paper, tiny or toy")
  small = variant != "paper"
  c = ml_collections.ConfigDict()
  c.protocol = protocol  # reconstruction | text_to_image | editing | understanding
  c.seed = 0  # sampling seed (LPIPS_d uses seed and seed + 1)
  c.scales = tuple(pooling.SCALE_NAMES)  # scales generated and scored (f0 finest .. f4)
  c.image_size = 64 if small else 256  # compared images' side (PUMA paper, app. 8.1)
  c.batch_size = 4 if small else 16  # records per host per batch
  c.max_new_tokens = 8 if small else 64  # understanding: answer length cap
  c.max_items = 0  # use only the first N records (0: all)
  c.max_items_this_run = 0  # stop after scoring N records (0: no limit); rerun resumes
  c.process_index = -1  # testing only: pretend to be host i (-1: jax.process_index())
  c.process_count = -1  # testing only: pretend there are N hosts (-1: jax's count)
  c.num_devices = 0  # use the first N local devices (0: all of them)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # local devices

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic" if small else "jsonl"  # synthetic | jsonl
  c.data.path = ""  # jsonl records (records.py lists the fields per protocol)
  c.data.mixed_sizes = "resize"  # images of another size than image_size: resize | skip
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.seed = 0  # synthetic set seed
  c.data.synthetic.size = 64  # rendered image side
  c.data.synthetic.num_train = 200  # training scenes the held-out split must avoid
  c.data.synthetic.num_items = 8  # held-out scenes

  c.model = ml_collections.ConfigDict()
  c.model.kind = "puma" if variant == "paper" else variant  # puma | tiny | toy (models.py)
  c.model.seed = 0  # tiny: weight seed
  c.model.toy_size = 64  # toy: generated image side
  c.model.steps = 2 if small else 50  # diffusion steps per decode
  c.model.guidance = 2.0  # classifier-free guidance scale
  c.model.puma = ""  # converted PUMA dir (t2i, editing, understanding)
  c.model.tokenizer = ""  # tokenizer dir ("" or "byte": the byte tokenizer)
  c.model.clip = ""  # converted clip-vision dir (reconstruction)
  c.model.vae = ""  # converted SDXL VAE dir
  c.model.decoders = ml_collections.ConfigDict({s: "" for s in pooling.SCALE_NAMES})  # per scale

  c.metrics = ml_collections.ConfigDict()
  c.metrics.lpips = ""  # converted lpips-alex dir
  c.metrics.clip = ""  # converted clip dir (ViT-B/32, both towers + tokenizer files)
  c.metrics.dino = ""  # converted dino-vit dir (ViT-S/16)
  c.metrics.inception = ""  # converted inception dir (FID)
  c.metrics.random_tiny = small  # absent dirs -> tiny random networks (else MissingWeightsError)
  c.metrics.lpips_d = True  # text-to-image: LPIPS between two seeds
  c.metrics.fid = True  # text-to-image: FID per scale
  return c


def from_release(cfg: ml_collections.ConfigDict, release: str) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose model is release `release`'s parts (docs/SAMPLING.md): kind puma,
  model.puma / decoders / vae / tokenizer, and model.clip when the release has a clip/ part
  (a release with puma/ has none: its CLIP is inside the PumaModel)."""
  from puma_jax import release as release_lib

  rel = release_lib.Release.open(release)
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.kind = "puma"
    cfg.model.puma = str(rel.puma) if rel.has("puma") else ""
    cfg.model.clip = str(rel.clip) if rel.has("clip") else ""
    cfg.model.vae = str(rel.vae) if rel.has("vae") else ""
    cfg.model.tokenizer = rel.tokenizer
    for s in cfg.model.decoders:
      cfg.model.decoders[s] = str(rel.decoder(s)) if s in rel.scales else ""
  return cfg
