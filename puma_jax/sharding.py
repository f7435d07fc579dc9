"""Mesh, logical axis rules, and sharded initialization.

Every parameter carries its logical axis names in the `logical_axes` metadata of its
`nnx.Variable` (set by `puma_jax.models.layers`), and activations are constrained with
`constrain(x, names)`. Nothing outside this file names a mesh axis: the rule table below maps
logical names to the three mesh axes.

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3)
  tensor  tensor parallelism (attention heads, MLP hidden units, vocabulary)

The mesh uses `AxisType.Auto` on purpose: models are written with sharding *constraints*
(GSPMD propagation), not with sharding-in-types, so the same code runs unsharded on one CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters use the plain names ("embed", "mlp", ...); activations use
# the "act_" names, so a parameter's model dimension can be FSDP-sharded while the activation's is
# not. A name absent from the table is replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  # activations
  ("batch", ("data", "fsdp")),
  ("act_seq", None),
  ("act_embed", None),
  ("act_mlp", "tensor"),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_vocab", "tensor"),
  ("act_height", None),
  ("act_width", None),
  ("act_channels", None),
  # parameters
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("vocab", "tensor"),
  ("conv_in", "fsdp"),
  ("conv_out", "tensor"),
  ("layers", None),  # stacked (scanned) layer axis
  ("norm", None),
)

_CTX: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
  "puma_jax_mesh", default=None
)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices.

  `shape` is a mapping with the three axis names or a 3-sequence in that order.
  """
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if rest <= 0 or n % rest:
      raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {n} available devices"
      )
    sizes[sizes.index(-1)] = n // rest
  if any(s <= 0 for s in sizes) or math.prod(sizes) != n:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but "
      f"{n} are available; sizes must multiply to the device count (use -1 for one axis)"
    )
  return jax.make_mesh(
    tuple(sizes),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def _rule_map(rules) -> dict[str, tuple[str, ...]]:
  out = {}
  for name, axes in rules:
    if axes is None:
      out[name] = ()
    elif isinstance(axes, str):
      out[name] = (axes,)
    else:
      out[name] = tuple(axes)
  return out


# (what, shape, logical name, mesh axis) already reported, so each replication is logged once.
_WARNED: set[tuple] = set()


def logical_to_spec(
  names: Sequence[str | None],
  rules=DEFAULT_RULES,
  shape: Sequence[int] | None = None,
  mesh: Mesh | None = None,
  *,
  strict: bool = False,
  what: str = "array",
) -> P:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per array (first dimension wins). With `shape` and `mesh`
  given, mesh axes that do not divide a dimension are dropped (that dimension stays replicated
  over them), so small configs shard as far as they can instead of failing; each such drop is
  logged once as a warning naming `what`, and `strict=True` raises instead.
  """
  table = _rule_map(rules)
  used: set[str] = set()
  spec = []
  for d, name in enumerate(names):
    axes = table.get(name, ()) if name is not None else ()
    kept = []
    for a in axes:
      if a in used:
        continue
      if mesh is not None and shape is not None:
        ways = math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]
        if shape[d] % ways:
          msg = (
            f"{what} {tuple(shape)}: dimension {d} ({name!r}, size {shape[d]}) does not "
            f"divide into {ways} shards over mesh axis {a!r}"
          )
          if strict:
            raise ValueError(msg)
          key = (what, tuple(shape), name, a)
          if key not in _WARNED:
            _WARNED.add(key)
            logging.warning("%s; it stays replicated over %r", msg, a)
          continue
      kept.append(a)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def variable_axes(var: nnx.Variable) -> tuple | None:
  return var.get_metadata().get("logical_axes")


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES, *, strict: bool = False):
  """NamedShardings for every variable of an (abstract or concrete) state, same tree.

  `strict`: a logical axis whose mesh axes do not divide the dimension is an error (naming the
  variable) instead of a logged, replicated dimension."""

  def one(path, var):
    axes = variable_axes(var)
    shape = var.value.shape
    what = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    if axes is None:
      axes = (None,) * len(shape)
    if len(axes) != len(shape):
      raise ValueError(f"{what}: logical axes {axes} do not match the shape {shape}")
    spec = logical_to_spec(axes, rules, shape, mesh, strict=strict, what=what)
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
  """Activates `mesh` and `rules` for `constrain` (at trace time) and for jax itself."""
  token = _CTX.set((mesh, tuple(rules)))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _CTX.reset(token)


def current() -> tuple[Mesh, tuple] | None:
  """The (mesh, rules) of the innermost `use_mesh`, or None (e.g. for kernels that must run
  under `shard_map` on a multi-device mesh)."""
  return _CTX.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh`."""
  ctx = _CTX.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of rank {x.ndim}")
  spec = logical_to_spec(names, rules, x.shape, mesh, what=f"activation {tuple(names)}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def init_sharded(
  build: Callable[[], nnx.Module], mesh: Mesh | None = None, rules=DEFAULT_RULES
) -> nnx.Module:
  """Builds a module whose parameters are created already sharded.

  eval_shape (no memory) -> shardings from the logical axes -> jit(init, out_shardings), so a
  model larger than one device never materializes whole. Without a mesh it is `build()`.
  """
  if mesh is None:
    return build()
  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)
  init = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)
  with use_mesh(mesh, rules):
    state = init()
  return nnx.merge(graphdef, state)


def materialize(
  abstract: nnx.Module, params: dict, *, mesh: Mesh | None = None, rules=DEFAULT_RULES
) -> nnx.Module:
  """A concrete module from an abstract one (`nnx.eval_shape`) and its parameters.

  `params` is a pure dict of every `nnx.Param` (arrays; same tree as
  `nnx.to_pure_dict(nnx.state(abstract, nnx.Param))`). Every other variable (RNG counters,
  caches) is zero-filled: loaded weights never carry them, and building them would allocate the
  whole model. With `mesh`, each parameter is placed by its logical axes.
  """
  graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
  want, got = _leaf_shapes(nnx.to_pure_dict(state)), _leaf_shapes(params)
  if want != got:  # a missing leaf would silently stay abstract
    bad = [
      f"{k}: given {got[k]}, model {want[k]}"
      for k in sorted(set(want) & set(got))
      if want[k] != got[k]
    ]
    raise ValueError(
      f"materialize: parameters do not match the module: missing "
      f"{sorted(set(want) - set(got))[:5]}, unexpected "
      f"{sorted(set(got) - set(want))[:5]}, shape mismatches {bad[:5]}"
    )
  nnx.replace_by_pure_dict(state, params)
  if mesh is not None:
    state = jax.device_put(state, state_shardings(state, mesh, rules))
  rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
  return nnx.merge(graphdef, state, rest)


def _leaf_shapes(tree) -> dict[str, tuple]:
  key = lambda p: str(getattr(p, "key", getattr(p, "idx", p)))
  return {
    ".".join(key(p) for p in path): tuple(np.shape(v))
    for path, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Moves an existing module's variables onto `mesh` following their logical axes."""
  graphdef, state = nnx.split(module)
  shardings = state_shardings(state, mesh, rules)
  return nnx.merge(graphdef, jax.device_put(state, shardings))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding for a batch-major input of rank `ndim` (batch over data and fsdp)."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def count_params(state_or_module) -> int:
  state = state_or_module
  if isinstance(state_or_module, nnx.Module):
    state = nnx.state(state_or_module, nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
