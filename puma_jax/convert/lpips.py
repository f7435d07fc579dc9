"""LPIPS v0.1 (AlexNet) -> `lpips-alex`: torchvision's AlexNet plus lpips's linear heads.

    python -m puma_jax.convert lpips-alex --src=DIR --dst=OUT

`DIR` holds two files, in any names (.pth via `torch.load(weights_only=True)`, or .safetensors):
  - torchvision's AlexNet state dict (`alexnet-owt-7be5be79.pth`: `features.N.*`,
    `classifier.*` skipped), which `lpips` itself loads through torchvision, and
  - the lpips package's head file (`lpips/weights/v0.1/alex.pth`: `linK.model.1.weight`, 1x1
    convolutions of shape (1, C, 1, 1)).
A single file holding an `lpips.LPIPS(net='alex').state_dict()` (`net.sliceS.N.*`,
`linK.model.1.weight`, `scaling_layer.*`) is accepted as well. The scaling layer's shift/scale
are fixed constants of the method (puma_jax.models.lpips) and are not read from the file.
"""

from __future__ import annotations

from pathlib import Path

from puma_jax.convert.alexnet import feature_rules
from puma_jax.convert.core import Rule, conv1x1_as_linear
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
  ]


def read_tensors(src: Path):
  return read_merged(src)
