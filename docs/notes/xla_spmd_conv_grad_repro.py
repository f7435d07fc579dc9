"""XLA SPMD partitioner bug (jax/jaxlib 0.10.2, CPU; Shardy and GSPMD alike): a dot or 3x3 conv
whose contracted dimension is sharded over mesh axis T in both operands, whose lhs batch is
sharded over the axis pair (A, B) while the rhs's other dimension is sharded over B, and whose
output feature dimension is wanted sharded over T, comes back with batch blocks swapped between
devices: up to 100%+ error against one device.

The partitioned HLO shows why: the partitioner collective-permutes the lhs so that its batch
blocks follow the rhs's device order (B major, A minor: (d, f) = (0, 1) <-> (1, 0), devices
2<->4 and 3<->5 on the 2x2x2 mesh), computes, all-reduces over T and dynamic-slices the output
features, but never permutes the result back to the (A, B) order its sharding claims.

Where it bit puma_jax: the backward-data conv of a UNet ResnetBlock2D's conv1 (kernel
(conv_in, conv_out) -> (fsdp, tensor); the cotangent dy has batch over (data, fsdp) and channels
over tensor), when sharding propagation gave the gradient w.r.t. the conv's input (the
unconstrained concat of hidden state and skip in an up block) channels sharded over tensor. Only
a mesh with all three axes > 1 has the pattern. Workaround: constrain that activation to FMAP
(channels replicated), see puma_jax/models/unet_blocks.py.

Run: python docs/notes/xla_spmd_conv_grad_repro.py
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

jax.config.update("jax_default_matmul_precision", "highest")
mesh = jax.make_mesh(
  (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
)
N = lambda *spec: NamedSharding(mesh, P(*spec))
B = ("data", "fsdp")
rng = np.random.default_rng(0)


def check(name, f, x, w, x_spec, w_spec, out_spec):
  ref = np.asarray(jax.jit(f)(x, w))  # unsharded
  got = jax.jit(f, in_shardings=(N(*x_spec), N(*w_spec)), out_shardings=N(*out_spec))(x, w)
  err = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
  print(f"{name:58s} x {x_spec} w {w_spec} -> {out_spec}: max rel err {err:.1e}")


dot = lambda x, w: x @ w.T  # x (8, 32), w (48, 32): contracts the 32 (sharded over tensor)
x, w = rng.standard_normal((8, 32), np.float32), rng.standard_normal((48, 32), np.float32)
check(
  "dot, out features over tensor (WRONG)",
  dot,
  x,
  w,
  (B, "tensor"),
  ("fsdp", "tensor"),
  (B, "tensor"),
)
check(
  "dot, batch over (fsdp, data) instead (right)",
  dot,
  x,
  w,
  (("fsdp", "data"), "tensor"),
  ("fsdp", "tensor"),
  (("fsdp", "data"), "tensor"),
)
check(
  "dot, out features replicated (right)", dot, x, w, (B, "tensor"), ("fsdp", "tensor"), (B, None)
)


# The backward-data conv of a 48 -> 32 channel 3x3 conv (kernel HWIO (3, 3, 48, 32) sharded
# (fsdp, tensor)): contracts the kernel's O with dy's 32 channels.
def conv_t(dy, w):
  return jax.lax.conv_general_dilated(
    dy, w[::-1, ::-1], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWOI", "NHWC")
  )


dy = rng.standard_normal((8, 8, 8, 32), np.float32)
k = rng.standard_normal((3, 3, 48, 32), np.float32)
fm = (B, None, None)
check(
  "conv backward-data, dx channels over tensor (WRONG)",
  conv_t,
  dy,
  k,
  fm + ("tensor",),
  (None, None, "fsdp", "tensor"),
  fm + ("tensor",),
)
check(
  "conv backward-data, dx channels replicated (right)",
  conv_t,
  dy,
  k,
  fm + ("tensor",),
  (None, None, "fsdp", "tensor"),
  fm + (None,),
)


# The same through jax.grad: the input's sharding constraint also pins its cotangent.
def loss(x, w, x_spec):
  x = jax.lax.with_sharding_constraint(x, N(*x_spec))
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return (jax.numpy.sin(jax.lax.with_sharding_constraint(y, N(*fm, "tensor")))).sum()


xin = rng.standard_normal((8, 8, 8, 48), np.float32)
ref = np.asarray(jax.jit(jax.grad(loss), static_argnums=2)(xin, k, fm + (None,)))
for spec, what in ((fm + ("tensor",), "WRONG"), (fm + (None,), "right")):
  ks = jax.device_put(k, N(None, None, "fsdp", "tensor"))
  got = np.asarray(jax.jit(jax.grad(loss), static_argnums=2)(xin, ks, spec))
  err = np.abs(got - ref).max() / np.abs(ref).max()
  print(f"grad w.r.t. a conv input constrained to {spec} ({what}): max rel err {err:.1e}")
