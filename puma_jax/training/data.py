"""Host data: each process reads its share of the stream; the loop places it as a global batch.

host_data(dcfg, split, encode, same_on_hosts)  the process's batch iterator
global_batch(host_batch, mesh)                  host rows -> one global array per key,
                                                sharded over the mesh's data x fsdp axes
check_batch_divides(config, mesh)               the global batch size, or a clear error
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from puma_jax.data import pipeline

# Mesh axes the batch dimension is split over (FSDP shards data as well as parameters).
BATCH_AXES = ("data", "fsdp")


class HostSlice:
  """Every host reads the whole global stream and keeps its rows of each global batch.

  Only for checking multi-process training against one process (identical global batches);
  real runs shard the sources by host (`data.pipeline.build`)."""

  def __init__(self, it, index: int, count: int):
    self.it, self.index, self.count = it, index, count

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    n = len(next(iter(batch.values()))) // self.count
    return {k: v[self.index * n : (self.index + 1) * n] for k, v in batch.items()}

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)

  def metrics(self):
    return self.it.metrics()


def host_data(dcfg, split: str, encode, same_on_hosts: bool, **build):
  """This process's iterator of host batches (`data.batch_size` rows), with get_state,
  set_state and metrics. `same_on_hosts`: every host reads the global stream (`HostSlice`).
  `build`: more `pipeline.build` arguments (readers, decode)."""
  if same_on_hosts and jax.process_count() > 1:
    dcfg = dcfg.copy_and_resolve_references()
    dcfg.batch_size = int(dcfg.batch_size) * jax.process_count()
    it = pipeline.build(dcfg, split=split, encode=encode, host_index=0, host_count=1, **build)
    return HostSlice(iter(it), jax.process_index(), jax.process_count())
  return iter(pipeline.build(dcfg, split=split, encode=encode, **build))


def check_batch_divides(config, mesh) -> int:
  """The global batch (data.batch_size per host x hosts), checked against the mesh and
  train.grad_accum_steps."""
  per_host = int(config.data.batch_size)
  global_size = per_host * jax.process_count()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_size % shards:
    raise ValueError(
      f"data.batch_size={per_host} per host x {jax.process_count()} host(s) = "
      f"{global_size} does not divide over mesh data x fsdp = {shards} devices"
    )
  accum = int(config.train.grad_accum_steps)
  if accum < 1 or global_size % accum or (global_size // accum) % shards:
    raise ValueError(
      f"train.grad_accum_steps={accum} must split the global batch "
      f"{global_size} into microbatches divisible by data x fsdp = {shards}"
    )
  return global_size


def batch_sharding(mesh) -> NamedSharding:
  """Where a global batch lives: rows split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(host_batch: dict, mesh) -> dict:
  """Every process's host rows -> global arrays (rows over data x fsdp; scalars replicated)."""

  def put(x):
    x = np.asarray(x)
    spec = P(BATCH_AXES) if x.ndim else P()
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

  return {k: put(v) for k, v in host_batch.items()}
