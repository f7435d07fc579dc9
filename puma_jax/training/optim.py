"""Optimizers: AdamW with per-group learning rates, warm-up + decay, global-norm clipping.

Parameter groups are chosen by the first path component of each trainable parameter (e.g. the
MLLM's `llm` at 3e-5 and the projector/heads at 1e-4 during pretraining, PUMA paper, appendix
7.2.3). Frozen parts (CLIP, VAE) are not given to the optimizer at all: `split_trainable`
separates them, so they hold no optimizer state and get no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import optax
from flax import nnx


def schedule(
  peak: float,
  total_steps: int,
  warmup_steps: int = 0,
  decay: str = "cosine",
  end_factor: float = 0.0,
) -> optax.Schedule:
  """Linear warm-up to `peak`, then `decay` (cosine | linear | constant) to peak * end_factor."""
  if total_steps <= 0:
    raise ValueError(f"optim: total_steps={total_steps} must be positive")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(
      f"optim: warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]"
    )
  rest = max(total_steps - warmup_steps, 1)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=end_factor)
  elif decay == "linear":
    after = optax.linear_schedule(peak, peak * end_factor, rest)
  elif decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.decay={decay!r}: choose cosine, linear or constant")
  if warmup_steps == 0:
    return after
  warm = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warm, after], [warmup_steps])


def _group_of(path: tuple, groups: Mapping[str, float]) -> str:
  head = str(path[0])
  return head if head in groups else "default"


def param_labels(params, groups: Mapping[str, float]):
  """Same tree as `params`, each leaf replaced by its group name."""
  return jax.tree_util.tree_map_with_path(
    lambda p, _: _group_of(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), groups),
    params,
  )


def _decay_mask(params):
  """Weight decay on matrices only (not on norms, biases, or 1-D embeddings)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make(cfg: ml_collections.ConfigDict, params) -> tuple[optax.GradientTransformation, dict]:
  """AdamW per group from `cfg` (see configs: optim.*). Returns (tx, {group: schedule})."""
  groups = dict(cfg.lr_groups)
  if "default" not in groups:
    raise ValueError(f"optim.lr_groups needs a 'default' entry; got {sorted(groups)}")
  schedules = {
    g: schedule(
      float(lr), int(cfg.total_steps), int(cfg.warmup_steps), cfg.decay, float(cfg.end_factor)
    )
    for g, lr in groups.items()
  }
  labels = param_labels(params, groups)
  used = set(jax.tree.leaves(labels))
  txs = {}
  for g in groups:
    txs[g] = optax.adamw(
      schedules[g],
      b1=float(cfg.b1),
      b2=float(cfg.b2),
      eps=float(cfg.eps),
      weight_decay=float(cfg.weight_decay),
      mask=_decay_mask,
    )
  tx = optax.multi_transform(txs, labels)
  if float(cfg.grad_clip) > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), tx)
  return tx, {g: s for g, s in schedules.items() if g in used}


def split_trainable(model: nnx.Module, frozen: nnx.filterlib.Filter):
  """(graphdef, trainable params, frozen params, other state) of a module."""
  graphdef, frozen_p, trainable, rest = nnx.split(model, frozen, nnx.Param, ...)
  return graphdef, trainable, frozen_p, rest
