"""Shared builders for the configs in configs/ (every field commented where it is set)."""

from __future__ import annotations

import ml_collections

from puma_jax.data import config as data_config


def mllm(variant: str, *, lr_llm: float, lr_other: float, warmup: int, steps: int,
         grad_clip: float, data_preset: str) -> ml_collections.ConfigDict:
  """The MLLM stage (pretraining or unified tuning) at `variant` tiny | paper."""
  from puma_jax.models import puma
  if variant not in ("tiny", "paper"):
    raise ValueError(f"unknown variant {variant!r}; choose tiny or paper")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.stage = "mllm"            # which task train.py runs (puma_jax/tasks.py)
  c.seed = 0                  # parameter initialization
  c.dtype = "float32" if tiny else "bfloat16"  # compute dtype; parameters stay float32
  c.tokenizer = "byte" if tiny else ""  # "byte" (tiny) or a converted LLaMA dir's tokenizer
  model = puma.tiny() if tiny else puma.paper()
  c.model = ml_collections.ConfigDict(model.to_dict())  # PumaConfig: llm, clip, special ids
  if not tiny:
    c.model.llm.scan_layers = True      # one compiled layer, scanned 32 times
    # Per puma_jax.tools.memory_plan the paper setup (256 x 32 GB, batch 2048, seq 2048) fits
    # only with full remat and 2 microbatches (21.3 GiB/device planned; "dots" needs 212 GiB).
    c.model.llm.remat_policy = "full"
  c.seq_len = 768 if tiny else 2048     # positions per row (an image takes 343)

  c.init = ml_collections.ConfigDict()
  c.init.clip = ""   # converted clip-vision dir (paper: CLIP-L); empty: random init (tiny)
  c.init.llm = ""    # converted llama dir (paper: LLaMA-3-8B); grown by PUMA's 226 tokens
  c.init.puma = ""   # an assembled/trained PumaModel dir (overrides the two above)

  c.data = data_config.get_config("tiny" if tiny else data_preset)
  c.data.batch_size = 8 if tiny else 2048 // 256  # examples per host per step (paper: 2048 total)
  c.data.max_images = 2                 # image slots per row (editing needs 2)
  c.data.num_workers = 0 if tiny else 8  # grain worker processes per host

  c.loss = ml_collections.ConfigDict()
  c.loss.text_weight = 0.02      # PUMA paper, appendix 7.2.1
  c.loss.image_weight = 1.0      # appendix 7.2.1 (per-scale weights 1024..1: puma_jax/sequence.py)
  c.loss.router_weight = 0.1     # (ours) router head's CE weight, docs/DESIGN.md §7

  c.optim = ml_collections.ConfigDict()
  c.optim.lr_groups = ml_collections.ConfigDict({
      "llm": lr_llm,        # the LLaMA backbone
      "default": lr_other,  # projector, embeddings, heads, router
  })
  c.optim.total_steps = steps      # schedule length (= train.total_steps)
  c.optim.warmup_steps = warmup    # linear warm-up
  c.optim.decay = "cosine"         # PUMA paper, appendix 7.2.3 / 7.2.4
  c.optim.end_factor = 0.0         # final lr = peak x end_factor
  c.optim.b1 = 0.9                 # AdamW betas/eps: PyTorch defaults (the paper's AdamW)
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0       # (ours) HF Trainer's default, docs/DESIGN.md §11
  c.optim.grad_clip = grad_clip    # global-norm clipping

  c.train = ml_collections.ConfigDict()
  c.train.total_steps = c.optim.get_ref("total_steps")  # steps to run
  c.train.grad_accum_steps = 1 if tiny else 2  # microbatches per step (= one big batch)
  c.train.log_every = 10 if tiny else 50      # steps between metric lines
  c.train.checkpoint_every = 50 if tiny else 1000  # steps between checkpoints
  c.train.keep_checkpoints = 3     # newest checkpoints kept
  c.train.async_checkpointing = True  # save in the background
  c.train.eval_every = 100 if tiny else 5000  # steps between held-out evaluations (0: never)
  c.train.eval_batches = 2 if tiny else 50    # batches per evaluation
  c.train.same_data_on_hosts = False  # testing only: every host reads the global stream and
                                      # keeps its slice (multi-process == one process)

  c.num_devices = 0  # 0: every device; N: only the first N (single-process debugging, tests)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1} if tiny else
                                     {"data": 1, "fsdp": -1, "tensor": 1})  # -1: the rest

  c.distributed = ml_collections.ConfigDict()
  c.distributed.auto = False             # SLURM / TPU pods: let JAX find the coordinator
  c.distributed.coordinator_address = ""  # host:port of process 0 (else env PUMA_COORDINATOR)
  c.distributed.num_processes = 0        # else env PUMA_NUM_PROCESSES
  c.distributed.process_id = -1          # else env PUMA_PROCESS_ID
  return c
