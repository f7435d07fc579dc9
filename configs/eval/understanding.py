"""Eval: understanding -- short-answer, multiple-choice and MME yes/no scoring (LLaVA-1.5 protocol).

Variants (`--config=configs/eval/understanding.py:VARIANT`):
  paper  converted checkpoints (set model.* and metrics.* dirs) on jsonl records (data.path).
  tiny   random-weight tiny PUMA models built in-process, synthetic held-out set, tiny random
         metric networks: the real code path on a CPU (slow: minutes of compilation).
  toy    as tiny but with a parameter-free stand-in generator: seconds.

Run:
  python -m puma_jax.eval --config=configs/eval/understanding.py:toy \
      --workdir=/tmp/eval_understanding
  python -m puma_jax.eval --config=configs/eval/understanding.py:paper --workdir=DIR \
      --config.data.path=records.jsonl --config.model.puma=PUMA_DIR ...
Every field is described in puma_jax/evaluation/config.py.
"""

from puma_jax.evaluation import config


def get_config(arg: str = "toy"):
  return config.base("understanding", arg)
