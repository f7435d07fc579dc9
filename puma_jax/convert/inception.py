"""pytorch-fid Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> `inception`.

    python -m puma_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth --dst=DIR

Every convolution and batch-norm tensor of the FID Inception is read (BN running statistics
included); the 1008-way `fc` head and `num_batches_tracked` counters are skipped by explicit
rules (FID uses the pool3 features).
"""

from __future__ import annotations

from pathlib import Path

from puma_jax.convert.core import Rule, conv2d
from puma_jax.convert.weight_files import read_merged
from puma_jax.models.inception import InceptionConfig

FAMILY = "inception"


def load_config(src: Path) -> InceptionConfig:
  del src
  return InceptionConfig()


def rules(config: InceptionConfig) -> list[Rule]:
  del config
  return [
    Rule("{block*}.conv.weight", "{block*}.conv.kernel", conv2d),
    Rule("{block*}.bn.weight", "{block*}.bn.scale"),
    Rule("{block*}.bn.bias", "{block*}.bn.bias"),
    Rule("{block*}.bn.running_mean", "{block*}.bn.mean"),
    Rule("{block*}.bn.running_var", "{block*}.bn.var"),
    Rule("{block*}.bn.num_batches_tracked", None),
    Rule("fc.weight", None),
    Rule("fc.bias", None),
  ]


def read_tensors(src: Path):
  return read_merged(src)
