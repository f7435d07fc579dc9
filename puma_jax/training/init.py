"""Sharded parameter and optimizer-state initialization, written once for the loop and for
`puma_jax.tools.memory_plan` (which plans with the very shardings training uses).

  abstract_state(stage, mesh, rules)   shapes and shardings of everything, no memory
  restore_or_init(stage, manager, mesh, rules)
                                       the latest checkpoint in `manager`, else a fresh init:
                                       eval_shape -> shardings -> jit(init, out_shardings), so a
                                       model larger than one device never materializes whole
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from puma_jax import precision, sharding
from puma_jax.checkpoints import CheckpointError
from puma_jax.training import checkpoints, optim
from puma_jax.training.stage import Stage
from puma_jax.training.steps import TrainState


def _masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _structs(tree, shardings):
  return jax.tree.map(
    lambda v, s: v if _masked(v) else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
    tree,
    shardings,
    is_leaf=_masked,
  )


@dataclasses.dataclass(frozen=True)
class AbstractState:
  """Shapes (jax.ShapeDtypeStruct pure dicts) and shardings of a stage's training state."""

  model: nnx.Module  # the abstract module (eval_shape)
  graphdef: nnx.GraphDef  # merges (frozen, trainable, rest) back into the module
  trainable: Any  # trainable parameters
  frozen: Any  # frozen parameters (no gradient, no optimizer state)
  rest: Any  # non-parameter state (replicated)
  opt_state: Any  # `tx.init(trainable)`; optax.MaskedNode for other groups
  loss_scale: Any  # the initial precision.DynamicLossScale (float16: dynamic)
  tx: optax.GradientTransformation
  schedules: dict  # lr group -> schedule (groups that have parameters)
  state_sharding: TrainState  # a parameter's moments follow its sharding; counters replicate
  frozen_sharding: Any
  rest_sharding: Any

  def state(self) -> TrainState:
    """The TrainState as sharded ShapeDtypeStructs (restore target, lowering)."""
    s = self.state_sharding
    return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=s.step),
      params=_structs(self.trainable, s.params),
      opt_state=_structs(self.opt_state, s.opt_state),
      loss_scale=jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        self.loss_scale,
        s.loss_scale,
      ),
    )

  def frozen_structs(self):
    return _structs(self.frozen, self.frozen_sharding)

  def rest_structs(self):
    return _structs(self.rest, self.rest_sharding)


def loss_scale(stage: Stage) -> precision.DynamicLossScale:
  """The initial loss scale of a stage's compute dtype (`config.loss_scale`; float16 only)."""
  c = stage.config.get("loss_scale")
  kw = (
    {}
    if c is None
    else dict(initial=float(c.initial), period=int(c.period), factor=float(c.factor))
  )
  return precision.DynamicLossScale.create(stage.dtype, **kw)


def abstract_state(stage: Stage, mesh, rules=sharding.DEFAULT_RULES) -> AbstractState:
  """Everything's shape and sharding on `mesh` (a Mesh or an AbstractMesh), no memory used."""
  abstract = nnx.eval_shape(lambda: stage.build(nnx.Rngs(int(stage.config.seed))))
  graphdef, trainable_a, frozen_a, rest_a = optim.split_trainable(abstract, stage.frozen)
  to_pure = nnx.to_pure_dict
  trainable, frozen, rest = to_pure(trainable_a), to_pure(frozen_a), to_pure(rest_a)
  p_shard = to_pure(sharding.state_shardings(trainable_a, mesh, rules))
  f_shard = to_pure(sharding.state_shardings(frozen_a, mesh, rules))
  replicated = NamedSharding(mesh, P())
  r_shard = jax.tree.map(lambda _: replicated, rest)
  tx, schedules = stage.optimizer(trainable)
  opt_a = jax.eval_shape(tx.init, trainable)
  opt_shard = optax.tree_map_params(
    tx,
    lambda v, s: v if _masked(v) else s,
    opt_a,
    p_shard,
    transform_non_params=lambda x: x if _masked(x) else replicated,
    is_leaf=_masked,
  )
  ls = loss_scale(stage)
  return AbstractState(
    model=abstract,
    graphdef=graphdef,
    trainable=trainable,
    frozen=frozen,
    rest=rest,
    opt_state=opt_a,
    loss_scale=ls,
    tx=tx,
    schedules=schedules,
    state_sharding=TrainState(
      step=replicated,
      params=p_shard,
      opt_state=opt_shard,
      loss_scale=jax.tree.map(lambda _: replicated, ls),
    ),
    frozen_sharding=f_shard,
    rest_sharding=r_shard,
  )


_MISMATCH = "tree structures do not match"


def _restore(manager, step: int, a: AbstractState):
  """(state, frozen, data state) of checkpoint `step`. A checkpoint written before the train
  state carried the loss scale restores with a fresh one; any other difference in structure
  is another kind of state, refused as `CheckpointError` (never set aside as damaged)."""
  try:
    return checkpoints.restore_train(manager, step, a.state(), a.frozen_structs())
  except ValueError as e:
    if _MISMATCH not in str(e):
      raise
  full = a.state()
  legacy = {"step": full.step, "params": full.params, "opt_state": full.opt_state}
  try:
    old, frozen, data_state = checkpoints.restore_train(manager, step, legacy, a.frozen_structs())
  except ValueError as e:
    if _MISMATCH not in str(e):
      raise
    raise CheckpointError(
      f"checkpoint step {step} in {manager.directory} holds a training state of another "
      f"structure than this config builds ({str(e).splitlines()[0][:200]}); use another "
      "--workdir, or the code and config that wrote it"
    ) from None
  scale = jax.device_put(a.loss_scale, a.state_sharding.loss_scale)
  logging.info("checkpoint step %d has no loss scale (older format): starting a fresh one", step)
  return TrainState(**old, loss_scale=scale), frozen, data_state


@dataclasses.dataclass
class Initialized:
  """A stage's training state on the mesh, restored or fresh."""

  abstract: AbstractState
  state: TrainState
  frozen: Any
  rest: Any
  data_state: dict | None  # the data iterator's saved position (None: fresh run)


def restore_or_init(stage: Stage, manager, mesh, rules=sharding.DEFAULT_RULES) -> Initialized:
  """The latest checkpoint of `manager` (its meta checked against `stage.meta()`), else fresh
  parameters (pretrained weights loaded when the config names them); `manager` may be None."""
  a = abstract_state(stage, mesh, rules)
  latest = manager.latest_step() if manager is not None else None
  if latest is not None:
    failure = None
    try:
      checkpoints.check_train_meta(manager, latest, stage.meta())
      state, frozen, data_state = _restore(manager, latest, a)
    except CheckpointError:
      raise  # another model's checkpoint: refuse, touch nothing
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      first = str(e).splitlines()[0][:200] if str(e) else ""
      failure = f"restore failed: {type(e).__name__}" + (f": {first}" if first else "")
    if failure is not None:  # outside `except`: the error's frames (orbax's reads) are freed
      checkpoints.drop_failed_read_echoes(Path(manager.directory) / str(latest))
      raise checkpoints.UnreadableCheckpoint(latest, failure)
    rest = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), a.rest)
    logging.info("restored step %d from %s", latest, manager.directory)
    return Initialized(a, state, frozen, rest, data_state)

  def init():
    model = stage.build(nnx.Rngs(int(stage.config.seed)))
    stage.load_pretrained(model)
    _, trainable, frozen, rest = optim.split_trainable(model, stage.frozen)
    params = nnx.to_pure_dict(trainable)
    return (
      TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=a.tx.init(params),
        loss_scale=a.loss_scale,
      ),
      nnx.to_pure_dict(frozen),
      nnx.to_pure_dict(rest),
    )

  if stage.loads_pretrained:  # host-side weights: build, then place on the mesh
    state, frozen, rest = init()
    state, frozen = jax.device_put((state, frozen), (a.state_sharding, a.frozen_sharding))
  else:
    with sharding.use_mesh(mesh, rules):
      state, frozen, rest = jax.jit(
        init, out_shardings=(a.state_sharding, a.frozen_sharding, a.rest_sharding)
      )()
  return Initialized(a, state, frozen, rest, None)
