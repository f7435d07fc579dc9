"""Random-access readers for the on-disk formats. Each yields *raw* records (plain dicts).

Every reader implements grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`),
is picklable (multiprocess workers re-open files lazily), and never raises on a bad record:
a record it cannot read comes back as `{"__error__": reason, ...}` so the parser turns it into a
counted skip. Raw records use canonical keys ("image", "caption", "text", "conversations",
"noun_chunks", "source", "target", "instruction", "key"); `fields` renames a format's own keys
onto them (e.g. `{"caption": "TEXT", "image": "jpg"}` for a LAION-style parquet).
"""

from __future__ import annotations

import collections
import glob
import json
import os
import tarfile
import threading
from collections.abc import Mapping, Sequence

import msgpack
import numpy as np

from puma_jax import fileio

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TEXT_EXTS = (".txt", ".caption")


class DataPathError(FileNotFoundError, ValueError):
  """A data source path that matches no file, or names something that is not a regular file.
  Also a ValueError: every CLI reports it as bad input (one line, exit 2)."""


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Comma-separated or listed paths and globs -> sorted concrete files (errors name the path)."""
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p]
  out = []
  for p in paths:
    hits = sorted(glob.glob(os.path.expanduser(p)))
    if not hits:
      raise DataPathError(f"data source path {p!r} matches no file")
    for h in hits:
      try:  # a FIFO would block the first read forever, /dev/zero never ends
        fileio.check_regular(h)
      except fileio.NotRegularFileError as e:
        raise DataPathError(f"data source path {h!r} {e.strerror}, not a regular file") from None
    out.extend(hits)
  return out


def rename_fields(rec: dict, fields: Mapping[str, str] | None) -> dict:
  if not fields:
    return rec
  rec = dict(rec)
  for canonical, own in fields.items():
    if own in rec:
      rec[canonical] = rec.pop(own)
  return rec


class _Source:
  """Shared bits: a name, a field mapping and an image folder for relative image paths."""

  def __init__(self, fields=None, image_root: str = ""):
    self.fields = dict(fields or {})
    self.image_root = image_root
    self._fds = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    # Open descriptors and locks do not cross process boundaries: workers reopen lazily.
    return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock", "_cache")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fds, self._lock = {}, threading.Lock()
    if hasattr(type(self), "_CACHE_SIZE"):
      self._cache = collections.OrderedDict()

  def __del__(self):
    for fd in getattr(self, "_fds", {}).values():
      try:
        os.close(fd)
      except OSError:
        pass

  def _pread(self, path: str, offset: int, size: int) -> bytes:
    """Positional read: grain reads with several threads, and a shared file offset
    (seek + read) would let one thread's seek land in the middle of another's read."""
    fd = self._fds.get(path)
    if fd is None:
      with self._lock:
        fd = self._fds.get(path)
        if fd is None:
          fd = self._fds[path] = os.open(path, os.O_RDONLY)
    data = os.pread(fd, size, offset)
    if len(data) != size:
      raise EOFError(f"{path}: read {len(data)} of {size} bytes at offset {offset}")
    return data

  def _finish(self, rec, key: str) -> dict:
    if not isinstance(rec, dict):
      return {
        "__error__": "wrong_type:record",
        "key": key,
        "__detail__": f"record is {type(rec).__name__}, not an object",
      }
    rec = rename_fields(rec, self.fields)
    rec.setdefault("key", key)
    if self.image_root:
      rec["__image_root__"] = self.image_root
    return rec

  def __repr__(self):
    return f"{type(self).__name__}({len(self)} records)"


class JsonlSource(_Source):
  """JSON Lines: one object per line. Used for image-text JSONL (image path + caption), GRIT-
  style grounding, text-only corpora and editing triplets. Lines are indexed by byte offset so
  a corpus need not fit in memory."""

  def __init__(self, paths, fields=None, image_root: str = ""):
    super().__init__(fields, image_root)
    self.paths = expand_paths(paths)
    self._index = []  # (file number, offset, length)
    for fi, p in enumerate(self.paths):
      with open(p, "rb") as f:
        off = 0
        for line in f:
          if line.strip():
            self._index.append((fi, off, len(line)))
          off += len(line)

  def __len__(self):
    return len(self._index)

  def __getitem__(self, i):
    fi, off, size = self._index[i]
    key = f"{os.path.basename(self.paths[fi])}:{off}"
    try:
      line = self._pread(self.paths[fi], off, size)
    except (OSError, EOFError) as e:
      return {"__error__": "read_error", "key": key, "__detail__": str(e)[:200]}
    try:
      rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return {"__error__": "bad_json", "key": key, "__detail__": str(e)[:200]}
    return self._finish(rec, key)


class JsonListSource(_Source):
  """A JSON file holding a list of records: the LLaVA instruction-tuning format
  (`[{"id", "image", "conversations": [{"from": "human"|"gpt", "value": ...}]}]`)."""

  def __init__(self, paths, fields=None, image_root: str = ""):
    super().__init__(fields, image_root)
    self.records = []
    for p in expand_paths(paths):
      with open(p) as f:
        data = json.load(f)
      if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
      base = os.path.basename(p)
      self.records.extend((f"{base}:{i}", r) for i, r in enumerate(data))

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    key, rec = self.records[i]
    if isinstance(rec, dict) and "id" in rec:
      key = str(rec["id"])
    return self._finish(rec, key)


class WebDatasetSource(_Source):
  """WebDataset tar shards: members `{key}.{ext}` grouped by key. `.jpg/.png/...` -> "image"
  bytes, `.txt` -> "caption", `.json` -> merged into the record (its own keys, renamed by
  `fields`). The tar index (member offsets) is built once; reads seek straight to the data."""

  def __init__(self, paths, fields=None, image_root: str = ""):
    super().__init__(fields, image_root)
    self.paths = expand_paths(paths)
    self._index = []  # (shard number, key, {ext: (offset, size)})
    self.broken_shards = {}
    for si, p in enumerate(self.paths):
      groups: dict[str, dict] = {}
      try:
        with tarfile.open(p, "r:") as tar:
          for m in tar:
            if not m.isfile():
              continue
            name = os.path.basename(m.name)
            stem, dot, ext = name.partition(".")
            prefix = os.path.dirname(m.name)
            key = f"{prefix}/{stem}" if prefix else stem
            groups.setdefault(key, {})[f".{ext.lower()}"] = (m.offset_data, m.size)
      except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated shard still yields the members indexed before the damage.
        self.broken_shards[p] = f"{type(e).__name__}: {e}"
      self._index.extend((si, k, g) for k, g in groups.items())

  def __len__(self):
    return len(self._index)

  def _read(self, si, off, size) -> bytes:
    return self._pread(self.paths[si], off, size)

  def __getitem__(self, i):
    si, key, members = self._index[i]
    rec = {}
    try:
      for ext, (off, size) in members.items():
        if ext in IMAGE_EXTS:
          rec["image"] = self._read(si, off, size)
        elif ext in TEXT_EXTS:
          rec["caption"] = self._read(si, off, size).decode("utf-8")
        elif ext == ".json":
          meta = json.loads(self._read(si, off, size))
          if isinstance(meta, dict):
            rec = {**meta, **rec}
    except (EOFError, OSError) as e:
      return {"__error__": "truncated_shard", "key": key, "__detail__": str(e)}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return {"__error__": "bad_text_encoding", "key": key, "__detail__": str(e)[:200]}
    return self._finish(rec, key)


class ParquetSource(_Source):
  """Parquet with an image-bytes column (raw bytes, or a HF-datasets struct {"bytes", "path"})
  or an image-path column (relative to `image_root`), plus a caption column.

  Parquet has no row-level random access: a read decodes a whole row group, and the last few
  are cached. Shuffled reads over large files therefore re-decode row groups; for training at
  scale convert once with `python -m puma_jax.data.prepare` (ArrayRecord: per-record access).
  """

  _CACHE_SIZE = 4

  def __init__(self, paths, fields=None, image_root: str = ""):
    import pyarrow.parquet as pq

    super().__init__(fields, image_root)
    self.paths = expand_paths(paths)
    self._index = []  # (file, row group, row)
    for fi, p in enumerate(self.paths):
      meta = pq.ParquetFile(p).metadata
      for g in range(meta.num_row_groups):
        self._index.extend((fi, g, r) for r in range(meta.row_group(g).num_rows))
    self._cache = collections.OrderedDict()

  def __len__(self):
    return len(self._index)

  def _row_group(self, fi, g):
    import pyarrow.parquet as pq

    with self._lock:
      rows = self._cache.get((fi, g))
      if rows is not None:
        self._cache.move_to_end((fi, g))
        return rows
    rows = pq.ParquetFile(self.paths[fi]).read_row_group(g).to_pylist()
    with self._lock:
      self._cache[(fi, g)] = rows
      while len(self._cache) > self._CACHE_SIZE:
        self._cache.popitem(last=False)
    return rows

  def __getitem__(self, i):
    fi, g, r = self._index[i]
    try:
      rows = self._row_group(fi, g)
    except OSError as e:
      return {"__error__": "read_error", "key": f"{fi}:{g}:{r}", "__detail__": str(e)[:200]}
    rec = dict(rows[r])
    key = f"{os.path.basename(self.paths[fi])}:{g}:{r}"
    rec = self._finish(rec, str(rec.get("key", key)) if rec.get("key") is not None else key)
    img = rec.get("image")
    if isinstance(img, dict):  # HF datasets' Image feature
      rec["image"] = img.get("bytes") or img.get("path")
    return rec


class ArrayRecordSource(_Source):
  """ArrayRecord files written by `puma_jax.data.prepare`: msgpack-encoded raw records (images
  as encoded PNG/JPEG bytes). Reading goes through grain's ArrayRecordDataSource."""

  def __init__(self, paths, fields=None, image_root: str = ""):
    import grain.python as gp

    super().__init__(fields, image_root)
    self.paths = expand_paths(paths)
    try:
      self._src = gp.ArrayRecordDataSource(self.paths)
    except RuntimeError:  # array_record's message is empty: find and name the file
      for p in self.paths:
        try:
          gp.ArrayRecordDataSource([p])
        except RuntimeError as e:
          raise ValueError(
            f"{p}: not a readable ArrayRecord file (truncated or corrupt"
            f"{': ' + str(e) if str(e) else ''})"
          ) from None
      raise

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    try:
      rec = msgpack.unpackb(self._src[i], raw=False)
    except RuntimeError as e:  # a damaged chunk inside a file whose index still reads
      return {"__error__": "read_error", "key": str(i), "__detail__": str(e)[:200]}
    except (msgpack.UnpackException, ValueError, UnicodeDecodeError) as e:
      return {"__error__": "bad_record_encoding", "key": str(i), "__detail__": str(e)[:200]}
    return self._finish(rec, str(rec.get("key", i)) if isinstance(rec, dict) else str(i))


class TfdsSource(_Source):
  """A TFDS dataset read through `tfds.data_source` (ArrayRecord-backed random access).
  Records are TFDS feature dicts (images already decoded to uint8 arrays); `fields` maps
  them onto the canonical keys, e.g. `{"image": "image", "caption": "captions/text"}` with a
  "/" path reaching into nested features."""

  def __init__(
    self,
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    fields=None,
    image_root: str = "",
  ):
    import tensorflow_datasets as tfds

    super().__init__(fields, image_root)
    self.name, self.split, self.data_dir = name, split, data_dir
    self._src = tfds.data_source(name, split=split, data_dir=data_dir)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    rec = self._src[i]
    out = {}
    for canonical, path in (self.fields or {}).items():
      v = rec
      for part in path.split("/"):
        v = v.get(part) if isinstance(v, Mapping) else None
      if isinstance(v, bytes) and canonical != "image":
        v = v.decode("utf-8", "replace")
      if isinstance(v, np.ndarray) and v.dtype == object and v.size:
        v = v.flat[0].decode("utf-8", "replace") if isinstance(v.flat[0], bytes) else v.flat[0]
      out[canonical] = v
    out.setdefault("key", f"{self.name}:{self.split}:{i}")
    if self.image_root:
      out["__image_root__"] = self.image_root
    return out


def pack_record(rec: dict) -> bytes:
  """Serialize a raw record for ArrayRecord: numpy images become PNG bytes (lossless)."""
  from puma_jax.data import imaging

  out = {}
  for k, v in rec.items():
    if k.startswith("__"):
      continue
    if isinstance(v, np.ndarray):
      v = imaging.encode_png(v) if v.dtype == np.uint8 and v.ndim in (2, 3) else v.tolist()
    out[k] = v
  return msgpack.packb(out, use_bin_type=True)
