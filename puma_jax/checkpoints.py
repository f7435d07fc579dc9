"""Saving and loading converted model weights.

A converted model directory holds:
  puma_config.json   {"family": ..., "config": {...}, "format_version": 1, "source": ...}
  params/            an orbax checkpoint of the parameters (a nested dict of float32 arrays)
plus whatever the family carries along (tokenizer files for LLaMA).

`load_module(dir)` rebuilds the module abstractly (no memory), then restores the parameters into
it; with a `mesh`, each parameter is restored directly into its shard.
(Training checkpoints, with optimizer and data-iterator state, are in
`puma_jax.training.checkpoints`.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from puma_jax import sharding
from puma_jax.models import registry

CONFIG_FILE = "puma_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  pass


def save_module(
  dst: str | os.PathLike, family: str, config: Any, module: nnx.Module, **meta: Any
) -> Path:
  """Writes `module`'s parameters and its config to `dst` (created; must not hold params)."""
  dst = Path(dst).absolute()
  dst.mkdir(parents=True, exist_ok=True)
  if (dst / PARAMS_DIR).exists():
    raise CheckpointError(f"{dst / PARAMS_DIR} already exists; refusing to overwrite it")
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(dst / PARAMS_DIR, params)
  ckptr.wait_until_finished()
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  info = {"family": family, "format_version": FORMAT_VERSION, "config": cfg, **meta}
  (dst / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
  return dst


def load_info(src: str | os.PathLike) -> dict:
  src = Path(src)
  if not src.is_dir():
    raise CheckpointError(f"{src}: not a directory (expected a converted model directory)")
  path = src / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(
      f"{src}: no {CONFIG_FILE}; was it written by `python -m puma_jax.convert`?"
    )
  info = json.loads(path.read_text())
  for key in ("family", "config"):
    if key not in info:
      raise CheckpointError(f"{path}: missing key {key!r}")
  return info


def load_config(src: str | os.PathLike):
  info = load_info(src)
  return info["family"], registry.config_class(info["family"]).from_dict(info["config"])


def load_module(
  src: str | os.PathLike,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  mesh=None,
  rules=sharding.DEFAULT_RULES,
  family: str | None = None,
) -> nnx.Module:
  """The `nnx.Module` stored in a converted directory.

  `dtype` is the compute dtype (e.g. `jnp.bfloat16`); `param_dtype` the dtype the parameters
  are restored into (orbax casts while reading, so bfloat16 never holds a float32 copy);
  `mesh` restores each parameter sharded by its logical axes; `family`, when given, must match
  the stored one.
  """
  src = Path(src).absolute()
  stored, config = load_config(src)
  if family is not None and family != stored:
    raise CheckpointError(f"{src} holds a {stored!r} model, not {family!r}")
  abstract = nnx.eval_shape(
    lambda: registry.build(stored, config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  )
  params = nnx.state(abstract, nnx.Param)
  if mesh is not None:
    shardings = sharding.state_shardings(params, mesh, rules)
    target = jax.tree.map(
      lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
      nnx.to_pure_dict(params),
      nnx.to_pure_dict(shardings),
    )
  else:
    target = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(params)
    )
  # Restored straight into the shards, so materialize needs no mesh to place them.
  return sharding.materialize(abstract, restore_params(src / PARAMS_DIR, target))


def restore_params(path: Path, target: dict) -> dict:
  if not path.exists():
    raise CheckpointError(f"{path} is missing")
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    stored = {k: tuple(getattr(v, "shape", ())) for k, v in _flat(tree).items()}
  except Exception:  # metadata unreadable: let restore report the problem
    stored = None
  if stored is not None:
    want = {k: tuple(v.shape) for k, v in _flat(target).items()}
    missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
    bad = [
      f"{k}: stored {stored[k]} vs model {want[k]}"
      for k in sorted(set(want) & set(stored))
      if stored[k] != want[k]
    ]
    if missing or extra or bad:
      raise CheckpointError(
        f"{path}: parameters do not match the model config: missing "
        f"{missing[:5]}, unexpected {extra[:5]}, shape mismatches {bad[:5]}"
      )
  return ckptr.restore(path, target)


def _flat(tree, prefix=""):
  out = {}
  if isinstance(tree, (dict, list, tuple)):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
      out.update(_flat(v, f"{prefix}{k}/"))
  else:
    out[prefix.rstrip("/")] = tree
  return out


def param_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
  """Flat {"a.b.kernel": numpy array} of a module's parameters (for export and tests)."""
  from puma_jax.convert.core import flatten_state

  return {
    k: np.asarray(v)
    for k, v in flatten_state(nnx.to_pure_dict(nnx.state(module, nnx.Param))).items()
  }
