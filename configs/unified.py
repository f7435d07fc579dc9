"""Unified tuning (PUMA paper, appendix 7.2.4): one model for t2i, editing, conditional
generation and chat.

Variants: tiny (default; synthetic set, CPU) and paper (batch 2048, 30k steps, lr 1e-5, 1k
warm-up, cosine; start from a pretrained PumaModel with --config.init.puma=DIR).

Run:
  python -m puma_jax.main --config=configs/unified.py --workdir=/tmp/puma_unified
  python -m puma_jax.main --config=configs/unified.py:paper --config.init.puma=/ckpt/pretrained \
      --config.tokenizer=/ckpt/llama3_8b --workdir=/ckpt/unified
"""

from puma_jax import config_lib


def get_config(arg: str = "tiny"):
  if arg == "tiny":
    return config_lib.mllm(
      "tiny", lr_llm=1e-3, lr_other=1e-3, warmup=10, steps=200, grad_clip=5.0, data_preset="unified"
    )
  # The paper gives one lr for unified tuning; both groups use it.
  return config_lib.mllm(
    arg, lr_llm=1e-5, lr_other=1e-5, warmup=1000, steps=30_000, grad_clip=5.0, data_preset="unified"
  )
