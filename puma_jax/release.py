"""Releases: everything needed to sample from PUMA, in one directory (docs/SAMPLING.md).

    R/
      release.json      the manifest (below)
      puma/             converted PumaModel dir (family "puma"), optional; carries its own CLIP
      clip/             converted clip-vision dir; only in releases without puma/
      decoders/f0..f4/  converted puma-decoder dirs, any subset
      vae/              converted vae dir
      tokenizer/        HF tokenizer files with PUMA's tokens; absent when tokenizer is "byte"

release.json:
    {"format_version": 1, "name": "tiny-random", "scales": ["f0", "f4"], "image_size": 64,
     "clip_image_size": 224, "dtype": "float32", "tokenizer": "byte" | "tokenizer",
     "parts": {"puma": {"path": "puma", "source": "..."}, "clip": {...}, "vae": {...},
               "decoders": {"f0": {"path": "decoders/f0", "source": "..."}, ...}},
     "created_by": "python -m puma_jax.tools.tiny_release", "created": "<ISO time>"}

This module owns the format: everything that writes or reads releases goes through
`write_manifest` / `load_manifest`, `Release.open` and `ReleaseWriter`.

    with ReleaseWriter(dst, name="tiny-random", created_by="...") as w:
      checkpoints.save_module(w.part_dir("puma"), "puma", cfg, model)
      w.add_part("puma", source="random init, seed 0")
      w.add_decoder("f0", source="...")      # after writing w.decoder_dir("f0")

A new release is built in a hidden temporary sibling of `dst` and renamed into place when the
`with` block ends without an exception, so a half-written release never appears at `dst`.
`ReleaseWriter(R, into=True)` adds parts to an existing release: they are staged inside R,
moved into place, and release.json is replaced atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from puma_jax.models import pooling

FORMAT_VERSION = 1
MANIFEST = "release.json"
SINGLE_PARTS = ("puma", "clip", "vae")
PART_FAMILIES = {"puma": "puma", "clip": "clip-vision", "vae": "vae"}
DECODER_FAMILY = "puma-decoder"
DTYPES = ("float32", "bfloat16", "float16")
BYTE_TOKENIZER = "byte"
TOKENIZER_DIR = "tokenizer"

# Top-level keys and the type each must have (bool is excluded from int below).
_KEYS: dict[str, type | tuple[type, ...]] = {
  "format_version": int,
  "name": str,
  "scales": list,
  "image_size": int,
  "clip_image_size": int,
  "dtype": str,
  "tokenizer": str,
  "parts": dict,
  "created_by": str,
  "created": str,
}


class ReleaseError(ValueError):
  """A release directory or its manifest is missing, corrupt or lacks what was asked for."""


def _relative_path(value: Any, where: str) -> str:
  """A path inside the release: relative and not climbing out of it."""
  if not isinstance(value, str) or not value:
    raise ReleaseError(f"{where} must be a non-empty relative path, got {value!r}")
  p = Path(value)
  if p.is_absolute() or ".." in p.parts:
    raise ReleaseError(f"{where} must be a path inside the release, got {value!r}")
  return value


def _check_part(entry: Any, where: str, key: str) -> dict:
  if not isinstance(entry, Mapping):
    raise ReleaseError(
      f"{where}: key {key!r} must be an object with 'path' and 'source', got {entry!r}"
    )
  for k in ("path", "source"):
    if k not in entry:
      raise ReleaseError(f"{where}: key {key!r} is missing key {k!r}")
  if not isinstance(entry["source"], str):
    raise ReleaseError(f"{where}: key '{key}.source' must be a string, got {entry['source']!r}")
  _relative_path(entry["path"], f"{where}: key '{key}.path'")
  return dict(entry)


def validate_manifest(manifest: Any, where: str = MANIFEST) -> dict:
  """The manifest as a plain dict, or ReleaseError naming `where` and the offending key."""
  if not isinstance(manifest, Mapping):
    raise ReleaseError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
  m = dict(manifest)
  for key, typ in _KEYS.items():
    if key not in m:
      raise ReleaseError(f"{where}: missing key {key!r}")
    v = m[key]
    if key == "image_size" and v is None and not m.get("scales"):
      continue  # no decoders (a chat-only release): no output image size
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
      raise ReleaseError(f"{where}: key {key!r} must be {typ.__name__}, got {v!r}")
  if m["format_version"] != FORMAT_VERSION:
    raise ReleaseError(
      f"{where}: key 'format_version' is {m['format_version']}; this version "
      f"of puma_jax reads format_version {FORMAT_VERSION}"
    )
  for key in ("image_size", "clip_image_size"):
    if m[key] is not None and m[key] < 1:
      raise ReleaseError(f"{where}: key {key!r} must be positive, got {m[key]}")
  if m["dtype"] not in DTYPES:
    raise ReleaseError(f"{where}: key 'dtype' must be one of {DTYPES}, got {m['dtype']!r}")
  if m["tokenizer"] != BYTE_TOKENIZER:
    _relative_path(m["tokenizer"], f"{where}: key 'tokenizer'")
  parts = dict(m["parts"])
  unknown = sorted(set(parts) - set(SINGLE_PARTS) - {"decoders"})
  if unknown:
    raise ReleaseError(
      f"{where}: key 'parts' has unknown part(s) {unknown}; parts are "
      f"{SINGLE_PARTS + ('decoders',)}"
    )
  for name in SINGLE_PARTS:
    if name in parts:
      parts[name] = _check_part(parts[name], where, f"parts.{name}")
  decoders = parts.get("decoders", {})
  if not isinstance(decoders, Mapping):
    raise ReleaseError(f"{where}: key 'parts.decoders' must be an object, got {decoders!r}")
  for scale, entry in decoders.items():
    if scale not in pooling.SCALE_NAMES:
      raise ReleaseError(
        f"{where}: key 'parts.decoders.{scale}' is not a scale; scales are {pooling.SCALE_NAMES}"
      )
    _check_part(entry, where, f"parts.decoders.{scale}")
  parts["decoders"] = {s: dict(decoders[s]) for s in sort_scales(decoders)}
  m["parts"] = parts
  for s in m["scales"]:
    if s not in pooling.SCALE_NAMES:
      raise ReleaseError(
        f"{where}: key 'scales' has {s!r}, not a scale; scales are {pooling.SCALE_NAMES}"
      )
  if list(m["scales"]) != list(parts["decoders"]):
    raise ReleaseError(
      f"{where}: key 'scales' {m['scales']} must list the scales of "
      f"parts.decoders, fine to coarse: {list(parts['decoders'])}"
    )
  return m


def sort_scales(scales) -> list[str]:
  """Scale names fine to coarse (f0 .. f4)."""
  return sorted(scales, key=pooling.scale_index)


def write_manifest(dst: str | os.PathLike, manifest: Mapping) -> Path:
  """Validates `manifest` and writes dst/release.json atomically (a temp file, then a rename)."""
  dst = Path(dst)
  m = validate_manifest(manifest, str(dst / MANIFEST))
  fd, tmp = tempfile.mkstemp(prefix=".release.", suffix=".json", dir=dst)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(m, indent=2) + "\n")
    os.replace(tmp, dst / MANIFEST)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return dst / MANIFEST


def load_manifest(root: str | os.PathLike) -> dict:
  """The validated manifest of release `root`."""
  root = Path(root)
  if not root.is_dir():
    raise ReleaseError(
      f"{root}: not a directory (expected a release; make one with "
      "`python -m puma_jax.tools.tiny_release --dst=DIR` or convert one)"
    )
  path = root / MANIFEST
  if not path.is_file():
    raise ReleaseError(f"{path}: missing; {root} is not a release directory")
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ReleaseError(f"{path}: not valid JSON ({e})") from None
  return validate_manifest(manifest, str(path))


@dataclasses.dataclass(frozen=True)
class Release:
  """An opened release: its manifest and the directory of each part."""

  root: Path
  manifest: dict

  @classmethod
  def open(cls, root: str | os.PathLike) -> Release:
    root = Path(root).absolute()
    rel = cls(root, load_manifest(root))
    for what, path in rel._part_paths():
      if not path.is_dir():
        raise ReleaseError(f"{root / MANIFEST}: part {what} points at {path}, which is missing")
    return rel

  def _part_paths(self):
    parts = self.manifest["parts"]
    for name in SINGLE_PARTS:
      if name in parts:
        yield name, self.root / parts[name]["path"]
    for s, entry in parts["decoders"].items():
      yield f"decoders.{s}", self.root / entry["path"]
    if self.manifest["tokenizer"] != BYTE_TOKENIZER:
      yield "tokenizer", self.root / self.manifest["tokenizer"]

  @property
  def name(self) -> str:
    return self.manifest["name"]

  @property
  def scales(self) -> tuple[str, ...]:
    return tuple(self.manifest["scales"])

  @property
  def image_size(self) -> int:
    return self.manifest["image_size"]

  @property
  def dtype(self) -> str:
    return self.manifest["dtype"]

  def has(self, part: str) -> bool:
    return part in self.manifest["parts"]

  def part(self, name: str) -> Path:
    """Directory of part "puma", "clip" or "vae"."""
    if name not in SINGLE_PARTS:
      raise ReleaseError(f"unknown part {name!r}; parts are {SINGLE_PARTS} and decoders")
    if name not in self.manifest["parts"]:
      raise ReleaseError(
        f"release {self.root} has no {name!r} part (it has {sorted(self.manifest['parts'])})"
      )
    return self.root / self.manifest["parts"][name]["path"]

  @property
  def puma(self) -> Path:
    return self.part("puma")

  @property
  def vae(self) -> Path:
    return self.part("vae")

  @property
  def clip(self) -> Path:
    """The clip-vision dir; releases with puma/ have none (PumaModel carries its CLIP)."""
    return self.part("clip")

  def decoder(self, scale: str) -> Path:
    pooling.scale_index(scale)
    decoders = self.manifest["parts"]["decoders"]
    if scale not in decoders:
      raise ReleaseError(
        f"release {self.root} has no decoder for scale {scale} (it has {list(decoders) or 'none'})"
      )
    return self.root / decoders[scale]["path"]

  def decoders(self, scales=None) -> dict[str, Path]:
    """{scale: dir} for `scales` (all the release has when None); a missing one raises."""
    return {s: self.decoder(s) for s in sort_scales(self.scales if scales is None else scales)}

  @property
  def tokenizer(self) -> str:
    """What `tokenizer.load` takes: "byte" or the tokenizer directory."""
    t = self.manifest["tokenizer"]
    return t if t == BYTE_TOKENIZER else str(self.root / t)


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class ReleaseWriter:
  """Builds a release (or, with `into=True`, adds parts to one) without leaving half a release.

  Write each part's files into `part_dir(name)` / `decoder_dir(scale)` / `tokenizer_dir()`, then
  register it with `add_part` / `add_decoder` / `set_tokenizer`. Manifest fields not set with
  `set(...)` are read from the parts' configs (`image_size` = the decoders' UNet sample_size x
  the VAE's downsample factor; `clip_image_size` from puma/ or clip/).
  """

  def __init__(
    self, dst: str | os.PathLike, *, name: str = "", created_by: str = "", into: bool = False
  ):
    self.dst = Path(dst).absolute()
    self.into = into
    if into:
      self.manifest = load_manifest(self.dst)
      self._old_parts = _part_entries(self.manifest)
    else:
      if self.dst.exists() and (not self.dst.is_dir() or any(self.dst.iterdir())):
        raise ReleaseError(
          f"{self.dst} already exists and is not empty; refusing to write a "
          "release over it (choose a new --dst, or use --into to add parts)"
        )
      if not name:
        raise ReleaseError("a new release needs a name")
      self.manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "scales": [],
        "dtype": "float32",
        "tokenizer": BYTE_TOKENIZER,
        "parts": {"decoders": {}},
        "created_by": created_by,
        "created": now(),
      }
      self._old_parts = {}
    if created_by and into:
      self.manifest["updated_by"] = created_by
    self._stage: Path | None = None

  def __enter__(self) -> ReleaseWriter:
    parent = self.dst if self.into else self.dst.parent
    parent.mkdir(parents=True, exist_ok=True)
    self._stage = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.partial-", dir=parent))
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is None:
        self._commit()
    finally:
      if self._stage is not None and self._stage.exists():
        shutil.rmtree(self._stage, ignore_errors=True)
      self._stage = None

  # -- staging -----------------------------------------------------------------------------------

  def _staged(self, rel: str) -> Path:
    if self._stage is None:
      raise RuntimeError("use ReleaseWriter in a `with` block")
    if self.into and (self.dst / rel).exists():
      raise ReleaseError(
        f"{self.dst / rel} already exists; refusing to replace a part of "
        "the release (write a new release instead)"
      )
    path = self._stage / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path

  def part_dir(self, name: str) -> Path:
    """Where to write part "puma", "clip" or "vae" (not created: save_module creates it)."""
    if name not in SINGLE_PARTS:
      raise ReleaseError(f"unknown part {name!r}; parts are {SINGLE_PARTS}")
    return self._staged(name)

  def decoder_dir(self, scale: str) -> Path:
    pooling.scale_index(scale)
    return self._staged(f"decoders/{scale}")

  def tokenizer_dir(self) -> Path:
    return self._staged(TOKENIZER_DIR)

  def add_part(self, name: str, source: str) -> None:
    path = self._check_written(name)
    self.manifest["parts"][name] = {"path": path, "source": source}

  def add_decoder(self, scale: str, source: str) -> None:
    pooling.scale_index(scale)
    path = self._check_written(f"decoders/{scale}")
    decoders = {**self.manifest["parts"]["decoders"], scale: {"path": path, "source": source}}
    self.manifest["parts"]["decoders"] = {s: decoders[s] for s in sort_scales(decoders)}
    self.manifest["scales"] = list(self.manifest["parts"]["decoders"])

  def set_tokenizer(self, name: str) -> None:
    """ "byte", or TOKENIZER_DIR after writing the files into `tokenizer_dir()`."""
    if name != BYTE_TOKENIZER:
      self._check_written(name)
    self.manifest["tokenizer"] = name

  def set(self, **fields: Any) -> None:
    """Sets manifest fields such as image_size, clip_image_size, dtype, name."""
    bad = sorted(set(fields) - set(_KEYS) - {"updated_by"})
    if bad or {"parts", "scales", "format_version"} & set(fields):
      raise ReleaseError(f"ReleaseWriter.set cannot set {sorted(fields)}")
    self.manifest.update(fields)

  def _check_written(self, rel: str) -> str:
    path = self._stage / rel if self._stage is not None else None
    if path is None or not path.exists():
      raise ReleaseError(f"part {rel} was registered but nothing was written to it")
    return rel

  # -- commit ------------------------------------------------------------------------------------

  def _fill_sizes(self) -> None:
    """Sets (or checks) image_size and clip_image_size from the parts' configs."""
    from puma_jax import checkpoints

    def config_of(rel: str) -> dict | None:
      path = self._stage / rel
      path = path if path.exists() else self.dst / rel
      if not (path / checkpoints.CONFIG_FILE).exists():
        return None  # not a converted model directory: nothing to derive from
      return checkpoints.load_info(path)["config"]

    parts, derived = self.manifest["parts"], {}
    puma_cfg = config_of(parts["puma"]["path"]) if "puma" in parts else None
    clip_cfg = config_of(parts["clip"]["path"]) if "clip" in parts else None
    if puma_cfg is not None:
      derived["clip_image_size"] = puma_cfg["clip"]["image_size"]
    elif clip_cfg is not None:
      derived["clip_image_size"] = clip_cfg["image_size"]
    vae_cfg = config_of(parts["vae"]["path"]) if "vae" in parts else None
    dec_cfgs = {s: config_of(e["path"]) for s, e in parts["decoders"].items()}
    if dec_cfgs and vae_cfg is not None and None not in dec_cfgs.values():
      from puma_jax.models import vae as vae_lib

      factor = vae_lib.VAEConfig.from_dict(vae_cfg).downsample_factor
      sizes = {s: c["unet"]["sample_size"] * factor for s, c in dec_cfgs.items()}
      if len(set(sizes.values())) != 1:
        raise ReleaseError(f"the decoders of {self.dst} make images of different sizes {sizes}")
      derived["image_size"] = next(iter(sizes.values()))
    for key, value in derived.items():
      have = self.manifest.get(key)
      if have is None:
        self.manifest[key] = value
      elif have != value:
        raise ReleaseError(
          f"{self.dst / MANIFEST}: key {key!r} is {have} but the parts give "
          f"{value}; the parts do not belong together"
        )
    self.manifest.setdefault("image_size", None)

  def _commit(self) -> None:
    self._fill_sizes()
    if self.into:
      new = {k: v for k, v in _part_entries(self.manifest).items() if k not in self._old_parts}
      validate_manifest(self.manifest, str(self.dst / MANIFEST))
      for rel in new.values():
        target = self.dst / rel
        if target.exists():
          raise ReleaseError(f"{target} appeared while writing; nothing was changed")
      for rel in new.values():
        (self.dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._stage / rel, self.dst / rel)
      write_manifest(self.dst, self.manifest)
      return
    write_manifest(self._stage, self.manifest)
    if self.dst.exists():
      if any(self.dst.iterdir()):
        raise ReleaseError(
          f"{self.dst} was filled while the release was being written; the "
          "new release was discarded"
        )
      self.dst.rmdir()
    os.replace(self._stage, self.dst)
    self._stage = None


def _part_entries(manifest: Mapping) -> dict[str, str]:
  """{part key: relative path} of every part, the tokenizer directory included."""
  parts = manifest["parts"]
  out = {n: parts[n]["path"] for n in SINGLE_PARTS if n in parts}
  out.update({f"decoders.{s}": e["path"] for s, e in parts.get("decoders", {}).items()})
  if manifest.get("tokenizer", BYTE_TOKENIZER) != BYTE_TOKENIZER:
    out["tokenizer"] = manifest["tokenizer"]
  return out
