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
conv2d = Hook(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1),
              "conv2d")  # torch (O, I, kh, kw) <-> ours (kh, kw, I, O)


def conv1x1_as_linear() -> Hook:
  """A torch 1x1 conv (O, I, 1, 1) or linear (O, I) stored into our (I, O) dense kernel."""
  return Hook(lambda x: x.reshape(x.shape[0], x.shape[1]).T, lambda x: x.T, "conv1x1_as_linear")


# ----------------------------------------------------------------------------------------------
# Rules


_PLACEHOLDER = re.compile(r"\{(\w+)(\*?)\}")


def _template_regex(template: str) -> re.Pattern:
  parts, pos = [], 0
  for m in _PLACEHOLDER.finditer(template):
    parts.append(re.escape(template[pos:m.start()]))
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
    object.__setattr__(self, "_dst_re",
                       _template_regex(self.target) if self.target is not None else None)

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
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


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
      raise ConversionError(f"{path}: truncated safetensors file (header of {n} bytes, "
                            f"file has {size})")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
  header.pop("__metadata__", None)
  data_start = 8 + n
  data_len = size - data_start
  mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) \
      if data_len else np.zeros((0,), np.uint8)
  out = {}
  for name, info in header.items():
    dt = info.get("dtype")
    if dt not in _ST_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
    begin, end = info["data_offsets"]
    if end > data_len:
      raise ConversionError(f"{path}: truncated safetensors file: tensor {name!r} needs bytes "
                            f"{begin}..{end} of the data section but it has {data_len}")
    dtype = np.dtype(_ST_DTYPES[dt])
    shape = tuple(info["shape"])
    if (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ConversionError(f"{path}: tensor {name!r}: byte range does not match shape {shape}")
    out[name] = mm[begin:end].view(dtype).reshape(shape)
  return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes numpy arrays (bfloat16 included) as a .safetensors file."""
  inv = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in inv:
      raise ConversionError(f"cannot write tensor {name!r} of dtype {a.dtype}")
    header[name] = {"dtype": inv[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
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
    raise ConversionError(f"{path}: reading .bin checkpoints needs PyTorch "
                          "(pip install -r requirements-test.txt), or convert it to safetensors"
                          ) from None
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # the message of torch's unpickler is already specific
    raise ConversionError(f"{path}: cannot read PyTorch checkpoint safely: {e}") from None
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  out = {}
  for k, v in sd.items():
    if not hasattr(v, "detach"):
      raise ConversionError(f"{path}: entry {k!r} is not a tensor ({type(v).__name__})")
    v = v.detach().cpu()
    if v.dtype == torch.bfloat16:
      out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[k] = v.numpy()
  return out


WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")


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
      src.glob("*.bin.index.json")):
    index = json.loads(index_name.read_text())
    files = sorted(set(index.get("weight_map", {}).values()))
    if not files:
      raise ConversionError(f"{index_name}: index has no weight_map")
    out: dict[str, np.ndarray] = {}
    for fname in files:
      fpath = src / fname
      if not fpath.exists():
        raise ConversionError(f"{index_name} names shard {fname}, which is missing from {src}")
      part = read_safetensors(fpath) if fname.endswith(".safetensors") else read_torch_bin(fpath)
      dup = set(out) & set(part)
      if dup:
        raise ConversionError(f"{fpath}: tensors also present in another shard: {sorted(dup)[:5]}")
      out.update(part)
    missing = set(index["weight_map"]) - set(out)
    if missing:
      raise ConversionError(f"{index_name}: tensors listed in the index but absent from the "
                            f"shards: {sorted(missing)[:5]}")
    return out
  for name in WEIGHT_FILES:
    if (src / name).exists():
      p = src / name
      return read_safetensors(p) if name.endswith(".safetensors") else read_torch_bin(p)
  found = sorted(p.name for p in src.iterdir())
  raise ConversionError(f"{src}: no weights found (looked for an index, {', '.join(WEIGHT_FILES)});"
                        f" the directory holds {found[:10]}")


def read_json(path: str | os.PathLike) -> dict:
  path = Path(path)
  if not path.exists():
    raise ConversionError(f"{path} is missing")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: invalid JSON ({e})") from None


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


def map_to_target(tensors: Mapping[str, np.ndarray], rules: Iterable[Rule],
                  target_shapes: Mapping[str, tuple[tuple[int, ...], Any]],
                  what: str = "checkpoint") -> dict[str, np.ndarray]:
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
        raise ConversionError(f"{what}: tensor {name!r} maps to {path!r}, which the model (as "
                              "configured) does not have; does the config match the weights?")
      if path in filled:
        raise ConversionError(f"{what}: tensors {origin[path]!r} and {name!r} both map to {path!r}")
      arr = rule.hook.forward(np.asarray(tensors[name]))
      shape, dtype = target_shapes[path]
      if tuple(arr.shape) != tuple(shape):
        raise ConversionError(f"{what}: tensor {name!r} has shape {tuple(tensors[name].shape)} "
                              f"({tuple(arr.shape)} after {rule.hook.name}), but parameter "
                              f"{path!r} needs {tuple(shape)}")
      filled[path] = np.asarray(arr, dtype=dtype)
      origin[path] = name
      break
    else:
      unexpected.append(name)
  if unexpected:
    raise ConversionError(f"{what}: {len(unexpected)} unexpected tensor(s) that no rule maps: "
                          f"{unexpected[:8]}")
  missing = sorted(set(target_shapes) - set(filled))
  if missing:
    expected = [source_name(rules, p) or "?" for p in missing[:8]]
    raise ConversionError(f"{what}: {len(missing)} parameter(s) not filled; missing source "
                          f"tensor(s) {expected} (for {missing[:8]})")
  return filled


def source_name(rules: Iterable[Rule], path: str) -> str | None:
  for rule in rules:
    groups = rule.match_target(path)
    if groups is not None:
      return _fill(rule.source, groups)
  return None


def map_to_source(flat_params: Mapping[str, np.ndarray],
                  rules: Iterable[Rule]) -> dict[str, np.ndarray]:
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
