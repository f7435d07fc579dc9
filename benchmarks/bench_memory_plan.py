"""The memory plan's estimate next to XLA's own buffer assignment for the compiled train step.

  python -m benchmarks.bench_memory_plan [--devices=1] [--batch=8] [--remat=none,full,dots]
      [--seq_len=768] [--layers=2,6] [--hidden 64]

Builds the MLLM step exactly as training/loop.py jits it (in/out shardings, donated state),
lowers it on abstract inputs and compiles it (nothing is allocated), then prints
`compiled.memory_analysis()` per device (arguments, outputs, temporaries) beside the plan's
rows. The plan's params+grads+optimizer correspond to XLA's argument/output bytes; its
activations+logits+transient to XLA's temporaries. Run it on the device kind you plan for: CPU
buffer assignment differs from GPU/TPU.
"""

from __future__ import annotations

import os
import sys

if "--devices" in os.sys.argv:
  n = os.sys.argv[os.sys.argv.index("--devices") + 1]
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
  )

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from configs import pretrain  # noqa: E402
from puma_jax import cli, sharding  # noqa: E402
from puma_jax.tools import memory_plan as mp  # noqa: E402
from puma_jax.training import data as data_lib, init, registry  # noqa: E402

MiB = 2**20


def compiled_memory(config, mesh):
  stage = registry.make(config)
  a = init.abstract_state(stage, mesh)
  host = stage.device_arrays(next(stage.train_data()))
  gb = int(config.data.batch_size)
  bshard = data_lib.batch_sharding(mesh)
  batch = {
    k: jax.ShapeDtypeStruct((gb,) + np.shape(v)[1:], np.asarray(v).dtype, sharding=bshard)
    for k, v in host.items()
  }
  step = jax.jit(
    stage.train_step(a.graphdef, a.tx),
    in_shardings=(a.state_sharding, a.frozen_sharding, a.rest_sharding, bshard),
    out_shardings=(a.state_sharding, None),
    donate_argnums=(0,),
  )
  with sharding.use_mesh(mesh):
    compiled = step.lower(a.state(), a.frozen_structs(), a.rest_structs(), batch).compile()
  return compiled.memory_analysis()


FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 1, "devices to plan for")
flags.DEFINE_integer("batch", 8, "global batch")
flags.DEFINE_integer("seq_len", 768, "sequence length")
flags.DEFINE_list("remat", ["none", "full", "dots"], "remat policies, comma-separated")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_boolean("scan", False, "scan_layers=True (as the paper config)")
flags.DEFINE_list(
  "layers",
  ["2", "6"],
  "LLaMA depths, comma-separated; the slope of XLA's "
  "temporaries over depth is the bytes saved per layer, the plan's per-layer term",
)


def main(argv):
  args = FLAGS
  print(
    f"{'remat':<8}{'layers':>7}{'plan static':>12}{'XLA args':>10}"
    f"{'plan act+logits+trans':>23}{'XLA temp':>10}   (MiB per device, {args.devices} "
    f"{jax.devices()[0].platform} devices, batch {args.batch}, seq {args.seq_len}, "
    f"{args.dtype})"
  )
  slopes = []
  for remat, layers in [(r, n) for r in args.remat for n in map(int, args.layers)]:
    c = pretrain.get_config("tiny")
    with c.unlocked():
      c.model.llm.remat_policy = remat
      c.data.batch_size = args.batch
      c.seq_len = args.seq_len
      c.precision = args.dtype
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
      c.model.llm.num_hidden_layers = layers
      c.model.llm.scan_layers = args.scan
    mesh = sharding.make_mesh(c.mesh.to_dict())
    plan = mp.make_plan(c, args.devices, 32, processes=1)
    static = plan.rows["params"] + plan.rows["grads"] + plan.rows["optimizer"]
    dynamic = plan.rows["activations"] + plan.rows["logits"] + plan.rows["transient"]
    m = compiled_memory(c, mesh)
    print(
      f"{remat:<8}{layers:>7}{static / MiB:>12.1f}{m.argument_size_in_bytes / MiB:>10.1f}"
      f"{dynamic / MiB:>23.1f}{m.temp_size_in_bytes / MiB:>10.1f}",
      flush=True,
    )
    slopes.append(
      (
        remat,
        layers,
        m.temp_size_in_bytes,
        plan.details["per_layer_per_token"] * plan.details["tokens_per_device"],
      )
    )
  print("per-layer saved bytes (MiB): XLA = temp slope over depth, plan = formula")
  for (r0, l0, t0, plan0), (r1, l1, t1, _) in zip(slopes, slopes[1:]):
    if r0 == r1 and l1 != l0:
      print(f"  {r0:<8} XLA {(t1 - t0) / (l1 - l0) / MiB:8.2f}   plan {plan0 / MiB:8.2f}")


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
