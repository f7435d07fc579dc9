"""Assemble a PumaModel checkpoint from converted parts (docs/DESIGN.md §6).

    python -m puma_jax.assemble --clip=CLIP_DIR --llm=LLAMA_DIR --dst=OUT [--tokenizer=byte|DIR]

CLIP and LLaMA come from `python -m puma_jax.convert clip-vision|llama`; the projector, scale
and position embeddings and heads are newly initialized. When the PUMA vocabulary is larger than
the LLaMA checkpoint's (PUMA adds [IMG], [/IMG] and 224 position tokens), the new embedding and
output rows start at the mean of the old ones. The result is one orbax checkpoint
(`checkpoints.load_module(OUT)` returns the PumaModel). The five decoders stay separate
checkpoints (one per scale; see puma_jax.convert puma-decoder).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from puma_jax import checkpoints, cli, tokenizer
from puma_jax.convert.core import flatten_state, unflatten_state


def _copy(dst_module: nnx.Module, src_module: nnx.Module, what: str) -> None:
  """Copies every parameter of src into dst (same paths and shapes)."""
  dst_state = nnx.state(dst_module, nnx.Param)
  src_flat = flatten_state(nnx.to_pure_dict(nnx.state(src_module, nnx.Param)))
  dst_pure = nnx.to_pure_dict(dst_state)
  dst_flat = flatten_state(dst_pure)
  if set(src_flat) != set(dst_flat):
    raise ValueError(
      f"{what}: parameter names differ: missing "
      f"{sorted(set(dst_flat) - set(src_flat))[:5]}, unexpected "
      f"{sorted(set(src_flat) - set(dst_flat))[:5]}"
    )
  out = {}
  for k, d in dst_flat.items():
    s = np.asarray(src_flat[k])
    if s.shape != d.shape:
      raise ValueError(
        f"{what}: parameter {k} has shape {s.shape} in the checkpoint, "
        f"{tuple(d.shape)} in the model"
      )
    out[k] = jnp.asarray(s, d.dtype)
  nnx.replace_by_pure_dict(dst_state, unflatten_state(out, dst_pure))
  nnx.update(dst_module, dst_state)


def load_components(model, *, clip_dir: str = "", llm_dir: str = "", puma_dir: str = "") -> None:
  """Fills a PumaModel in place from converted checkpoints (any subset)."""
  if puma_dir:
    src = checkpoints.load_module(puma_dir, family="puma")
    if src.config != model.config:
      raise ValueError(f"{puma_dir}: PumaModel config differs from the configured model")
    _copy(model, src, puma_dir)
    return
  if clip_dir:
    src = checkpoints.load_module(clip_dir, family="clip-vision")
    if src.config != model.config.clip:
      raise ValueError(
        f"{clip_dir}: CLIP config {src.config} differs from config.model.clip {model.config.clip}"
      )
    _copy(model.clip, src, clip_dir)
  if llm_dir:
    src = checkpoints.load_module(llm_dir, family="llama")
    want = model.config.llm
    if (
      src.config.replace(
        vocab_size=want.vocab_size,
        scan_layers=want.scan_layers,
        remat_policy=want.remat_policy,
        max_position_embeddings=want.max_position_embeddings,
      )
      != want
    ):
      raise ValueError(
        f"{llm_dir}: LLaMA config {src.config} does not match config.model.llm "
        f"{want} (beyond vocab_size)"
      )
    if src.config.scan_layers != want.scan_layers:
      from puma_jax.models import llama

      src = llama.set_scan_layers(src, want.scan_layers)
    # PUMA's added tokens: new embedding/output rows start at the mean of the old ones.
    _copy(model.llm, tokenizer.resize_token_embeddings(src, want.vocab_size), llm_dir)


def _check_token_ids(tok, cfg, where: str) -> None:
  """The model config places [IMG], [/IMG] and the position tokens right after the LLaMA
  vocabulary; a tokenizer numbering them otherwise would feed the wrong embedding rows."""
  got = {"img_start_id": tok.img_start_id, "img_end_id": tok.img_end_id, "pos0_id": tok.pos_ids[0]}
  bad = [
    f"{k}: tokenizer {v}, model {getattr(cfg, k)}" for k, v in got.items() if v != getattr(cfg, k)
  ]
  if bad:
    raise ValueError(
      f"{where}: PUMA token ids differ from the model's ({bad}); use the "
      "tokenizer of the --llm checkpoint"
    )


def assemble(clip_dir, llm_dir, *, router: bool = False, seed: int = 0):
  """(PumaConfig, PumaModel) from converted CLIP and LLaMA dirs: PUMA's 226 tokens ([IMG],
  [/IMG], 224 positions) get the ids right after the LLaMA vocabulary, in that order, as
  `tokenizer.PumaTokenizer` adds them to the LLaMA tokenizer."""
  from puma_jax.models import puma

  _, clip_cfg = checkpoints.load_config(clip_dir)
  _, llm_cfg = checkpoints.load_config(llm_dir)
  v = llm_cfg.vocab_size
  cfg = puma.PumaConfig(
    llm=llm_cfg.replace(vocab_size=v + 226),
    clip=clip_cfg,
    img_start_id=v,
    img_end_id=v + 1,
    pos0_id=v + 2,
    pad_id=llm_cfg.pad_token_id if llm_cfg.pad_token_id is not None else llm_cfg.eos_token_ids[0],
    router=router,
  )
  model = puma.PumaModel(cfg, rngs=nnx.Rngs(seed))
  load_components(model, clip_dir=str(clip_dir), llm_dir=str(llm_dir))
  return cfg, model


# Own flag set, so that importing this module (tests, notebooks) defines no global flags.
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "clip", None, "converted clip-vision directory", flag_values=FLAGS, required=True
)
flags.DEFINE_string("llm", None, "converted llama directory", flag_values=FLAGS, required=True)
flags.DEFINE_string(
  "dst", None, "output directory for the PumaModel", flag_values=FLAGS, required=True
)
flags.DEFINE_boolean("router", False, "add the learned scale-router head", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the newly initialized parts", flag_values=FLAGS)
flags.DEFINE_string(
  "tokenizer",
  "byte",
  "'byte' (nothing stored) or an HF tokenizer directory "
  "(usually the LLaMA source): saved into --dst with PUMA's tokens, whose ids "
  "must match the model's",
  flag_values=FLAGS,
)


def _main(argv: list[str]) -> int:
  f = FLAGS
  cfg, model = assemble(f.clip, f.llm, router=f.router, seed=f.seed)
  tok = None
  if f.tokenizer != "byte":
    tok = tokenizer.PumaTokenizer.from_dir(f.tokenizer)
    _check_token_ids(tok, cfg, f"--tokenizer={f.tokenizer}")
  checkpoints.save_module(f.dst, "puma", cfg, model)
  if tok is not None:
    tok.save(f.dst)
  print(f"assembled PumaModel -> {f.dst}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  import sys

  argv = sys.argv if argv is None else ["python -m puma_jax.assemble", *argv]
  return cli.run(
    _main,
    argv,
    flag_values=FLAGS,
    doc=__doc__,
    expected=(ValueError, FileNotFoundError, checkpoints.CheckpointError),
  )


if __name__ == "__main__":
  raise SystemExit(main())
