"""The `data` ConfigDict that training configs embed (`c.data = data_config.get_config()`).

Presets (`get_config(preset)`):
  synthetic  the built-in shapes set, every task, CLIP views at 224 (default)
  tiny       the shapes set at 32 px with 32 px CLIP views: the tiny CLIP encoder's input
  pretrain   pretraining mix (PUMA paper, appendix 7.2): pairs (-> t2i / i2t 50/50), GRIT grounding,
             text-only, OCR-VQA / LLaVAR as chat. Paths are empty: fill them in, e.g.
             --config.data.sources.pairs.paths=/data/laion/{00000..00999}.tar
  unified    unified tuning mix (PUMA paper, appendix 7.2.4): t2i pairs, editing, conditional, chat
  decoder    decoder training: images (captions optional), >= 512 px, centre crop, VAE view

A source is `sources.<name>` with: format (synthetic | webdataset | parquet | jsonl | json |
arrayrecord | tfds), paths (comma-separated files or globs), family (pairs | grounding | text |
chat | edit | conditional | images), weight (mixing weight; 0 disables), image_root (folder
for relative image paths), fields (canonical key -> the format's own key), box_format
(grounding boxes: normalized | pixels), tfds_name / tfds_split / tfds_data_dir (format tfds).
"""

from __future__ import annotations

import ml_collections

from puma_jax.data.synthetic import FAMILIES

FORMATS = ("synthetic", "webdataset", "parquet", "jsonl", "json", "arrayrecord", "tfds")


def source(
  family: str,
  weight: float = 1.0,
  format: str = "synthetic",
  paths: str = "",
  image_root: str = "",
  fields: dict | None = None,
  box_format: str = "normalized",
  **tfds,
) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.format = format  # reader: one of FORMATS
  s.paths = paths  # files or globs, comma-separated (unused for synthetic)
  s.family = family  # how records are parsed (see puma_jax.data.parse.PARSERS)
  s.weight = float(weight)  # relative mixing weight; 0 leaves the source out
  s.image_root = image_root  # folder that relative image paths are resolved against
  s.fields = ml_collections.ConfigDict(fields or {})  # canonical key -> format's own key
  s.box_format = box_format  # grounding: "normalized" [0, 1] or "pixels"
  s.tfds_name = tfds.get("tfds_name", "")
  s.tfds_split = tfds.get("tfds_split", "train")
  s.tfds_data_dir = tfds.get("tfds_data_dir", "")
  return s


def get_config(preset: str = "synthetic") -> ml_collections.ConfigDict:
  presets = ("synthetic", "tiny", "pretrain", "unified", "decoder")
  if preset not in presets:
    raise ValueError(f"data config: unknown preset {preset!r}; choose from {presets}")
  d = ml_collections.ConfigDict()
  d.seed = 0  # shuffling, mixing and per-example choices (t2i/i2t, conditions)
  d.batch_size = 8  # examples per batch *per host*
  d.drop_remainder = True  # finite epochs: drop the last partial batch
  d.num_epochs = -1  # -1: repeat forever (training); N: N passes (eval, validation)
  d.shuffle = True  # per-epoch shuffle of every source (a fresh order each epoch)
  d.num_workers = 0  # grain worker processes for decode/augment; 0: in-process
  d.num_threads = 4  # read/transform threads per process (grain ReadOptions)
  d.prefetch = 16  # examples read ahead per process
  d.max_file_bytes = 64 << 20  # image files read by path above this size are skipped unread
  d.max_consecutive_skips = 10_000  # this many bad records in a row: stop with a report
  # (a broken path or format, not scattered bad records)

  d.image = ml_collections.ConfigDict()
  d.image.clip_size = 224  # CLIP encoder input side (PUMA: 224)
  d.image.vae_size = 0  # decoder target side (SDXL 1024, or 512); 0: no VAE view
  d.image.min_resolution = 0  # skip images with short side below this (decoders: 512)
  d.image.center_crop = True  # centred square crop before resizing

  d.text = ml_collections.ConfigDict()
  d.text.i2t_fraction = 0.5  # image-text pairs routed to i2t (the rest to t2i)
  d.text.max_len = 64  # ArrayEncoder: text tokens kept per example
  d.text.max_chars = 65_536  # before tokenizing: longer documents are cut, longer captions,
  # instructions and chat turns skipped ("text_too_long")

  d.max_images = 2  # image slots per example of unpacked rows (edit needs 2)
  d.pack = True  # MLLM training rows: pack examples first fit into rows of
  # seq_len, image slots from seq_len (data.rows.image_slots);
  # eval splits and array batches stay one example per row
  d.pack_bins = 16  # rows open at once for first fit: more fill rows better and
  # hold more examples in memory
  d.max_boxes = 8  # ArrayEncoder: grounding boxes kept per example

  d.conditional = ml_collections.ConfigDict()
  d.conditional.cond_types = "canny,inpaint,colorize"  # conditions derived from images
  d.conditional.canny_low = 100.0  # hysteresis thresholds on the Sobel magnitude (0..255
  d.conditional.canny_high = 200.0  # luma scale, as ControlNet's canny annotator)

  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.image_size = 64  # rendered side in pixels
  d.synthetic.num_train = 2000  # scenes in the training split (shared by every family)
  d.synthetic.num_eval = 200  # held-out scenes, none described like a training scene

  d.sources = ml_collections.ConfigDict()
  if preset in ("synthetic", "tiny"):
    weights = {
      "pairs": 2.0,
      "grounding": 1.0,
      "text": 1.0,
      "chat": 1.0,
      "edit": 1.0,
      "conditional": 1.0,
    }
    for fam in FAMILIES:
      d.sources[fam] = source(fam, weights[fam])
    if preset == "tiny":
      d.synthetic.image_size = 32
      d.image.clip_size = 32
  elif preset == "pretrain":
    # Weights are ours: the paper gives the datasets, not their mixing ratios (docs/DESIGN.md §11).
    d.sources.pairs = source("pairs", 6.0, "webdataset")  # LAION / CC / COYO style shards
    d.sources.grit = source("grounding", 1.0, "webdataset")  # GRIT-20M shards (.json noun_chunks)
    d.sources.text = source("text", 1.0, "jsonl")  # The Pile ({"text": ...})
    d.sources.ocr_vqa = source("chat", 0.5, "json")  # OCR-VQA in LLaVA format
    d.sources.llavar = source("chat", 0.5, "json")  # LLaVAR in LLaVA format
  elif preset == "unified":
    d.sources.t2i = source("pairs", 2.0, "webdataset")
    d.sources.edit = source("edit", 2.0, "jsonl")  # (source, instruction, target)
    d.sources.conditional = source("conditional", 1.0, "webdataset")
    d.sources.chat = source("chat", 2.0, "json")  # LLaVA-1.5 mix
    d.text.i2t_fraction = 0.0  # unified tuning: t2i only
  elif preset == "decoder":
    d.sources.images = source("images", 1.0, "webdataset")  # captions not needed
    d.image.min_resolution = 512
    d.image.vae_size = 1024
  return d
