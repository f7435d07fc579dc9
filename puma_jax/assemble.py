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
from absl import app, flags
from flax import nnx

from puma_jax import checkpoints, cli
from puma_jax.convert.core import flatten_state


def _copy(dst_module: nnx.Module, src_module: nnx.Module, what: str, grow_rows=()) -> None:
  """Copies every parameter of src into dst (same paths); rows of `grow_rows` parameters may
  be fewer in src (vocabulary growth: new rows = mean of the old ones)."""
  dst_state = nnx.state(dst_module, nnx.Param)
  src_flat = flatten_state(nnx.to_pure_dict(nnx.state(src_module, nnx.Param)))
  dst_pure = nnx.to_pure_dict(dst_state)
  dst_flat = flatten_state(dst_pure)
  if set(src_flat) != set(dst_flat):
    raise ValueError(f"{what}: parameter names differ: missing {sorted(set(dst_flat) - set(src_flat))[:5]}"
                     f", unexpected {sorted(set(src_flat) - set(dst_flat))[:5]}")
  out = {}
  for k, d in dst_flat.items():
    s = np.asarray(src_flat[k])
    if s.shape == d.shape:
      out[k] = jnp.asarray(s, d.dtype)
      continue
    grown = next((g for g in grow_rows if k.endswith(g)), None)
    if grown is None:
      raise ValueError(f"{what}: parameter {k} has shape {s.shape} in the checkpoint, "
                       f"{tuple(d.shape)} in the model")
    axis = 0 if grown.endswith("embedding") else 1  # embedding (V, D); lm_head kernel (D, V)
    n_old, n_new = s.shape[axis], d.shape[axis]
    if n_old > n_new or s.shape[1 - axis] != d.shape[1 - axis]:
      raise ValueError(f"{what}: cannot grow {k} from {s.shape} to {tuple(d.shape)}")
    mean = s.mean(axis=axis, keepdims=True)
    extra = np.repeat(mean, n_new - n_old, axis=axis)
    out[k] = jnp.asarray(np.concatenate([s, extra], axis=axis), d.dtype)
  from puma_jax.convert.core import unflatten_state
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
      raise ValueError(f"{clip_dir}: CLIP config {src.config} differs from config.model.clip "
                       f"{model.config.clip}")
    _copy(model.clip, src, clip_dir)
  if llm_dir:
    src = checkpoints.load_module(llm_dir, family="llama")
    want = model.config.llm
    if src.config.replace(vocab_size=want.vocab_size, scan_layers=want.scan_layers,
                          remat_policy=want.remat_policy, max_position_embeddings=
                          want.max_position_embeddings) != want:
      raise ValueError(f"{llm_dir}: LLaMA config {src.config} does not match config.model.llm "
                       f"{want} (beyond vocab_size)")
    if src.config.scan_layers != want.scan_layers:
      from puma_jax.models import llama
      src = llama.set_scan_layers(src, want.scan_layers)
    _copy(model.llm, src, llm_dir, grow_rows=("embed_tokens.embedding", "lm_head.kernel"))


# Own flag set, so that importing this module (tests, notebooks) defines no global flags.
FLAGS = flags.FlagValues()
flags.DEFINE_string("clip", None, "converted clip-vision directory", flag_values=FLAGS,
                    required=True)
flags.DEFINE_string("llm", None, "converted llama directory", flag_values=FLAGS, required=True)
flags.DEFINE_string("dst", None, "output directory for the PumaModel", flag_values=FLAGS,
                    required=True)
flags.DEFINE_boolean("router", False, "add the learned scale-router head", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the newly initialized parts", flag_values=FLAGS)


def _main(argv: list[str]) -> int:
  from puma_jax.models import puma
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = FLAGS
  _, clip_cfg = checkpoints.load_config(f.clip)
  _, llm_cfg = checkpoints.load_config(f.llm)
  v = llm_cfg.vocab_size
  cfg = puma.PumaConfig(llm=llm_cfg.replace(vocab_size=v + 226), clip=clip_cfg,
                        img_start_id=v, img_end_id=v + 1, pos0_id=v + 2,
                        pad_id=llm_cfg.pad_token_id if llm_cfg.pad_token_id is not None
                        else llm_cfg.eos_token_ids[0], router=f.router)
  model = puma.PumaModel(cfg, rngs=nnx.Rngs(f.seed))
  load_components(model, clip_dir=f.clip, llm_dir=f.llm)
  checkpoints.save_module(f.dst, "puma", cfg, model)
  print(f"assembled PumaModel -> {f.dst}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI on `argv` (without the program name; default: the command line)."""
  import sys
  argv = sys.argv if argv is None else ["python -m puma_jax.assemble", *argv]
  return cli.run(_main, argv, flag_values=FLAGS, doc=__doc__,
                 expected=(ValueError, checkpoints.CheckpointError))


if __name__ == "__main__":
  raise SystemExit(main())
