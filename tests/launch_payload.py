"""Payload for tests/test_launch.py: joins the launched processes through
`puma_jax.distributed` (env from launch/local.sh) and sums one value per device across all
processes; PUMA_TEST_FAIL_PROCESS=i makes process i fail instead."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from puma_jax import config_lib, distributed


def main() -> int:
  pid = int(os.environ["PUMA_PROCESS_ID"])
  if os.environ.get("PUMA_TEST_FAIL_PROCESS") == str(pid):
    print(f"process {pid}: failing on purpose", flush=True)
    return 3
  # the configs' block: the coordinator and process ids come from the PUMA_* environment
  distributed.initialize(ml_collections.ConfigDict({"distributed": config_lib.distributed()}))
  n = jax.process_count()
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  # every local device holds (process id + 1): the global sum needs every process's data
  local = np.full((jax.local_device_count(),), pid + 1, np.float32)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
  total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
  want = float(jax.local_device_count() * n * (n + 1) / 2)
  print(
    f"process {pid} of {n}: {jax.device_count()} devices, sum {total} (want {want})", flush=True
  )
  return 0 if total == want else 1


if __name__ == "__main__":
  sys.exit(main())
