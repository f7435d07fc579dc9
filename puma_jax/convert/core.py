"""The conversion machinery shared by every weight family.

A family is described by a `Family`: how to read its config, how to build its module, and a
name table of `Rule`s. A rule pairs a source-name template with a target-path template, e.g.

    Rule("vision_model.encoder.layers.{i}.mlp.fc1.weight",
         "encoder.layers.{i}.mlp.fc1.kernel", linear)

Placeholders (`{i}`, `{name}`) match one dotted component (`{rest*}` matches one or more) and
carry over to the other side, so a
table works in both directions: import (source -> ours) and export (ours -> source). A hook turns
the source array into ours (transposes, conv layout); its `inverse` goes back.

Conversion is strict: every source tensor must be consumed by a rule (or explicitly skipped by a
rule whose target is None), every target parameter must be filled exactly once, and every shape
must match. Errors name the tensor, the parameter and the shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class ConversionError(ValueError):
  """Raised for any problem with a source checkpoint; the message names what is wrong."""


# ----------------------------------------------------------------------------------------------
# Hooks


@dataclasses.dataclass(frozen=True)
class Hook:
  forward: Callable[[np.ndarray], np.ndarray]
  inverse: Callable[[np.ndarray], np.ndarray]
  name: str = "hook"


identity = Hook(lambda x: x, lambda x: x, "identity")
linear = Hook(lambda x: x.T, lambda x: x.T, "linear")  # torch (out, in) <-> ours (in, out)
conv2d = Hook(
  lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1), "conv2d"
)  # torch (O, I, kh, kw) <-> ours (kh, kw, I, O)


def conv1x1_as_linear() -> Hook:
  """A torch 1x1 conv (O, I, 1, 1) or linear (O, I) stored into our (I, O) dense kernel."""
  return Hook(lambda x: x.reshape(x.shape[0], x.shape[1]).T, lambda x: x.T, "conv1x1_as_linear")


# ----------------------------------------------------------------------------------------------
# Rules


_PLACEHOLDER = re.compile(r"\{(\w+)(\*?)\}")


def _template_regex(template: str) -> re.Pattern:
  parts, pos = [], 0
  for m in _PLACEHOLDER.finditer(template):
    parts.append(re.escape(template[pos : m.start()]))
    parts.append(f"(?P<{m.group(1)}>{'.+' if m.group(2) else '[^.]+'})")
    pos = m.end()
  parts.append(re.escape(template[pos:]))
  return re.compile("".join(parts) + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
  """`source` -> `target` (None: the source tensor is deliberately not used), through `hook`."""

  source: str
  target: str | None
  hook: Hook = identity

  def __post_init__(self):
    object.__setattr__(self, "_src_re", _template_regex(self.source))
    object.__setattr__(
      self, "_dst_re", _template_regex(self.target) if self.target is not None else None
    )

  def match_source(self, name: str) -> dict[str, str] | None:
    m = self._src_re.match(name)
    return m.groupdict() if m else None

  def match_target(self, path: str) -> dict[str, str] | None:
    if self._dst_re is None:
      return None
    m = self._dst_re.match(path)
    return m.groupdict() if m else None


def _fill(template: str, groups: Mapping[str, str]) -> str:
  return _PLACEHOLDER.sub(lambda m: groups[m.group(1)], template)


# ----------------------------------------------------------------------------------------------
# Reading source checkpoints

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}


def _safetensors_entries(header: Any, path: Path, data_len: int) -> dict[str, tuple]:
  """Checks a parsed safetensors header as the official loader does: an object of tensors,
  each with a known dtype, a shape of non-negative ints and in-range `data_offsets` whose byte
  count matches the shape, no two tensors sharing bytes. Returns name -> (dtype, shape, b, e)."""
  if not isinstance(header, dict):
    raise ConversionError(
      f"{path}: safetensors header is a JSON {type(header).__name__}, not an object of tensors"
    )
  meta = header.pop("__metadata__", None)
  if meta is not None and not isinstance(meta, dict):
    raise ConversionError(
      f"{path}: safetensors __metadata__ is a JSON {type(meta).__name__}, not an object"
    )
  out = {}
  for name, info in header.items():
    if not isinstance(info, dict):
      raise ConversionError(
        f"{path}: tensor {name!r}: header entry is a JSON {type(info).__name__}, not an object"
      )
    for key in ("dtype", "shape", "data_offsets"):
      if key not in info:
        raise ConversionError(f"{path}: tensor {name!r}: header entry lacks {key!r}")
    dt, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dt, str) or dt not in _ST_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(shape, list) or not all(map(is_int, shape)):
      raise ConversionError(
        f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers"
      )
    if not (
      isinstance(offsets, list)
      and len(offsets) == 2
      and all(map(is_int, offsets))
      and offsets[0] <= offsets[1]
    ):
      raise ConversionError(
        f"{path}: tensor {name!r}: data_offsets {offsets!r} is not "
        "[begin, end] with 0 <= begin <= end"
      )
    begin, end = offsets
    if end > data_len:
      raise ConversionError(
        f"{path}: truncated safetensors file: tensor {name!r} needs bytes "
        f"{begin}..{end} of the data section but it has {data_len}"
      )
    dtype = np.dtype(_ST_DTYPES[dt])
    if (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ConversionError(
        f"{path}: tensor {name!r}: byte range does not match shape {tuple(shape)}"
      )
    out[name] = (dtype, tuple(shape), begin, end)
  spans = sorted((b, e, n) for n, (_, _, b, e) in out.items() if e > b)
  for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
    if b1 < e0:
      raise ConversionError(
        f"{path}: tensors {n0!r} (bytes {b0}..{e0}) and {n1!r} (bytes "
        f"{b1}..{e1}) overlap in the data section"
      )
  return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy (memory-mapped), checking it is complete.

  Our own reader (the format is a length-prefixed JSON header plus raw bytes) so that bfloat16
  loads without torch and a truncated file is reported as such.
  """
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise ConversionError(
        f"{path}: truncated safetensors file (header of {n} bytes, file has {size})"
      )
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
  data_start = 8 + n
  data_len = size - data_start
  entries = _safetensors_entries(header, path, data_len)
  mm = (
    np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
    if data_len
    else np.zeros((0,), np.uint8)
  )
  return {
    name: mm[b:e].view(dtype).reshape(shape) for name, (dtype, shape, b, e) in entries.items()
  }


def write_safetensors(
  tensors: Mapping[str, np.ndarray],
  path: str | os.PathLike,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes numpy arrays (bfloat16 included) as a .safetensors file."""
  inv = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in inv:
      raise ConversionError(f"cannot write tensor {name!r} of dtype {a.dtype}")
    header[name] = {
      "dtype": inv[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + a.nbytes],
    }
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict safely (`weights_only=True`: no arbitrary unpickling)."""
  try:
    import torch
  except ImportError:
    raise ConversionError(
      f"{path}: reading .bin checkpoints needs PyTorch "
      "(pip install -r requirements-test.txt), or convert it to safetensors"
    ) from None
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # the message of torch's unpickler is already specific
    raise ConversionError(f"{path}: cannot read PyTorch checkpoint safely: {e}") from None
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise ConversionError(
      f"{path}: holds a {type(sd).__name__}, not a state dict (a mapping "
      "of tensor names to tensors)"
    )
  out = {}
  for k, v in sd.items():
    if not isinstance(k, str):
      raise ConversionError(
        f"{path}: state dict key {k!r} is a {type(k).__name__}, not a tensor name"
      )
    if not hasattr(v, "detach"):
      raise ConversionError(f"{path}: entry {k!r} is not a tensor ({type(v).__name__})")
    v = v.detach().cpu()
    if v.dtype == torch.bfloat16:
      out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[k] = v.numpy()
  return out


WEIGHT_FILES = (
  "model.safetensors",
  "diffusion_pytorch_model.safetensors",
  "pytorch_model.bin",
  "diffusion_pytorch_model.bin",
)


def read_checkpoint(src: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a local HF/diffusers directory (or a single weights file).

  Looks for, in order: a sharded `*.safetensors.index.json`, a single `*.safetensors`, a sharded
  `*.bin.index.json`, a single `.bin`.
  """
  src = Path(src)
  if not src.exists():
    raise ConversionError(f"source {src} does not exist")
  if src.is_file():
    return read_safetensors(src) if src.suffix == ".safetensors" else read_torch_bin(src)
  for index_name in sorted(src.glob("*.safetensors.index.json")) + sorted(
    src.glob("*.bin.index.json")
  ):
    return read_indexed(index_name, src)
  for name in WEIGHT_FILES:
    if (src / name).exists():
      p = src / name
      return read_safetensors(p) if name.endswith(".safetensors") else read_torch_bin(p)
  found = sorted(p.name for p in src.iterdir())
  raise ConversionError(
    f"{src}: no weights found (looked for an index, {', '.join(WEIGHT_FILES)});"
    f" the directory holds {found[:10]}"
  )


def read_index(index_path: str | os.PathLike, src: str | os.PathLike) -> dict[str, str]:
  """The `weight_map` (tensor name -> shard file) of a sharded checkpoint's index, checked:
  an object of strings, every shard a relative path inside `src`."""
  index_path, root = Path(index_path), Path(src).resolve()
  index = read_json(index_path)
  wm = index.get("weight_map")
  if not isinstance(wm, dict) or not wm:
    raise ConversionError(
      f"{index_path}: index has no weight_map (an object of tensor name -> shard file)"
    )
  for name, fname in wm.items():
    if not isinstance(fname, str) or not fname:
      raise ConversionError(f"{index_path}: weight_map[{name!r}] is {fname!r}, not a file name")
    target = (root / fname).resolve()
    if Path(fname).is_absolute() or root not in target.parents:
      raise ConversionError(
        f"{index_path}: weight_map[{name!r}] names {fname!r}, which is "
        f"outside the source directory {src}"
      )
  return wm


def read_indexed(
  index_path: str | os.PathLike,
  src: str | os.PathLike,
  read_file: Callable[[Path], dict] | None = None,
) -> dict[str, np.ndarray]:
  """All tensors of a sharded checkpoint; each shard read by `read_file` (default by suffix)."""
  src = Path(src)
  weight_map = read_index(index_path, src)
  out: dict[str, np.ndarray] = {}
  for fname in sorted(set(weight_map.values())):
    fpath = src / fname
    if not fpath.exists():
      raise ConversionError(f"{index_path} names shard {fname}, which is missing from {src}")
    part = (
      read_file(fpath)
      if read_file
      else (read_safetensors(fpath) if fname.endswith(".safetensors") else read_torch_bin(fpath))
    )
    dup = set(out) & set(part)
    if dup:
      raise ConversionError(f"{fpath}: tensors also present in another shard: {sorted(dup)[:5]}")
    out.update(part)
  missing = set(weight_map) - set(out)
  if missing:
    raise ConversionError(
      f"{index_path}: tensors listed in the index but absent from the shards: {sorted(missing)[:5]}"
    )
  return out


def read_json(path: str | os.PathLike) -> dict:
  """A JSON file that must hold an object (config.json, an index)."""
  path = Path(path)
  if not path.exists():
    raise ConversionError(f"{path} is missing")
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ConversionError(f"{path}: holds a JSON {type(data).__name__}, not an object")
  return data


def public_config(d: Mapping[str, Any]) -> dict:
  """A diffusers config dict without its private keys: any key starting with `_`
  (`_class_name`, `_diffusers_version`, `_name_or_path`, `_use_default_values`, ...) is metadata
  about the file, never a setting of the model, so it must not stop a conversion."""
  return {k: v for k, v in d.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------
# Applying a table


def flatten_state(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested pure dict (as `nnx.to_pure_dict` gives) -> {"a.b.0.kernel": leaf}."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_state(v, key + "."))
    else:
      out[key] = v
  return out


def unflatten_state(flat: Mapping[str, Any], like: Mapping) -> dict:
  """Inverse of `flatten_state`, keeping the key types (int list indices) of `like`."""

  def build(node, prefix):
    out = {}
    for k, v in node.items():
      key = f"{prefix}{k}"
      out[k] = build(v, key + ".") if isinstance(v, Mapping) else flat[key]
    return out

  return build(like, "")


def map_to_target(
  tensors: Mapping[str, np.ndarray],
  rules: Iterable[Rule],
  target_shapes: Mapping[str, tuple[tuple[int, ...], Any]],
  what: str = "checkpoint",
) -> dict[str, np.ndarray]:
  """Maps source tensors onto target paths strictly. `target_shapes`: path -> (shape, dtype)."""
  rules = list(rules)
  filled: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  unexpected = []
  for name in sorted(tensors):
    for rule in rules:
      groups = rule.match_source(name)
      if groups is None:
        continue
      if rule.target is None:
        break
      path = _fill(rule.target, groups)
      if path not in target_shapes:
        raise ConversionError(
          f"{what}: tensor {name!r} maps to {path!r}, which the model (as "
          "configured) does not have; does the config match the weights?"
        )
      if path in filled:
        raise ConversionError(f"{what}: tensors {origin[path]!r} and {name!r} both map to {path!r}")
      arr = rule.hook.forward(np.asarray(tensors[name]))
      shape, dtype = target_shapes[path]
      if tuple(arr.shape) != tuple(shape):
        raise ConversionError(
          f"{what}: tensor {name!r} has shape {tuple(tensors[name].shape)} "
          f"({tuple(arr.shape)} after {rule.hook.name}), but parameter "
          f"{path!r} needs {tuple(shape)}"
        )
      filled[path] = np.asarray(arr, dtype=dtype)
      origin[path] = name
      break
    else:
      unexpected.append(name)
  if unexpected:
    raise ConversionError(
      f"{what}: {len(unexpected)} unexpected tensor(s) that no rule maps: {unexpected[:8]}"
    )
  missing = sorted(set(target_shapes) - set(filled))
  if missing:
    expected = [source_name(rules, p) or "?" for p in missing[:8]]
    raise ConversionError(
      f"{what}: {len(missing)} parameter(s) not filled; missing source "
      f"tensor(s) {expected} (for {missing[:8]})"
    )
  return filled


def source_name(rules: Iterable[Rule], path: str) -> str | None:
  for rule in rules:
    groups = rule.match_target(path)
    if groups is not None:
      return _fill(rule.source, groups)
  return None


def map_to_source(
  flat_params: Mapping[str, np.ndarray], rules: Iterable[Rule]
) -> dict[str, np.ndarray]:
  """Export: our flat parameters -> source-format tensors, through the inverse hooks."""
  rules = list(rules)
  out = {}
  for path in sorted(flat_params):
    for rule in rules:
      groups = rule.match_target(path)
      if groups is not None:
        out[_fill(rule.source, groups)] = rule.hook.inverse(np.asarray(flat_params[path]))
        break
    else:
      raise ConversionError(f"export: parameter {path!r} has no rule")
  return out
