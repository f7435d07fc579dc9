"""Strict type and value checks for the fields converters read from HF/diffusers config.json.

One checker for every family, driven by the annotations of our config dataclasses: a JSON
value must have the field's type (an int is not a bool, `"32"` is not an int), ints are sizes
and must be positive unless listed in `_ANY_INT`, floats must be finite and positive unless
listed in `_ANY_FLOAT`. `build(cls, kw, where)` checks and constructs; every failure is a
`ConversionError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from puma_jax.convert.core import ConversionError

# Integer fields that are not sizes: token ids (HF configs use -1 or 0 for "none") and paddings.
_ANY_INT = re.compile(r".*(_id|_ids|_token_id)$|downsample_padding$")
# Float fields that may be zero or negative.
_ANY_FLOAT = frozenset({"freq_shift", "shift_factor"})


def _annotation_parts(annotation: str) -> list[str]:
  """'int | tuple[int, ...] | None' -> ['int', 'tuple[int, ...]', 'None'] (top-level `|`)."""
  parts, depth, cur = [], 0, ""
  for ch in annotation:
    depth += ch == "["
    depth -= ch == "]"
    if ch == "|" and depth == 0:
      parts.append(cur.strip())
      cur = ""
    else:
      cur += ch
  parts.append(cur.strip())
  return parts


def _fail(where: str, name: str, value: Any, want: str):
  shown = repr(value)
  shown = shown if len(shown) <= 60 else shown[:57] + "..."
  raise ConversionError(f"{where}: {name}={shown} ({type(value).__name__}) must be {want}")


def _check_scalar(kind: str, name: str, value: Any, where: str):
  """Returns the (coerced) value if it fits `kind`, else None; raises on a bad value."""
  if kind == "bool":
    return value if isinstance(value, bool) else None
  if kind == "str":
    return value if isinstance(value, str) else None
  if kind == "int":
    if isinstance(value, bool) or not isinstance(value, int):
      return None
    if value <= 0 and not _ANY_INT.match(name):
      _fail(where, name, value, "a positive integer")
    return value
  if kind == "float":
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return None
    value = float(value)
    if not math.isfinite(value):
      _fail(where, name, value, "a finite number")
    if value <= 0 and name not in _ANY_FLOAT:
      _fail(where, name, value, "a positive number")
    return value
  return None


def _check_tuple(inner: str | None, name: str, value: Any, where: str):
  if not isinstance(value, (list, tuple)):
    return None
  out = []
  for i, v in enumerate(value):
    item = f"{name}[{i}]"
    if isinstance(v, (list, tuple)) and inner is None:  # nested (per-layer) lists
      got = _check_tuple(None, item, v, where)
    elif inner is not None:
      got = _check_scalar(inner, item, v, where)
    else:  # an untyped tuple: ints (sizes) or strings (block types)
      got = (
        _check_scalar("int", item, v, where)
        if isinstance(v, int)
        else _check_scalar("str", item, v, where)
      )
    if got is None:
      _fail(where, item, v, f"{'a ' + inner if inner else 'an int or a string'}")
    out.append(got)
  return tuple(out)


_SCALARS = ("bool", "str", "int", "float")


def check_value(cls: type, name: str, value: Any, where: str) -> Any:
  """The value, checked against (and coerced to) the type of field `name` of `cls`."""
  types = {f.name: f.type for f in dataclasses.fields(cls)}
  if name not in types:
    raise ConversionError(f"{where}: unknown field {name!r} for {cls.__name__}")
  ann = types[name] if isinstance(types[name], str) else getattr(types[name], "__name__", "Any")
  parts = _annotation_parts(ann)
  if value is None:
    if "None" in parts:
      return None
    _fail(where, name, value, f"of type {ann}")
  known = False
  for part in parts:
    if part in _SCALARS:
      known = True
      got = _check_scalar(part, name, value, where)
    elif part == "tuple" or part.startswith("tuple["):
      known = True
      m = re.fullmatch(r"tuple\[(\w+), \.\.\.\]", part)
      got = _check_tuple(m.group(1) if m else None, name, value, where)
    else:
      continue  # nested configs and Any: checked by their own constructors
    if got is not None:
      return got
  if known:
    _fail(where, name, value, f"of type {ann}")
  return value


def check_fields(cls: type, kw: Mapping[str, Any], where: str) -> dict[str, Any]:
  """Every field of `kw` checked (see `check_value`); returns the coerced copy."""
  return {k: check_value(cls, k, v, where) for k, v in kw.items()}


def build(cls: type, kw: Mapping[str, Any], where: str):
  """`cls(**kw)` after the field checks; the constructor's own checks become ConversionErrors."""
  kw = check_fields(cls, kw, where)
  try:
    return cls(**kw)
  except (ValueError, TypeError, ZeroDivisionError) as e:
    raise ConversionError(f"{where}: {e}") from None
