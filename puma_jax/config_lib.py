"""Shared builders for the configs in configs/ (every field commented where it is set).

mllm(...)         a whole MLLM-stage config (configs/pretrain.py, configs/unified.py)
optim(...)        the `optim` block (AdamW groups, schedule, clipping)
train(...)        the `train` block (loop, checkpoints, evaluation)
mesh(tiny)        the `mesh` block; distributed() the `distributed` block
demo_block(c)     the train_demo settings of an MLLM config (configs/pretrain.py:demo, unified)
"""

from __future__ import annotations

import ml_collections

from puma_jax.data import config as data_config


def mllm(
  variant: str,
  *,
  lr_llm: float,
  lr_other: float,
  warmup: int,
  steps: int,
  grad_clip: float,
  data_preset: str,
) -> ml_collections.ConfigDict:
  """The MLLM stage (pretraining or unified tuning) at `variant` tiny | paper."""
  from puma_jax.models import puma

  if variant not in ("tiny", "paper"):
    raise ValueError(f"unknown variant {variant!r}; choose tiny or paper")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.stage = "mllm"  # training stage (puma_jax/training/registry.py)
  c.seed = 0  # parameter initialization
  precision_block(c, "float32" if tiny else "auto")
  c.tokenizer = "byte" if tiny else ""  # "byte" (tiny) or a converted LLaMA dir's tokenizer
  model = puma.tiny() if tiny else puma.paper()
  c.model = ml_collections.ConfigDict(model.to_dict())  # PumaConfig: llm, clip, special ids
  if not tiny:
    c.model.llm.scan_layers = True  # one compiled layer, scanned 32 times
    # Per puma_jax.tools.memory_plan the paper setup (256 x 32 GB, batch 2048, seq 2048) fits
    # only with full remat and 2 microbatches (12.6 GiB/device planned; "dots" needs 195 GiB).
    c.model.llm.remat_policy = "full"
  # Positions per row (an image takes 343). Tiny: 896 so that a conditional example (two
  # images, the condition prompt and a caption: 769..839 positions on the shapes set) fits;
  # at 768 that task was skipped every time (rows.check_fit warns about such tasks).
  c.seq_len = 896 if tiny else 2048

  c.init = ml_collections.ConfigDict()
  c.init.clip = ""  # converted clip-vision dir (paper: CLIP-L); empty: random init (tiny)
  c.init.llm = ""  # converted llama dir (paper: LLaMA-3-8B); grown by PUMA's 226 tokens
  c.init.puma = ""  # an assembled/trained PumaModel dir (overrides the two above)

  c.data = data_config.get_config("tiny" if tiny else data_preset)
  c.data.batch_size = 8 if tiny else 2048 // 256  # rows per host per step (paper: 2048 total);
  # with data.pack each row holds several examples
  c.data.max_images = 2  # image slots of unpacked (eval) rows (editing needs 2);
  # packed rows: data.rows.image_slots(seq_len)
  c.data.num_workers = 0 if tiny else 8  # grain worker processes per host

  c.loss = ml_collections.ConfigDict()
  c.loss.text_weight = 0.02  # PUMA paper, appendix 7.2.1
  c.loss.image_weight = 1.0  # PUMA paper, appendix 7.2.1 (per-scale weights 1024..1:
  # puma_jax/sequence.py)
  c.loss.router_weight = 0.1  # (ours) router head's CE weight, docs/DESIGN.md §7
  c.loss.ce_chunk = 256  # positions whose vocabulary logits exist at once in the text CE
  # (0: all at once; docs/DESIGN.md §11, precision and performance)

  c.optim = optim(
    {
      "llm": lr_llm,  # the LLaMA backbone
      "default": lr_other,
    },  # projector, embeddings, heads, router
    total_steps=steps,
    warmup_steps=warmup,
    decay="cosine",  # PUMA paper, appendix 7.2.3 / 7.2.4
    weight_decay=0.0,  # (ours) HF Trainer's default, docs/DESIGN.md §11
    grad_clip=grad_clip,
  )
  c.train = train(
    c.optim,
    grad_accum_steps=1 if tiny else 2,
    log_every=10 if tiny else 50,
    checkpoint_every=50 if tiny else 1000,
    eval_every=100 if tiny else 5000,
    eval_batches=2 if tiny else 50,
  )
  c.num_devices = 0  # 0: every device; N: only the first N (single-process debugging, tests)
  c.mesh = mesh(tiny)
  c.distributed = distributed()
  return c


def demo_block(c: ml_collections.ConfigDict) -> None:
  """What configs/pretrain.py:demo and configs/unified.py:demo share on top of the tiny MLLM:
  a log line and a checkpoint often enough that an interrupted demo loses little, and one
  held-out evaluation at the end over every sequence kind (the eval pass interleaves the
  sources, data.pipeline.build)."""
  c.train.log_every = 25  # steps between metric lines
  c.train.checkpoint_every = 100  # steps between checkpoints (what a resumed demo redoes)
  # held-out evaluation at the end; a derived reference (not the same one), so that setting
  # eval_every leaves total_steps alone
  c.train.eval_every = c.optim.get_ref("total_steps") * 1
  c.train.eval_batches = 6  # 48 held-out examples, each family several times
  # (ours) text CE at full weight: the paper's 0.02 keeps the text ability of a pretrained
  # LLaMA-3 (PUMA paper, appendix 7.2.1); the demo's LLM starts from random weights and must
  # learn the language first. Measured on the demo pretraining: text CE 1.93 at step 100
  # against 2.90 with 0.02, image MSE unchanged (1.08 / 1.06); docs/DESIGN.md §11
  c.loss.text_weight = 1.0


def precision_block(c: ml_collections.ConfigDict, default: str) -> None:
  """The compute-precision fields of a training config (puma_jax/precision.py)."""
  c.precision = default  # auto | bfloat16 | float16 | float32; auto: float16 on V100-class
  # GPUs, bfloat16 on A100+/TPU, float32 on CPU. Weights stay float32
  c.loss_scale = ml_collections.ConfigDict()  # dynamic loss scaling, float16 only
  c.loss_scale.initial = 2.0**15  # first scale
  c.loss_scale.period = 2000  # finite steps in a row before the scale grows
  c.loss_scale.factor = 2.0  # growth on `period` good steps, division on an overflow
  c.attention = "auto"  # attention kernel: auto | xla | cudnn | splash (models/layers.py)


def optim(
  lr_groups: dict,
  *,
  total_steps: int,
  warmup_steps: int,
  decay: str,
  weight_decay: float,
  grad_clip: float,
) -> ml_collections.ConfigDict:
  """The `optim` block (puma_jax/training/optim.py)."""
  o = ml_collections.ConfigDict()
  o.lr_groups = ml_collections.ConfigDict(lr_groups)  # peak lr per group (first path component)
  o.total_steps = total_steps  # schedule length (= train.total_steps)
  o.warmup_steps = warmup_steps  # linear warm-up
  o.decay = decay  # after warm-up: cosine | linear | constant
  o.end_factor = 0.0  # final lr = peak x end_factor
  o.b1 = 0.9  # AdamW betas/eps: PyTorch defaults (the paper's AdamW)
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = weight_decay  # on matrices only
  o.grad_clip = grad_clip  # global-norm clipping (0: none)
  return o


def train(
  optim_block: ml_collections.ConfigDict,
  *,
  grad_accum_steps: int,
  log_every: int,
  checkpoint_every: int,
  eval_every: int,
  eval_batches: int,
) -> ml_collections.ConfigDict:
  """The `train` block (puma_jax/training/loop.py); total_steps follows optim.total_steps."""
  t = ml_collections.ConfigDict()
  t.total_steps = optim_block.get_ref("total_steps")  # steps to run
  t.grad_accum_steps = grad_accum_steps  # microbatches per step (= one big batch)
  t.log_every = log_every  # steps between metric lines
  t.checkpoint_every = checkpoint_every  # steps between checkpoints
  t.keep_checkpoints = 3  # newest checkpoints kept
  t.async_checkpointing = True  # save in the background
  t.eval_every = eval_every  # steps between held-out evaluations (0: never)
  t.eval_batches = eval_batches  # batches per evaluation
  t.same_data_on_hosts = False  # testing only: every host reads the global stream and
  # keeps its slice (multi-process == one process)
  return t


def mesh(tiny: bool) -> ml_collections.ConfigDict:
  """The `mesh` block: data parallel for the toy configs, FSDP over every device for the
  paper's. -1: the axis takes the remaining devices."""
  return ml_collections.ConfigDict(
    {"data": -1, "fsdp": 1, "tensor": 1} if tiny else {"data": 1, "fsdp": -1, "tensor": 1}
  )


def distributed() -> ml_collections.ConfigDict:
  """The `distributed` block (puma_jax/distributed.py)."""
  d = ml_collections.ConfigDict()
  d.auto = False  # SLURM / TPU pods: let JAX find the coordinator
  d.coordinator_address = ""  # host:port of process 0 (else env PUMA_COORDINATOR)
  d.num_processes = 0  # else env PUMA_NUM_PROCESSES
  d.process_id = -1  # else env PUMA_PROCESS_ID
  return d
