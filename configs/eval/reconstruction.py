"""Eval: reconstruction -- PSNR and LPIPS per scale at 256x256 (PUMA paper, appendix 8.1:
ImageNet val 50k).

Variants (`--config=configs/eval/reconstruction.py:VARIANT`):
  paper  converted checkpoints (set model.* and metrics.* dirs) on jsonl records (data.path).
  tiny   random-weight tiny PUMA models built in-process, synthetic held-out set, tiny random
         metric networks: the real code path on a CPU (slow: minutes of compilation).
  toy    as tiny but with a parameter-free stand-in generator: seconds.

Run:
  python -m puma_jax.eval --config=configs/eval/reconstruction.py:toy \
      --workdir=/tmp/eval_reconstruction
  python -m puma_jax.eval --config=configs/eval/reconstruction.py:paper --workdir=DIR \
      --config.data.path=records.jsonl --config.model.puma=PUMA_DIR ...
Every field is described in puma_jax/evaluation/config.py.
"""

from puma_jax.evaluation import config


def get_config(arg: str = "toy"):
  return config.base("reconstruction", arg)
