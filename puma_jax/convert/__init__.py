"""Weight conversion: one module per family (a name table plus hooks), one strict loader.

    python -m puma_jax.convert clip-vision --src=HF_DIR --dst=OUT_DIR
    python -m puma_jax.convert puma-release --src=SNAPSHOT --dst=RELEASE [--clip= --vae= --llm=]

A family module defines `FAMILY` (the registry name), `load_config(src) -> ModelConfig`,
`rules(config) -> list[Rule]`, and optionally `read_tensors(src)`, `check_tensors(config, tensors,
src)` (raises `ConversionError` before the generic mapping) and `copy_extras(src, dst)`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax import checkpoints, fileio, sharding
from puma_jax.convert import core
from puma_jax.convert.core import ConversionError
from puma_jax.models import registry

# CLI sub-command -> family module.
CONVERTERS: dict[str, str] = {
  "clip-vision": "puma_jax.convert.clip",
  "llama": "puma_jax.convert.llama",
  "vae": "puma_jax.convert.vae",
  "sdxl-unet": "puma_jax.convert.unet",
  "puma-decoder": "puma_jax.convert.puma_decoder",
  "clip": "puma_jax.convert.clip_full",
  "alexnet": "puma_jax.convert.alexnet",
  "lpips-alex": "puma_jax.convert.lpips",
  "dino-vit": "puma_jax.convert.vit",
  "inception": "puma_jax.convert.inception",
}

# CLI sub-commands that write more than one model (each module has `main(argv) -> exit code`).
COMMANDS: dict[str, str] = {
  "puma-release": "puma_jax.convert.puma_release",
}


def family_module(name: str):
  if name not in CONVERTERS:
    raise ConversionError(f"unknown weight family {name!r}; known: {sorted(CONVERTERS)}")
  return importlib.import_module(CONVERTERS[name])


def import_module(name: str, src: str | os.PathLike, *, config=None):
  """Reads a source checkpoint into a fresh module (float32). Returns (module, config)."""
  fam = family_module(name)
  src = Path(src)
  if not src.exists():
    raise ConversionError(f"source {src} does not exist")
  config = config if config is not None else fam.load_config(src)
  tensors = fam.read_tensors(src) if hasattr(fam, "read_tensors") else core.read_checkpoint(src)
  if hasattr(fam, "check_tensors"):  # family-specific checks with clearer messages
    fam.check_tensors(config, tensors, src)
  abstract = nnx.eval_shape(lambda: registry.build(fam.FAMILY, config, rngs=nnx.Rngs(0)))
  pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  shapes = {k: (v.shape, v.dtype) for k, v in core.flatten_state(pure).items()}
  filled = core.map_to_target(tensors, fam.rules(config), shapes, what=f"{name} {src}")
  params = jax.tree.map(jnp.asarray, core.unflatten_state(filled, pure))
  return sharding.materialize(abstract, params), config


def convert(name: str, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
  """Converts a local source directory to a puma_jax model directory; returns `dst`.

  `dst` must be absent or empty and outside `src`; everything is written to a temporary
  sibling that is renamed to `dst` only once complete, so a failure leaves nothing behind.
  """
  fam = family_module(name)
  fileio.check_output_dir(dst, "convert", src)  # before the (slow) read, to fail fast
  module, config = import_module(name, src)
  try:
    with fileio.staged_output(dst, "convert", src) as tmp:
      checkpoints.save_module(tmp, fam.FAMILY, config, module, source=str(Path(src).absolute()))
      if hasattr(fam, "copy_extras"):
        fam.copy_extras(Path(src), tmp)
  except fileio.OutputError as e:
    raise ConversionError(str(e)) from None
  return Path(dst).absolute()
