"""Convert a dataset in a public format into self-contained ArrayRecord files.

  python -m puma_jax.data.prepare --format=webdataset --family=pairs \
      --src='/data/cc3m/*.tar' --dst=/data/cc3m_ar/pairs [--records_per_file=50000]
  python -m puma_jax.data.prepare --format=json --family=chat --src=llava_v1_5_mix665k.json \
      --image_root=/data/llava --dst=/data/llava_ar/chat
  python -m puma_jax.data.prepare --format=synthetic --family=edit --dst=/tmp/shapes/edit
  python -m puma_jax.data.prepare --decoder_config=configs/decoder.py:demo_f0 \
      --decoder_config.init.clip=W/parts/clip --decoder_config.init.vae=W/parts/vae \
      --dst=W/latents [--encode_batch=32]

Records are the raw records (canonical keys) with images embedded as encoded bytes (image
paths are read and inlined), msgpack-encoded; read them back with a source of
`format="arrayrecord"` and the same family. Every record is parsed on the way: bad ones are
left out and counted (a report is printed), so the output holds only usable records.
Per-example choices (t2i vs i2t, derived conditions) are *not* baked in: they are made at
training time from the seed.

With --decoder_config the command writes the decoder stage's latent cache instead (a new
directory --dst; `puma_jax.training.latent_cache`): each training example's VAE moments and f0
CLIP features, computed once with the frozen VAE and CLIP, read back with
`--config.data.latent_cache=DIR`. One cache serves the five decoders (f0 pools to every scale).
It takes a decoder config, not the VAE and CLIP module dirs, because the config is what the
cached values depend on, in the form the stage reads it: the data (sources, image sizes), the
frozen models (configs, converted dirs or their random initialization from `config.seed`) and
the compute dtype. The stage checks the cache's fingerprint of these against its own. The
conversion flags (--format, --src, ...) do not apply: the data is the config's
(`--decoder_config.data.sources...`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from puma_jax import cli, fileio
from puma_jax.data import config as data_config
from puma_jax.data import parse, pipeline, sources


def _define_flags():
  """CLI flags, defined only when run as a program: importing this module (tests, the
  training entry point) must not add flags to the importer's absl namespace."""
  global _FORMAT, _FAMILY, _SRC, _DST, _IMAGE_ROOT, _FIELDS, _SPLIT, _TFDS, _PER_FILE, _LIMIT
  global _SYN_SIZE, _SYN_N, _BOX_FORMAT, _DECODER_CONFIG, _ENCODE_BATCH
  _FORMAT = flags.DEFINE_enum("format", None, list(data_config.FORMATS), "Input format.")
  _FAMILY = flags.DEFINE_enum("family", None, list(parse.PARSERS[:-1]), "Task family.")
  _SRC = flags.DEFINE_string("src", "", "Input files or globs, comma-separated.")
  _DST = flags.DEFINE_string(
    "dst", None, "Output prefix: writes PREFIX-00000-of-0000N.array_record"
  )
  _IMAGE_ROOT = flags.DEFINE_string("image_root", "", "Folder for relative image paths.")
  _FIELDS = flags.DEFINE_string("fields", "", "Field renames canonical=own, comma-separated.")
  _SPLIT = flags.DEFINE_string("split", "train", "Synthetic / tfds split.")
  _TFDS = flags.DEFINE_string("tfds_name", "", "TFDS dataset name (format tfds).")
  _PER_FILE = flags.DEFINE_integer("records_per_file", 100_000, "Records per output file.")
  _LIMIT = flags.DEFINE_integer("limit", 0, "Stop after this many input records (0: all).")
  _SYN_SIZE = flags.DEFINE_integer("synthetic_size", 64, "Synthetic image side.")
  _SYN_N = flags.DEFINE_integer("synthetic_num", 2000, "Synthetic training scenes.")
  _BOX_FORMAT = flags.DEFINE_enum(
    "box_format", "normalized", ["normalized", "pixels"], "Grounding box coordinates in the input."
  )
  _DECODER_CONFIG = config_flags.DEFINE_config_file(
    "decoder_config", None, "A decoder config: write its latent cache to the directory --dst."
  )
  _ENCODE_BATCH = flags.DEFINE_integer(
    "encode_batch", 32, "Latent cache: images per VAE / CLIP call."
  )


# Flags of a conversion that a latent cache, whose data is the decoder config's, cannot take.
_CONVERSION_FLAGS = (
  "format",
  "family",
  "src",
  "image_root",
  "fields",
  "split",
  "tfds_name",
  "limit",
  "synthetic_size",
  "synthetic_num",
  "box_format",
)


def inline_images(rec: dict, max_bytes: int) -> dict:
  """Replace image paths by their bytes so the output does not depend on an image folder.
  Only regular files of at most `max_bytes` are read (OSError otherwise)."""
  root = rec.get("__image_root__", "")
  out = dict(rec)
  for k in ("image", "source", "target"):
    v = out.get(k)
    if isinstance(v, str):
      out[k] = fileio.read_regular(os.path.join(root, v), max_bytes)
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
      out[k] = [fileio.read_regular(os.path.join(root, p), max_bytes) for p in v]
  return out


def existing_outputs(prefix: str) -> list[str]:
  """Files a previous run wrote under `prefix`: a later read of PREFIX-* would mix them in."""
  return sorted(glob.glob(glob.escape(prefix) + "-*.array_record"))


def write_array_records(records, prefix: str, per_file: int) -> list[str]:
  """Write serialized records to PREFIX-iiiii-of-nnnnn.array_record; returns the paths."""
  from array_record.python.array_record_module import ArrayRecordWriter

  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  chunks = [records[i : i + per_file] for i in range(0, len(records), per_file)] or [[]]
  paths = []
  for i, chunk in enumerate(chunks):
    path = f"{prefix}-{i:05d}-of-{len(chunks):05d}.array_record"
    w = ArrayRecordWriter(path, "group_size:1")  # group 1: cheapest random access
    for r in chunk:
      w.write(r)
    w.close()
    paths.append(path)
  return paths


def convert(
  scfg, dcfg, dst: str, per_file: int = 100_000, limit: int = 0, split: str = "train"
) -> dict:
  """Read, check and serialize one source. Returns a report dict.

  Refuses a `dst` prefix that already has shards. The shards are written into a temporary
  sibling folder and moved next to `dst` only when all are complete, so a failed run leaves
  no partial shard for a later read to pick up.
  """
  if not dst or dst.endswith(os.sep) or os.path.isdir(dst):
    raise fileio.OutputError(
      f"prepare: --dst {dst!r} must be a file prefix (e.g. "
      f"{os.path.join(dst or 'DIR', 'pairs')}), not a directory"
    )
  stale = existing_outputs(dst)
  if stale:
    raise fileio.OutputError(
      f"prepare: --dst {dst} already has {len(stale)} shard(s) (e.g. "
      f"{stale[0]}); remove them or choose another prefix"
    )
  reader = pipeline.open_source("prepare", scfg, dcfg, split)
  parser = parse.Parser(scfg.family, "prepare", pipeline.parse_options(dcfg, scfg))
  kept, skipped = [], {}
  n = len(reader) if not limit else min(limit, len(reader))
  for i in range(n):
    rec = reader[i]
    try:
      if isinstance(rec, dict) and "__error__" not in rec:
        rec = inline_images(rec, int(dcfg.max_file_bytes))
    except OSError:
      pass  # the parser reports the missing file with its reason
    result = parser(rec)
    if isinstance(result, parse.Skip):
      skipped[result.reason] = skipped.get(result.reason, 0) + 1
      continue
    kept.append(sources.pack_record(rec))
  parent, name = os.path.split(os.path.abspath(dst))
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  except OSError as e:
    raise fileio.OutputError(f"prepare: cannot write under {parent}: {e.strerror}") from None
  try:
    staged = write_array_records(kept, os.path.join(tmp, name), per_file)
    if existing_outputs(dst):
      raise fileio.OutputError(
        f"prepare: shards appeared under --dst {dst} during the run "
        "(another prepare?); nothing was moved"
      )
    paths = []
    for p in staged:
      paths.append(os.path.join(parent, os.path.basename(p)))
      os.rename(p, paths[-1])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {"read": n, "written": len(kept), "skipped": skipped, "files": paths}


def main(argv):
  if _DECODER_CONFIG.value is not None:
    given = [f"--{n}" for n in _CONVERSION_FLAGS if flags.FLAGS[n].present]
    if given:
      raise app.UsageError(
        f"{', '.join(given)}: not with --decoder_config (the latent cache reads the decoder "
        "config's data: set --decoder_config.data.... instead)"
      )
    if _DECODER_CONFIG.value.get("stage") != "decoder":
      raise app.UsageError("--decoder_config: not a decoder config (its stage is not 'decoder')")
    from puma_jax.training import decoder, latent_cache

    meta = latent_cache.write(
      decoder.DecoderStage(_DECODER_CONFIG.value), _DST.value, _ENCODE_BATCH.value, _PER_FILE.value
    )
    report = {k: meta[k] for k in ("sources", "shapes", "dtype", "bytes_per_example")}
    print(json.dumps(report, indent=2))
    return
  if _ENCODE_BATCH.present:
    raise app.UsageError("--encode_batch: only with --decoder_config")
  missing = [f"--{n}" for n in ("format", "family") if flags.FLAGS[n].value is None]
  if missing:
    raise app.UsageError(f"{', '.join(missing)} required (or --decoder_config)")
  dcfg = data_config.get_config("synthetic")
  dcfg.synthetic.image_size, dcfg.synthetic.num_train = _SYN_SIZE.value, _SYN_N.value
  fields = dict(kv.split("=", 1) for kv in _FIELDS.value.split(",") if kv)
  scfg = data_config.source(
    _FAMILY.value,
    1.0,
    _FORMAT.value,
    _SRC.value,
    _IMAGE_ROOT.value,
    fields,
    _BOX_FORMAT.value,
    tfds_name=_TFDS.value,
    tfds_split=_SPLIT.value,
  )
  report = convert(scfg, dcfg, _DST.value, _PER_FILE.value, _LIMIT.value, _SPLIT.value)
  print(json.dumps(report, indent=2, default=lambda o: int(o) if np.isscalar(o) else str(o)))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["dst"])
  sys.exit(cli.run(main, doc=__doc__, expected=(ValueError, OSError)))
