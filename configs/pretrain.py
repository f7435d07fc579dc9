"""MLLM pretraining (PUMA paper, appendix 7.2.2-7.2.3; docs/DESIGN.md §11).

Variants (`--config=configs/pretrain.py:VARIANT`):
  tiny   (default) toy PumaModel on the built-in synthetic set; a few minutes on a 2-core CPU.
  demo   the tiny PUMA of `python -m puma_jax.tools.train_demo`: the toy PumaModel on the
         32-px synthetic set's pretraining families (pairs -> t2i / i2t, grounding, text,
         chat), reading the demo's shared CLIP (--config.init.clip=W/parts/clip, frozen).
  paper  LLaMA-3-8B + CLIP-L, batch 2048, 100k steps, lr 1e-4 projectors / 3e-5 LLaMA, 2k
         warm-up, cosine, clip 5.0, FSDP over every device. Set --config.init.clip/.llm (or
         .puma), --config.tokenizer and the data paths.

Run:
  python -m puma_jax.main --config=configs/pretrain.py --workdir=/tmp/puma_pretrain
  python -m puma_jax.main --config=configs/pretrain.py:paper --workdir=/ckpt/pretrain \
      --config.init.clip=/ckpt/clip_l14 --config.init.llm=/ckpt/llama3_8b \
      --config.tokenizer=/ckpt/llama3_8b \
      --config.data.sources.pairs.paths=/data/laion/{00000..09999}.tar
"""

from puma_jax import config_lib


def get_config(arg: str = "tiny"):
  if arg == "demo":
    return demo()
  if arg == "tiny":
    c = config_lib.mllm(
      "tiny",
      lr_llm=2e-3,
      lr_other=2e-3,
      warmup=10,
      steps=150,
      grad_clip=5.0,
      data_preset="pretrain",
    )
  else:
    c = config_lib.mllm(
      arg,
      lr_llm=3e-5,
      lr_other=1e-4,
      warmup=2000,
      steps=100_000,
      grad_clip=5.0,
      data_preset="pretrain",
    )
  return c


def demo():
  """Pretraining of the train_demo PUMA (its budget and measured figures: the docstring of
  puma_jax/tools/train_demo.py)."""
  c = config_lib.mllm(
    "tiny",
    lr_llm=2e-3,
    lr_other=2e-3,
    warmup=20,
    steps=DEMO_STEPS,
    grad_clip=5.0,
    data_preset="pretrain",
  )
  # The paper's pretraining mix (appendix 7.2.2): editing and conditional generation wait for
  # unified tuning.
  c.data.sources.edit.weight = 0.0
  c.data.sources.conditional.weight = 0.0
  config_lib.demo_block(c)
  return c


DEMO_STEPS = 400  # optimizer steps of configs/pretrain.py:demo (1.6 steps/s on 2 idle cores)
