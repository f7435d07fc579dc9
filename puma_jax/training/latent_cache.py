"""The decoder stage's latent cache: every training example's VAE moments and CLIP features,
computed once with the frozen VAE and CLIP, so the stage skips both encoders at every step.

  python -m puma_jax.data.prepare --decoder_config=configs/decoder.py:demo_f0 \
      --decoder_config.init.clip=W/parts/clip --decoder_config.init.vae=W/parts/vae \
      --dst=W/latents
  python -m puma_jax.main --config=configs/decoder.py:demo_f2 ... \
      --config.data.latent_cache=W/latents

What a cache holds (`write`), one directory:
  metadata.json     format, the fingerprint (below), per-source record counts and files, shapes
  <source>-iiiii-of-nnnnn.array_record
                    one record per record of each active source of the config's `data` (train
                    split), in record order: {key, vae_mean, vae_logvar, clip_f0} (float32
                    little-endian bytes), or for a record the pipeline skips, its skip marker
                    {__error__: reason, key, __detail__}. The stage reads it through the
                    ordinary pipeline (`pipeline.build(decode=...)`): the same host sharding,
                    per-epoch shuffle, mixing and skip counts as the images, so the batches
                    hold the same examples in the same order and the iterator state restores
                    as it does for images.

`clip_f0` is the f0 grid (256 tokens): the finest the decoders read, each decoder pools it to
its scale in the step (`pooling.pool`, as for fresh features), so one cache serves f0..f4. The
latent is not frozen: the stage still draws mean + std x N(0, 1) per example and step from its
key. Float32: (2 x latent h x w x c + 256 x CLIP width) x 4 bytes per example: 72 KiB for the
tiny and demo decoders (16 x 16 x 4 latents, width 64), 1.5 MiB at the paper's size (128 x 128
x 4 latents, CLIP-L width 1024; the features are two thirds of it). Values computed in bfloat16
are stored exactly.

Nothing random is frozen: the decoder data has no random augmentation (a deterministic centre
crop and resize, `data.transforms.Preprocess`; per-example parse choices hash the key).

The fingerprint names what the cached values depend on: the CLIP and VAE configs, a checksum
of their weights, the compute dtype and the image preprocessing (`data.image`), plus each
source's format, paths and family. The stage refuses a cache whose fingerprint differs from its
own (`check_config` when the data is opened, `check_weights` once the frozen weights are
restored), naming `data.latent_cache` and what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax import nnx

from puma_jax import fileio
from puma_jax.data import pipeline, sources
from puma_jax.data.schema import Skip
from puma_jax.models import pooling

FORMAT = "puma-latent-cache-v1"
METADATA = "metadata.json"
F0_TOKENS = pooling.SCALE_TOKENS[0]  # every coarser scale pools from it
ROW_KEYS = ("vae_mean", "vae_logvar", "clip_f0")
_SOURCE_FIELDS = ("format", "paths", "family", "image_root", "tfds_name", "tfds_split")
_MAX_METADATA_BYTES = 16 << 20


# ----------------------------------------------------------------------------------------------
# Fingerprint


@jax.jit
def _checksums(leaves):
  """Two uint32 sums of each leaf's bits times position-dependent odd factors: integer sums are
  exact in any order, so the result is the same however the leaf is sharded."""
  out = []
  for x in leaves:
    if x.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      raise TypeError(f"weights checksum: unsupported parameter dtype {x.dtype}")
    bits = bits.reshape(-1)
    i = jnp.arange(bits.size, dtype=jnp.uint32)
    # An odd factor is invertible mod 2^32: changing any one value always changes the sum.
    a = jnp.sum(bits * (2 * i + 1), dtype=jnp.uint32)
    b = jnp.sum((bits ^ (i * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B), dtype=jnp.uint32)
    out.append(jnp.stack([a, b]))
  return out


def weights_checksum(tree) -> str:
  """A checksum of a parameter tree's paths, shapes, dtypes and values (hex). It tells
  different weights apart; it is no cryptographic hash."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  sums = jax.device_get(_checksums([v for _, v in flat]))
  h = hashlib.sha256()
  for (path, v), s in zip(flat, sums):
    h.update(f"{jax.tree_util.keystr(path)}|{v.shape}|{v.dtype}|{int(s[0])}|{int(s[1])};".encode())
  return h.hexdigest()[:32]


def fingerprint(stage, frozen=None) -> dict:
  """What the cached values of `stage` (a `DecoderStage`) depend on; with its frozen
  parameters (`{"clip": ..., "vae": ...}`, a pure dict), their checksums too."""
  img = pipeline.image_options(stage.config.data)
  fp = {
    "clip": stage.clip_cfg.to_dict(),
    "vae": stage.vae_cfg.to_dict(),
    "compute_dtype": str(jnp.dtype(stage.dtype)),
    "image": {
      "clip_size": img.clip_size,
      "vae_size": img.vae_size,
      "min_resolution": img.min_resolution,
      "center_crop": img.center_crop,
    },
  }
  if frozen is not None:
    fp["clip_weights"] = weights_checksum(frozen["clip"])
    fp["vae_weights"] = weights_checksum(frozen["vae"])
  return fp


def _source_fingerprint(scfg, dcfg) -> dict:
  out = {k: scfg.get(k, "") for k in _SOURCE_FIELDS}
  out["fields"] = dict(scfg.get("fields", {}) or {})
  if scfg.format == "synthetic":  # its records are rendered from these
    out["synthetic"] = dcfg.synthetic.to_dict()
    out["seed"] = int(dcfg.seed)
  return out


def _differences(cached: dict, own: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(cached) | set(own)):
    a, b = cached.get(k), own.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} in the cache, {b!r} here")
  return out


def _refuse(path: str, what: str, diffs: list[str]) -> None:
  if diffs:
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    raise ValueError(
      f"data.latent_cache={path}: the cache was made with other {what} than this run's "
      f"({shown}); make a new one with `python -m puma_jax.data.prepare --decoder_config=...`"
    )


# ----------------------------------------------------------------------------------------------
# Writing


class _KeyedEncoder:
  """The stage's example encoder, plus the example key."""

  def __init__(self, encode):
    self.encode = encode

  def __call__(self, ex):
    return dict(self.encode(ex), key=ex.key)


def _f32_bytes(x) -> bytes:
  return np.ascontiguousarray(x, dtype="<f4").tobytes()


def write(stage, dst: str | os.PathLike, batch_size: int = 32, records_per_file: int = 100_000):
  """Writes the latent cache of `stage`, a `training.decoder.DecoderStage` (the frozen CLIP and
  VAE its config loads or initializes, the train split of its `data`), to the new directory
  `dst`. Returns a report. The caller builds the stage, so that the decoder stage, which reads
  caches, and this writer do not import each other."""
  from array_record.python.array_record_module import ArrayRecordWriter

  config = stage.config
  if batch_size < 1 or records_per_file < 1:
    raise ValueError(f"batch_size={batch_size} and records_per_file={records_per_file} must be > 0")
  fileio.check_output_dir(dst, "latent cache")  # before the models load (checked again at the end)
  stage.check_image_sizes()
  parts = stage.build_frozen(nnx.Rngs(int(config.seed)))
  stage.load_frozen(parts)
  if not stage.loads_pretrained:
    # Random frozen parts: the stage initializes its whole model in one jitted program, whose
    # values differ from the op-by-op ones above in the last bits; take them from that program
    # (the parts only exist in toy configs, where the whole model is small).
    from puma_jax import sharding
    from puma_jax.training import init as init_lib

    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
      frozen = init_lib.restore_or_init(stage, None, mesh).frozen
    params = nnx.state(parts, stage.frozen)
    nnx.replace_by_pure_dict(params, jax.device_get(frozen))
    nnx.update(parts, params)
  graphdef, state = nnx.split(parts)
  fp = fingerprint(stage, nnx.to_pure_dict(nnx.state(parts, stage.frozen)))

  @jax.jit
  def encode(state, clip_u8, vae_u8):
    model = nnx.merge(graphdef, state)
    mean, logvar = stage.moments(model, vae_u8)
    f0 = stage.features(model, clip_u8, F0_TOKENS)
    return mean.astype(jnp.float32), logvar.astype(jnp.float32), f0.astype(jnp.float32)

  dcfg = config.data
  size = pipeline.image_options(dcfg)
  specs = jax.eval_shape(
    encode,
    state,
    jax.ShapeDtypeStruct((batch_size, size.clip_size, size.clip_size, 3), jnp.uint8),
    jax.ShapeDtypeStruct((batch_size, size.vae_size, size.vae_size, 3), jnp.uint8),
  )
  shapes = {k: list(v.shape[1:]) for k, v in zip(ROW_KEYS, specs)}
  per_source = {}
  with fileio.staged_output(dst, "latent cache") as tmp:
    for name, scfg in pipeline.active_sources(dcfg).items():
      items = pipeline.encoded_source(name, scfg, dcfg, _KeyedEncoder(stage.example_encoder()))
      n_files = max(1, math.ceil(len(items) / records_per_file))
      files = [f"{name}-{i:05d}-of-{n_files:05d}.array_record" for i in range(n_files)]
      writers = [ArrayRecordWriter(str(tmp / f), "group_size:1") for f in files]
      written, skipped = 0, {}
      for i, rec in enumerate(_records(items, lambda c, v: encode(state, c, v), batch_size)):
        if "__error__" in rec:
          skipped[rec["__error__"]] = skipped.get(rec["__error__"], 0) + 1
        else:
          written += 1
        writers[i // records_per_file].write(msgpack.packb(rec, use_bin_type=True))
      for w in writers:
        w.close()
      per_source[name] = {
        **_source_fingerprint(scfg, dcfg),
        "records": len(items),
        "written": written,
        "skipped": skipped,
        "files": files,
      }
    if not any(s["written"] for s in per_source.values()):
      raise ValueError("latent cache: no usable example in the data (every record was skipped)")
    meta = {
      "format": FORMAT,
      "split": "train",
      "fingerprint": fp,
      "dtype": "float32",
      "shapes": shapes,
      "bytes_per_example": sum(4 * math.prod(s) for s in shapes.values()),
      "sources": per_source,
    }
    (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
  return meta


def _records(items, encode, batch_size: int):
  """The cache records of `items` (rows and Skips) in order; rows go through `encode` (clip,
  vae uint8 batches -> float32 vae_mean, vae_logvar, clip_f0) `batch_size` at a time."""
  pending, rows = [], 0
  for i in range(len(items)):
    pending.append(items[i])
    rows += not isinstance(pending[-1], Skip)
    if rows == batch_size:
      yield from _encoded(pending, encode, batch_size)
      pending, rows = [], 0
  yield from _encoded(pending, encode, batch_size)


def _encoded(pending: list, encode, batch_size: int):
  rows = [r for r in pending if not isinstance(r, Skip)]
  if rows:
    pad = [rows[0]] * (batch_size - len(rows))  # a fixed batch shape: one compile
    out = jax.device_get(
      encode(np.stack([r["clip"] for r in rows + pad]), np.stack([r["vae"] for r in rows + pad]))
    )
  j = 0
  for r in pending:
    if isinstance(r, Skip):
      yield {"__error__": r.reason, "key": r.key, "__detail__": r.detail}
      continue
    yield {"key": r["key"], **{k: _f32_bytes(v[j]) for k, v in zip(ROW_KEYS, out)}}
    j += 1


# ----------------------------------------------------------------------------------------------
# Reading


def read_metadata(path: str) -> dict:
  """The cache's metadata (errors name `data.latent_cache`)."""
  try:
    raw = fileio.read_regular(os.path.join(path, METADATA), _MAX_METADATA_BYTES)
    meta = json.loads(raw)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"data.latent_cache={path}: no readable {METADATA} ({getattr(e, 'strerror', None) or e})"
    ) from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"data.latent_cache={path}: {METADATA} is not a {FORMAT} cache")
  return meta


class Decode:
  """A cache record -> the stage's row {vae_mean, vae_logvar, clip_f0} (float32), or the Skip
  the image pipeline gave that record (same reason and source: the skip counts agree)."""

  def __init__(self, source: str, shapes: dict):
    self.source = source
    self.shapes = {k: tuple(shapes[k]) for k in ROW_KEYS}

  def __call__(self, rec):
    key = str(rec.get("key", "")) if isinstance(rec, dict) else ""
    if not isinstance(rec, dict):
      return Skip("wrong_type:record", self.source, key)
    if "__error__" in rec:
      return Skip(rec["__error__"], self.source, key, str(rec.get("__detail__", "")))
    out = {}
    for k, shape in self.shapes.items():
      v = rec.get(k)
      if not isinstance(v, bytes) or len(v) != 4 * math.prod(shape):
        return Skip("bad_cache_record", self.source, key, f"{k} is not {shape} float32")
      out[k] = np.frombuffer(v, "<f4").reshape(shape)
    return out


def check_config(stage) -> dict:
  """The metadata of `stage.config.data.latent_cache`, after checking it against everything of
  the fingerprint the config alone decides (not the weights: `check_weights`)."""
  dcfg = stage.config.data
  path = str(dcfg.latent_cache)
  meta = read_metadata(path)
  cached = {k: v for k, v in meta["fingerprint"].items() if not k.endswith("_weights")}
  own = json.loads(json.dumps(fingerprint(stage)))  # tuples as lists, as the cache has them
  _refuse(path, "frozen models or preprocessing", _differences(cached, own))
  for name, scfg in pipeline.active_sources(dcfg).items():
    if name not in meta["sources"]:
      raise ValueError(
        f"data.latent_cache={path} has no source {name!r} (it has "
        f"{sorted(meta['sources'])}); data.sources must be the ones it was made from"
      )
    own = json.loads(json.dumps(_source_fingerprint(scfg, dcfg)))
    got = {k: meta["sources"][name].get(k) for k in own}
    _refuse(path, f"data.sources.{name}", _differences(got, own))
  return meta


def check_weights(path: str, meta: dict, stage, frozen) -> None:
  """Refuses the cache when the run's frozen CLIP or VAE weights are not the cached ones."""
  fp = meta["fingerprint"]
  own = fingerprint(stage, frozen)
  diffs = [
    f"{k}: checksum {fp.get(k)} in the cache, {own[k]} here"
    for k in ("clip_weights", "vae_weights")
    if fp.get(k) != own[k]
  ]
  _refuse(path, "frozen weights", diffs)


def readers(path: str, meta: dict, names) -> dict:
  """Source name -> the random-access reader of its cache files."""
  return {
    n: sources.ArrayRecordSource([str(Path(path) / f) for f in meta["sources"][n]["files"]])
    for n in names
  }
