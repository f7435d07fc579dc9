"""Multi-process (multi-host) initialization: `jax.distributed.initialize` from config or env.

On SLURM and Cloud TPU, JAX discovers the coordinator itself: set `distributed.auto = True`.
Elsewhere pass `coordinator_address`, `num_processes`, `process_id` (flags or the environment
variables PUMA_COORDINATOR, PUMA_NUM_PROCESSES, PUMA_PROCESS_ID that launch/local.sh sets).
On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax
from absl import logging

_done = False


def initialize(config) -> None:
  global _done
  if _done:
    return
  d = config.get("distributed", None)
  addr = (d.coordinator_address if d else "") or os.environ.get("PUMA_COORDINATOR", "")
  nproc = int((d.num_processes if d else 0) or os.environ.get("PUMA_NUM_PROCESSES", 0) or 0)
  pid = d.process_id if d and d.process_id >= 0 else None
  if pid is None and "PUMA_PROCESS_ID" in os.environ:
    pid = int(os.environ["PUMA_PROCESS_ID"])
  auto = bool(d.auto) if d else False
  if not (addr or auto):
    return
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize()
  else:
    if nproc < 1 or pid is None:
      raise ValueError(
        "distributed: coordinator_address given without num_processes and "
        "process_id (config.distributed.* or PUMA_NUM_PROCESSES/PUMA_PROCESS_ID)"
      )
    jax.distributed.initialize(addr, num_processes=nproc, process_id=pid)
  _done = True
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
