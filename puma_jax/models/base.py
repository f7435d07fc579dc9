"""Model configs: frozen dataclasses that round-trip through JSON and reject unknown fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound="ModelConfig")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Base class; subclasses are frozen dataclasses whose fields are JSON values."""

  @classmethod
  def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def replace(self: T, **kw) -> T:
    return dataclasses.replace(self, **kw)
