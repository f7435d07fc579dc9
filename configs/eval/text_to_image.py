"""Eval: text_to_image -- CLIP-I, CLIP-T, LPIPS_d, FID per scale and the 5-scale max (COCO-30K).

Variants (`--config=configs/eval/text_to_image.py:VARIANT`):
  paper  converted checkpoints (set model.* and metrics.* dirs) on jsonl records (data.path).
  tiny   random-weight tiny PUMA models built in-process, synthetic held-out set, tiny random
         metric networks: the real code path on a CPU (slow: minutes of compilation).
  toy    as tiny but with a parameter-free stand-in generator: seconds.

Run:
  python -m puma_jax.eval --config=configs/eval/text_to_image.py:toy \
      --workdir=/tmp/eval_text_to_image
  python -m puma_jax.eval --config=configs/eval/text_to_image.py:paper --workdir=DIR \
      --config.data.path=records.jsonl --config.model.puma=PUMA_DIR ...
Every field is described in puma_jax/evaluation/config.py.
"""

from puma_jax.evaluation import config


def get_config(arg: str = "toy"):
  return config.base("text_to_image", arg)
