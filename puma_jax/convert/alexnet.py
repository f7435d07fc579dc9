"""torchvision AlexNet state dict (`alexnet-owt-7be5be79.pth`) -> `alexnet` (the `features` trunk).

    python -m puma_jax.convert alexnet --src=alexnet-owt-7be5be79.pth --dst=DIR

`--src` is the .pth (read with `torch.load(weights_only=True)`) or a .safetensors file, or a
directory holding one. The classifier (`classifier.*`) is skipped by explicit rules: LPIPS and
feature extraction use the convolutional trunk only.
"""

from __future__ import annotations

from pathlib import Path

from puma_jax.convert.core import Rule, conv2d
from puma_jax.convert.weight_files import read_merged
from puma_jax.models.alexnet import AlexNetConfig

FAMILY = "alexnet"


def load_config(src: Path) -> AlexNetConfig:
  del src  # torchvision state dicts carry no config; a width mismatch fails on the shapes
  return AlexNetConfig()


def feature_rules(source_prefix: str = "features.", target_prefix: str = "") -> list[Rule]:
  return [
    Rule(source_prefix + "{n}.weight", target_prefix + "features_{n}.kernel", conv2d),
    Rule(source_prefix + "{n}.bias", target_prefix + "features_{n}.bias"),
  ]


def rules(config: AlexNetConfig) -> list[Rule]:
  del config
  return feature_rules() + [Rule("classifier.{rest*}", None)]


def read_tensors(src: Path):
  return read_merged(src)
