"""Per-device memory plan of a training config, computed without allocating anything.

  python -m puma_jax.tools.memory_plan --config=configs/pretrain.py:paper --devices=256 \
      --device_memory_gb=32 [--config.train.grad_accum_steps=4] [--config.mesh.tensor=2] ...

How each row is computed (every number is per device):

  params       every parameter (trainable and frozen) in float32 master precision, shard shape
               from the *actual* shardings of `sharding.state_shardings` on an `AbstractMesh` of
               the resized config mesh (a dimension is split over the mesh axes of its
               PartitionSpec; XLA pads a ragged shard, hence ceil division).
  grads        one float32 gradient per trainable parameter, sharded like it (FSDP reduce-
               scatters them); with `train.grad_accum_steps > 1` two copies (the scan's
               accumulator and the current microbatch's gradient).
  optimizer    `jax.eval_shape(tx.init)` of the configured optax chain, leaves sharded like the
               parameter they belong to (`training.init.abstract_state`, as training places
               them): AdamW mu and nu for trainable parameters only; frozen CLIP has none.
  activations  saved for the backward pass, LLaMA (MLLM stage), per token of the microbatch on
               this device (tokens = global batch / grad_accum / (data x fsdp) x seq_len), in the
               compute dtype (b bytes) unless noted; d hidden, q = heads*head_dim, k = kv_heads*
               head_dim, f intermediate (q, k, f divided by the tensor axis when it divides the
               heads / units), S = heads x seq_len attention scores per token:
                 remat none           b(4d + 2q + 2k + 4f) + A_none    per layer
                     (norm inputs x2, norm outputs x2, rope'd q/k, v, attention output,
                      gate, silu(gate), up, gate*up: what the backward reads)
                 remat dots           b(3d + 2q + 2k + 2f) + 4S        per layer (xla attention)
                                      b(3d +  q + 2k + 2f)             per layer (flash)
                     (every matmul output incl. both attention einsums, plus the layer input)
                 remat dots_no_batch  b(3d +  q + 2k + 2f)             per layer
                 remat full           b d                               per layer (layer input)
               A_none = S(5 + b) for the XLA attention (float32 softmax probabilities, their
               compute-dtype cast, the boolean mask broadcast), 4 heads (log-sum-exp) for a
               fused flash kernel. Times the
               number of layers, plus the model's own per-token tensors outside the layers:
               b(7d + 2F) (final norm, projector in, feature head out; F = CLIP width).
  logits       (8 + b) x vocab per token: float32 logits kept for the cross-entropy backward,
               their float32 gradient, its compute-dtype cast for the LM-head matmul backward.
               With `loss.ce_chunk` (losses.text_ce) only one chunk's positions per row hold
               logits at a time, plus a copy of the hidden states (b d per token) sorted for it.
  transient    the largest momentary buffers on top of the above: under remat, one layer
               recomputed with nothing saved (the `none` row for a single layer); FSDP's
               all-gathered weights of the largest block (a layer or the LM head) in the compute
               dtype plus its float32 gradient before the reduce-scatter, plus the next layer
               prefetched in the compute dtype; the optimizer's update tree (float32,
               trainable-sized).

Calibration (benchmarks/bench_memory_plan.py: the slope over depth of XLA's temporaries for the
compiled step, scanned layers, float32, CPU): per layer saved none 43.8 MiB measured vs 43.5
planned, dots 20.9 vs 21.0, full 0.76 vs 0.50; the depth-independent part is underestimated by
15-20 MiB at that size. Without `scan_layers`, XLA merged the recomputation back into the
forward (remat had no effect on CPU), so plan with scanned layers.

It is an estimate: XLA's buffer assignment can do better (fusion, aliasing) or worse
(fragmentation, collectives' scratch). On real devices, check the compiled step with
`jax.jit(step).lower(...).compile().memory_analysis()`. Note that JAX's GPU client preallocates
75% of device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from puma_jax import sharding
from puma_jax.training import init, registry

GiB = 1024**3
ATTENTION_IMPLS = ("xla", "flash")


# ----------------------------------------------------------------------------------------------
# Mesh


def resolve_mesh(mesh_cfg: Mapping[str, int], devices: int) -> dict[str, int]:
  """The config's (data, fsdp, tensor) mesh on `devices` devices; one -1 entry takes the rest."""
  unknown = set(mesh_cfg) - set(sharding.MESH_AXES)
  if unknown:
    raise ValueError(
      f"config.mesh: unknown axis name(s) {sorted(unknown)}; axes are {sharding.MESH_AXES}"
    )
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in sharding.MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if devices % fixed:
      raise ValueError(
        f"config.mesh {sizes} does not divide --devices={devices} (the fixed axes "
        f"need a multiple of {fixed})"
      )
    sizes[free[0]] = devices // fixed
  elif fixed != devices:
    raise ValueError(
      f"config.mesh {sizes} needs {fixed} devices but --devices={devices}; set "
      "one axis to -1 or make the sizes multiply to the device count"
    )
  return sizes


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def shard_shape(shape, spec: P, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
  """Per-device block of an array of `shape` laid out by `spec` (ceil: XLA pads ragged shards)."""
  out = []
  for d, n in enumerate(shape):
    entry = spec[d] if d < len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out.append(-(-n // math.prod(mesh_shape[a] for a in axes)))
  return tuple(out)


def _leaf_bytes(x, s: NamedSharding) -> int:
  return int(np.prod(shard_shape(x.shape, s.spec, s.mesh.shape))) * jnp.dtype(x.dtype).itemsize


# ----------------------------------------------------------------------------------------------
# Static memory: parameters, gradients, optimizer state


@dataclasses.dataclass
class Tensor:
  path: str
  shape: tuple[int, ...]
  spec: P
  bytes_per_device: int
  trainable: bool


def _tensors(pure, shards, trainable: bool) -> list[Tensor]:
  flat = jax.tree_util.tree_flatten_with_path(pure)[0]
  sflat = jax.tree.leaves(shards, is_leaf=lambda x: isinstance(x, NamedSharding))
  out = []
  for (path, x), s in zip(flat, sflat, strict=True):
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out.append(Tensor(name, tuple(x.shape), s.spec, _leaf_bytes(x, s), trainable))
  return out


def static_memory(config, mesh: AbstractMesh, rules=sharding.DEFAULT_RULES) -> dict:
  """Per-device bytes of parameters, gradients and optimizer state (no arrays allocated), from
  the shapes and shardings training itself uses (`training.init.abstract_state`)."""
  a = init.abstract_state(registry.make(config), mesh, rules)
  trainable, frozen, rest = a.trainable, a.frozen, a.rest
  tensors = _tensors(trainable, a.state_sharding.params, True) + _tensors(
    frozen, a.frozen_sharding, False
  )
  # A group's MaskedNode (parameters of the other groups) has no leaves: it holds nothing.
  opt_bytes = sum(
    jax.tree.leaves(jax.tree.map(_leaf_bytes, a.opt_state, a.state_sharding.opt_state))
  )
  rest_bytes = sum(
    int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(rest)
  )
  trainable_bytes = sum(t.bytes_per_device for t in tensors if t.trainable)
  return {
    "abstract": a.model,
    "tensors": tensors,
    "params": sum(t.bytes_per_device for t in tensors) + rest_bytes,
    "trainable_params": trainable_bytes,
    "optimizer": opt_bytes,
    "n_trainable": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable)),
    "n_frozen": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen)),
  }


# ----------------------------------------------------------------------------------------------
# Activations (LLaMA-based MLLM)


def _split(n: int, tensor: int) -> int:
  # Mirrors logical_to_spec: an axis that does not divide a dimension leaves it replicated.
  return n // tensor if n % tensor == 0 else n


def llama_layer_bytes_per_token(
  llm, *, seq_len: int, tensor: int, dtype_bytes: int, policy: str, attention: str
) -> int:
  """Bytes per token saved by one decoder layer for the backward pass (module docstring)."""
  if attention not in ATTENTION_IMPLS:
    raise ValueError(f"attention={attention!r}: choose from {ATTENTION_IMPLS}")
  b, d = dtype_bytes, llm.hidden_size
  heads = _split(llm.num_attention_heads, tensor)
  q = heads * llm.head_dim
  k = _split(llm.num_key_value_heads, tensor) * llm.head_dim
  f = _split(llm.intermediate_size, tensor)
  scores = heads * seq_len
  if policy == "none":
    attn = scores * (5 + b) if attention == "xla" else 4 * heads
    return b * (4 * d + 2 * q + 2 * k + 4 * f) + attn
  if policy == "dots":
    if attention == "xla":
      return b * (3 * d + 2 * q + 2 * k + 2 * f) + 4 * scores
    return b * (3 * d + q + 2 * k + 2 * f)
  if policy == "dots_no_batch":
    return b * (3 * d + q + 2 * k + 2 * f)
  if policy == "full":
    return b * d
  raise ValueError(f"remat_policy={policy!r}: choose none, full, dots or dots_no_batch")


def _gathered_elements(t: Tensor, tensor: int) -> int:
  """Elements of `t` on one device once FSDP has all-gathered it (only the tensor split stays)."""
  n = 1
  for d, size in enumerate(t.shape):
    entry = t.spec[d] if d < len(t.spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    n *= -(-size // tensor) if "tensor" in axes else size
  return n


def _gathered_blocks(
  tensors: list[Tensor], n_layers: int, stacked: bool, tensor: int
) -> tuple[int, int]:
  """(parameters of one decoder layer, of the largest other trainable tensor: LM head or
  embedding), as FSDP all-gathers them (split over the tensor axis only)."""
  layer, other = 0, 0
  for t in tensors:
    if not t.trainable:
      continue
    if t.path.startswith("llm.layers."):
      if stacked:  # (layers, ...) stacks, one slice per scan step
        layer += _gathered_elements(t, tensor) // n_layers
      elif t.path.startswith("llm.layers.0."):
        layer += _gathered_elements(t, tensor)
    else:
      other = max(other, _gathered_elements(t, tensor))
  return layer, other


def activation_memory(
  config, static: dict, mesh_shape: Mapping[str, int], global_batch: int, attention: str
) -> dict:
  """Per-device bytes of saved activations, logits and transients for the MLLM step."""
  from puma_jax.models import puma

  mc = puma.PumaConfig.from_dict(config.model.to_dict())
  llm = mc.llm
  accum = int(config.train.grad_accum_steps)
  shards = mesh_shape["data"] * mesh_shape["fsdp"]
  tensor = mesh_shape["tensor"]
  if global_batch % accum or (global_batch // accum) % shards:
    raise ValueError(
      f"train.grad_accum_steps={accum} must split the global batch {global_batch} "
      f"into microbatches divisible by data x fsdp = {shards}"
    )
  rows = global_batch // accum // shards
  seq_len = int(config.seq_len)
  tokens = rows * seq_len
  # precision "auto" is 16-bit on every accelerator a plan is made for (puma_jax/precision.py)
  prec = str(config.precision)
  b = 2 if prec == "auto" else jnp.dtype(prec).itemsize
  policy = llm.remat_policy
  kw = dict(seq_len=seq_len, tensor=tensor, dtype_bytes=b, attention=attention)
  per_layer = llama_layer_bytes_per_token(llm, policy=policy, **kw)
  none_layer = llama_layer_bytes_per_token(llm, policy="none", **kw)
  d, feat = llm.hidden_size, mc.feature_dim
  outside = b * (7 * d + 2 * feat)
  saved = tokens * (llm.num_hidden_layers * per_layer + outside)
  chunk = int(config.loss.get("ce_chunk", 0))
  logits = tokens * (8 + b) * _split(llm.vocab_size, tensor)
  if 0 < chunk < seq_len:
    logits = rows * chunk * (8 + b) * _split(llm.vocab_size, tensor) + tokens * b * d
  recompute = tokens * none_layer if policy != "none" else 0
  layer, other = _gathered_blocks(static["tensors"], llm.num_hidden_layers, llm.scan_layers, tensor)
  gathered = max(layer, other) * (b + 4) + layer * b
  update = static["trainable_params"]
  return {
    "activations": saved,
    "logits": logits,
    "transient": recompute + gathered + update,
    "rows_per_device": rows,
    "tokens_per_device": tokens,
    "per_layer_per_token": per_layer,
    "recompute": recompute,
    "gathered": gathered,
    "update": update,
  }


# ----------------------------------------------------------------------------------------------
# Plan


@dataclasses.dataclass
class Plan:
  mesh: dict
  devices: int
  global_batch: int
  grad_accum: int
  remat: str
  attention: str
  device_memory: int
  usable_fraction: float
  rows: dict  # name -> bytes per device
  details: dict

  @property
  def total(self) -> int:
    return sum(self.rows.values())

  @property
  def budget(self) -> int:
    return int(self.device_memory * self.usable_fraction)

  @property
  def fits(self) -> bool:
    return self.total <= self.budget


def make_plan(
  config,
  devices: int,
  device_memory_gb: float,
  *,
  processes: int | None = None,
  global_batch: int = 0,
  attention: str = "xla",
  usable_fraction: float = 0.9,
  static: dict | None = None,
) -> Plan:
  """Per-device memory of `config` trained on `devices` devices of `device_memory_gb` GiB.

  The global batch is `global_batch`, else data.batch_size per host x `processes` (default: one
  process per device, the GPU-cluster layout). `static` reuses `static_memory` of a config
  differing only in train.grad_accum_steps or the remat policy.
  """
  if devices < 1:
    raise ValueError(f"--devices={devices} must be positive")
  sizes = resolve_mesh(config.mesh.to_dict(), devices)
  mesh = abstract_mesh(sizes)
  gb = int(global_batch) or int(config.data.batch_size) * int(processes or devices)
  static = static or static_memory(config, mesh)
  accum = int(config.train.grad_accum_steps)
  rows = {
    "params": static["params"],
    "grads": static["trainable_params"] * (2 if accum > 1 else 1),
    "optimizer": static["optimizer"],
  }
  details = dict(static, static=static)
  remat = "n/a"
  if config.stage == "mllm":
    act = activation_memory(config, static, sizes, gb, attention)
    rows.update(activations=act["activations"], logits=act["logits"], transient=act["transient"])
    details.update(act)
    remat = config.model.llm.remat_policy
  return Plan(
    mesh=sizes,
    devices=devices,
    global_batch=gb,
    grad_accum=int(config.train.grad_accum_steps),
    remat=remat,
    attention=attention,
    device_memory=int(device_memory_gb * GiB),
    usable_fraction=usable_fraction,
    rows=rows,
    details=details,
  )


def _with(config, accum: int | None = None, remat: str | None = None):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if accum is not None:
      c.train.grad_accum_steps = accum
    if remat is not None:
      c.model.llm.remat_policy = remat
  return c


def suggestions(config, plan: Plan, **kw) -> list[str]:
  """Cheapest changes that make `config` fit: more gradient accumulation, then more remat."""
  if config.stage != "mllm":
    return []
  shards = plan.mesh["data"] * plan.mesh["fsdp"]
  accums = [
    a
    for a in range(1, plan.global_batch + 1)
    if plan.global_batch % a == 0 and (plan.global_batch // a) % shards == 0
  ]
  out, seen = [], set()
  order = ["none", "dots", "dots_no_batch", "full"]
  start = order.index(plan.remat) if plan.remat in order else 0
  for remat in order[start:]:
    for a in accums:
      if a < plan.grad_accum and remat == plan.remat:
        continue
      p = make_plan(
        _with(config, a, remat),
        plan.devices,
        plan.device_memory / GiB,
        global_batch=plan.global_batch,
        attention=plan.attention,
        usable_fraction=plan.usable_fraction,
        static=plan.details["static"],
        **kw,
      )
      if p.fits:
        if (a, p.total) in seen:  # this remat saves the same as a cheaper one here
          break
        seen.add((a, p.total))
        flags = f"--config.train.grad_accum_steps={a}"
        if remat != plan.remat:
          flags += f" --config.model.llm.remat_policy={remat}"
        out.append(
          f"{flags}: {p.total / GiB:.1f} GiB per device "
          f"({p.global_batch // a // shards} rows per device per microbatch)"
        )
        break
  return out


def format_plan(plan: Plan) -> str:
  gib = lambda n: f"{n / GiB:10.3f}{n:>18,}"
  lines = [
    f"mesh {plan.mesh} on {plan.devices} devices; global batch {plan.global_batch}, "
    f"grad_accum {plan.grad_accum}, remat {plan.remat}, attention {plan.attention}"
  ]
  d = plan.details
  lines.append(f"parameters: {d['n_trainable']:,} trainable, {d['n_frozen']:,} frozen")
  if "tokens_per_device" in d:
    lines.append(
      f"microbatch: {d['rows_per_device']} rows = {d['tokens_per_device']:,} tokens "
      f"per device; {d['per_layer_per_token']:,} bytes per token per layer saved"
    )
  whole = sorted(
    (t for t in d["tensors"] if shard_shape(t.shape, t.spec, plan.mesh) == t.shape),
    key=lambda t: -t.bytes_per_device,
  )
  if plan.devices > 1 and whole and whole[0].bytes_per_device >= 1 << 20:
    lines.append(
      "largest unsharded (replicated) parameters: "
      + ", ".join(f"{t.path} {t.shape} {t.bytes_per_device / 2**20:.1f} MiB" for t in whole[:3])
    )
  lines.append(f"{'per device':<14}{'GiB':>10}{'bytes':>18}")
  for name, n in plan.rows.items():
    lines.append(f"{name:<14}{gib(n)}")
  lines.append(f"{'total':<14}{gib(plan.total)}")
  lines.append(
    f"{'device':<14}{gib(plan.device_memory)}  (usable at "
    f"{plan.usable_fraction:.0%}: {plan.budget / GiB:.2f})"
  )
  return "\n".join(lines)


REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # least recomputation first


def cheapest_remat(config, plan: Plan, **kw) -> tuple[str, Plan] | None:
  """The remat policy with the least recomputation that fits (same batch, same gradient
  accumulation), with its plan; None when none fits or the stage has no LLaMA."""
  if config.stage != "mllm":
    return None
  for remat in REMAT_ORDER:
    p = (
      plan
      if remat == plan.remat
      else make_plan(
        _with(config, remat=remat),
        plan.devices,
        plan.device_memory / GiB,
        global_batch=plan.global_batch,
        attention=plan.attention,
        usable_fraction=plan.usable_fraction,
        static=plan.details["static"],
        **kw,
      )
    )
    if p.fits:
      return remat, p
  return None


def verdict(config, plan: Plan, **kw) -> str:
  if plan.fits:
    head = f"FITS: {plan.total / GiB:.1f} GiB of {plan.budget / GiB:.1f} GiB usable per device"
    if "activations" not in plan.rows:
      head += " (parameters, gradients and optimizer state only; activations not estimated)"
    best = cheapest_remat(config, plan, **kw)
    if best is not None and best[0] != plan.remat:
      head += (
        f"\ncheaper remat fits (less recomputation, faster steps): "
        f"--config.model.llm.remat_policy={best[0]}: {best[1].total / GiB:.1f} GiB per "
        f"device"
      )
    elif best is not None:
      head += f"\nremat {plan.remat!r} is the cheapest policy that fits"
    return head
  lines = [
    f"DOES NOT FIT: {plan.total / GiB:.1f} GiB > {plan.budget / GiB:.1f} GiB usable per device"
  ]
  fixes = suggestions(config, plan, **kw)
  if fixes:
    lines.append("smallest changes that fit (same global batch, same update):")
    lines += [f"  {f}" for f in fixes]
  else:
    lines.append(
      "no gradient-accumulation / remat setting fits: add devices, shard over "
      "--config.mesh.tensor, or shorten --config.seq_len"
    )
  if plan.attention == "xla":
    lines.append(
      "  (a fused flash-attention kernel, --attention=flash, drops the seq_len^2 "
      "scores; cuDNN's needs Ampere or newer, not V100)"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv):
  from absl import flags

  del argv
  f = flags.FLAGS
  config = _CONFIG.value
  plan = make_plan(
    config,
    f.devices,
    f.device_memory_gb,
    processes=f.processes or None,
    global_batch=f.global_batch,
    attention=f.attention,
    usable_fraction=f.usable_fraction,
  )
  print(format_plan(plan))
  print(verdict(config, plan, processes=f.processes or None))


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pretrain.py:paper", "Training config (and :variant).", lock_config=True
  )
  flags.DEFINE_integer("devices", 256, "Devices to plan for (the mesh's -1 axis takes the rest).")
  flags.DEFINE_float("device_memory_gb", 32.0, "Memory per device in GiB (V100: 32).")
  flags.DEFINE_integer("processes", 0, "Hosts feeding data.batch_size each (0: one per device).")
  flags.DEFINE_integer("global_batch", 0, "Global batch (0: data.batch_size x processes).")
  flags.DEFINE_enum(
    "attention",
    "xla",
    list(ATTENTION_IMPLS),
    "Attention kernel: xla (materialized scores) or flash (fused).",
  )
  flags.DEFINE_float("usable_fraction", 0.9, "Fraction of device memory the step may use.")

  from puma_jax import cli

  sys.exit(cli.run(main, doc=__doc__))
