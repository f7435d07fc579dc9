"""The memory plan's estimate next to XLA's own buffer assignment for the compiled train step.

  python -m benchmarks.bench_memory_plan [--devices=1] [--batch=8] [--remat=none,full,dots]
      [--seq_len=768] [--layers=2,6] [--hidden 64]

Builds the MLLM step exactly as train.py jits it (in/out shardings, donated state), lowers it
on abstract inputs and compiles it (nothing is allocated), then prints
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
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={n}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs import pretrain  # noqa: E402
from puma_jax import cli, optim, sharding, tasks  # noqa: E402
from puma_jax.steps import TrainState  # noqa: E402
from puma_jax.tools import memory_plan as mp  # noqa: E402

MiB = 2 ** 20


def compiled_memory(config, mesh):
  task = tasks.make(config)
  abstract = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
  graphdef, trainable_a, frozen_a, rest_a = optim.split_trainable(abstract, task.frozen)
  pure = nnx.to_pure_dict
  p_shard = pure(sharding.state_shardings(trainable_a, mesh))
  f_shard = pure(sharding.state_shardings(frozen_a, mesh))
  rep = NamedSharding(mesh, P())
  r_shard = jax.tree.map(lambda _: rep, pure(rest_a))
  tx, _ = task.optimizer(pure(trainable_a))
  opt_a = jax.eval_shape(tx.init, pure(trainable_a))
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shard = optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, opt_a, p_shard,
                                    transform_non_params=lambda x: x if masked(x) else rep,
                                    is_leaf=masked)
  sds = lambda t, s: jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                                     sharding=sh), t, s)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                     params=sds(pure(trainable_a), p_shard), opt_state=sds(opt_a, opt_shard))
  state_shard = TrainState(step=rep, params=p_shard, opt_state=opt_shard)
  host = task.device_arrays(next(task.train_data()))
  gb = int(config.data.batch_size)
  bshard = NamedSharding(mesh, P(("data", "fsdp")))
  batch = {k: jax.ShapeDtypeStruct((gb,) + np.shape(v)[1:], np.asarray(v).dtype, sharding=bshard)
           for k, v in host.items()}
  step = jax.jit(task.train_step(graphdef, tx),
                 in_shardings=(state_shard, f_shard, r_shard, bshard),
                 out_shardings=(state_shard, None), donate_argnums=(0,))
  with sharding.use_mesh(mesh):
    compiled = step.lower(state, sds(pure(frozen_a), f_shard), sds(pure(rest_a), r_shard),
                          batch).compile()
  return compiled.memory_analysis()


FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 1, "devices to plan for")
flags.DEFINE_integer("batch", 8, "global batch")
flags.DEFINE_integer("seq_len", 768, "sequence length")
flags.DEFINE_list("remat", ["none", "full", "dots"], "remat policies, comma-separated")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_boolean("scan", False, "scan_layers=True (as the paper config)")
flags.DEFINE_list("layers", ["2", "6"], "LLaMA depths, comma-separated; the slope of XLA's "
                  "temporaries over depth is the bytes saved per layer, the plan's per-layer term")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  print(f"{'remat':<8}{'layers':>7}{'plan static':>12}{'XLA args':>10}"
        f"{'plan act+logits+trans':>23}{'XLA temp':>10}   (MiB per device, {args.devices} "
        f"{jax.devices()[0].platform} devices, batch {args.batch}, seq {args.seq_len}, "
        f"{args.dtype})")
  slopes = []
  for remat, layers in [(r, n) for r in args.remat for n in map(int, args.layers)]:
    c = pretrain.get_config("tiny")
    with c.unlocked():
      c.model.llm.remat_policy = remat
      c.data.batch_size = args.batch
      c.seq_len = args.seq_len
      c.dtype = args.dtype
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
      c.model.llm.num_hidden_layers = layers
      c.model.llm.scan_layers = args.scan
    mesh = sharding.make_mesh(c.mesh.to_dict())
    plan = mp.make_plan(c, args.devices, 32, processes=1)
    static = plan.rows["params"] + plan.rows["grads"] + plan.rows["optimizer"]
    dynamic = plan.rows["activations"] + plan.rows["logits"] + plan.rows["transient"]
    m = compiled_memory(c, mesh)
    print(f"{remat:<8}{layers:>7}{static / MiB:>12.1f}{m.argument_size_in_bytes / MiB:>10.1f}"
          f"{dynamic / MiB:>23.1f}{m.temp_size_in_bytes / MiB:>10.1f}", flush=True)
    slopes.append((remat, layers, m.temp_size_in_bytes, plan.details["per_layer_per_token"]
                   * plan.details["tokens_per_device"]))
  print("per-layer saved bytes (MiB): XLA = temp slope over depth, plan = formula")
  for (r0, l0, t0, plan0), (r1, l1, t1, _) in zip(slopes, slopes[1:]):
    if r0 == r1 and l1 != l0:
      print(f"  {r0:<8} XLA {(t1 - t0) / (l1 - l0) / MiB:8.2f}   plan {plan0 / MiB:8.2f}")


if __name__ == "__main__":
  sys.exit(cli.run(main, doc=__doc__))
