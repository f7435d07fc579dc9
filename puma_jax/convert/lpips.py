"""LPIPS v0.1 (AlexNet) -> `lpips-alex`: torchvision's AlexNet plus lpips's linear heads.

    python -m puma_jax.convert lpips-alex --src=DIR --dst=OUT

`DIR` holds two files, in any names (.pth via `torch.load(weights_only=True)`, or .safetensors):
  - torchvision's AlexNet state dict (`alexnet-owt-7be5be79.pth`: `features.N.*`,
    `classifier.*` skipped), which `lpips` itself loads through torchvision, and
  - the lpips package's head file (`lpips/weights/v0.1/alex.pth`: `linK.model.1.weight`, 1x1
    convolutions of shape (1, C, 1, 1)).
A single file holding an `lpips.LPIPS(net='alex').state_dict()` (`net.sliceS.N.*`,
`linK.model.1.weight`, `lins.K.model.1.weight`, `scaling_layer.*`) is accepted as well. lpips
registers each head twice (as the attribute `linK` and as `lins[K]` of a ModuleList holding the
same modules), so its state dict holds every head under both names: the `lins.K` copy must equal
`linK` and is not read otherwise. The scaling layer's shift/scale are fixed constants of the
method (puma_jax.models.lpips) and are not read from the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from puma_jax.convert.alexnet import feature_rules
from puma_jax.convert.core import ConversionError, Rule, conv1x1_as_linear
from puma_jax.convert.weight_files import read_merged
from puma_jax.models.lpips import LPIPSConfig

FAMILY = "lpips-alex"


def load_config(src: Path) -> LPIPSConfig:
  del src
  return LPIPSConfig()


def rules(config: LPIPSConfig) -> list[Rule]:
  del config
  return feature_rules("features.", "net.") + [
    Rule("classifier.{rest*}", None),
    # lpips's full-module layout: slices keep torchvision's indices.
    Rule("net.slice{s}.{n}.weight", "net.features_{n}.kernel", feature_rules()[0].hook),
    Rule("net.slice{s}.{n}.bias", "net.features_{n}.bias"),
    Rule("scaling_layer.{name}", None),
    # Index 1 after the (parameter-free) Dropout; 0 when lpips is built with use_dropout=False.
    Rule("lin{k}.model.1.weight", "lins.{k}.kernel", conv1x1_as_linear()),
    Rule("lin{k}.model.0.weight", "lins.{k}.kernel", conv1x1_as_linear()),
    # The same heads under their ModuleList name (check_tensors: equal to linK).
    Rule("lins.{k}.model.{i}.weight", None),
  ]


_LINS_COPY = re.compile(r"lins\.(\d+)\.(model\.\d+\.weight)")


def check_tensors(config: LPIPSConfig, tensors: dict, src: Path) -> None:
  """Each `lins.K.model.I.weight` (lpips's second name of a head) equals `linK.model.I.weight`."""
  del config
  for name in sorted(tensors):
    m = _LINS_COPY.fullmatch(name)
    if m is None:
      continue
    twin = f"lin{m.group(1)}.{m.group(2)}"
    if twin not in tensors:
      raise ConversionError(
        f"lpips-alex {src}: {name!r} is lpips's second name of the head {twin!r}, which the "
        "file does not hold"
      )
    if not np.array_equal(np.asarray(tensors[name]), np.asarray(tensors[twin])):
      raise ConversionError(
        f"lpips-alex {src}: {name!r} differs from {twin!r}; lpips stores one head under both "
        "names, so they must be equal"
      )


def read_tensors(src: Path):
  return read_merged(src)
