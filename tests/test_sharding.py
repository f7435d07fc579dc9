"""Mesh construction and the logical-axis rule table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from puma_jax import sharding


def test_make_mesh_shapes_and_errors():
  m = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  assert dict(sharding.make_mesh((1, 8, 1)).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="does not divide the 8 available devices"):
    sharding.make_mesh({"data": -1, "fsdp": 3})
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match="unknown axis"):
    sharding.make_mesh({"model": 8})
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh({"data": -1, "fsdp": -1})


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "act_seq", "act_embed")) == P(("data", "fsdp"))
  # a mesh axis is used once per array
  assert sharding.logical_to_spec(("embed", "embed")) == P("fsdp")
  # non-dividing dimensions stay replicated over that mesh axis
  assert sharding.logical_to_spec(("embed", "mlp"), shape=(6, 3), mesh=mesh) == P("fsdp")
  assert sharding.logical_to_spec(("batch", None), shape=(2, 5), mesh=mesh) == P("data")
  assert sharding.logical_to_spec(("norm",)) == P()
  custom = (("embed", "tensor"),)
  assert sharding.logical_to_spec(("embed", "mlp"), custom) == P("tensor")


def test_non_dividing_axis_is_logged_once_or_refused(caplog):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with caplog.at_level("WARNING"):
    for _ in range(2):
      spec = sharding.logical_to_spec(("embed", "mlp"), shape=(6, 3), mesh=mesh, what="w_odd")
  assert spec == P("fsdp")
  hits = [r.getMessage() for r in caplog.records if "w_odd" in r.getMessage()]
  assert len(hits) == 1 and "'mlp'" in hits[0] and "'tensor'" in hits[0], hits
  with pytest.raises(
    ValueError,
    match=r"w_odd \(6, 3\): dimension 1 \('mlp', size 3\).*"
    r"2 shards over mesh axis 'tensor'",
  ):
    sharding.logical_to_spec(("embed", "mlp"), shape=(6, 3), mesh=mesh, strict=True, what="w_odd")
  # dividing shapes pass strict mode; state_shardings names the offending parameter
  assert sharding.logical_to_spec(("embed", "mlp"), shape=(6, 4), mesh=mesh, strict=True) == P(
    "fsdp", "tensor"
  )
  from flax import nnx
  from puma_jax.models import layers

  dense = nnx.eval_shape(
    lambda: layers.Dense(4, 3, axes=("embed", "mlp"), use_bias=False, rngs=nnx.Rngs(0))
  )
  with pytest.raises(ValueError, match=r"^kernel \(4, 3\).*'tensor'"):
    sharding.state_shardings(nnx.state(dense), mesh, strict=True)
  got = sharding.state_shardings(nnx.state(dense), mesh)
  assert got["kernel"].value.spec == P("fsdp")


def test_materialize_fills_params_zeroes_the_rest_and_shards():
  from flax import nnx
  from puma_jax.models import layers

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = layers.Dense(4, 8, axes=("embed", "mlp"), rngs=rngs)
      self.count = nnx.BatchStat(jnp.ones((3,)))

  abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
  params = {
    "dense": {
      "kernel": np.arange(32, dtype=np.float32).reshape(4, 8),
      "bias": np.ones(8, np.float32),
    }
  }
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  net = sharding.materialize(abstract, params, mesh=mesh)
  np.testing.assert_array_equal(net.dense.kernel[...], params["dense"]["kernel"])
  np.testing.assert_array_equal(net.count[...], np.zeros(3))
  assert net.dense.kernel[...].sharding.spec == P("fsdp", "tensor")
  with pytest.raises(ValueError, match=r"missing \['dense.bias'\]"):
    sharding.materialize(abstract, {"dense": {"kernel": params["dense"]["kernel"]}})
  with pytest.raises(ValueError, match=r"dense.kernel: given \(8, 4\), model \(4, 8\)"):
    sharding.materialize(
      abstract, dict(params, dense=dict(params["dense"], kernel=np.zeros((8, 4))))
    )


def test_constrain_is_noop_without_mesh_and_shards_with_one():
  x = jnp.ones((8, 4))
  assert sharding.constrain(x, ("batch", None)) is x
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  with sharding.use_mesh(mesh):
    y = jax.jit(lambda v: sharding.constrain(v * 2, ("batch", None)))(x)
  assert y.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))
  with pytest.raises(ValueError, match="rank 2"):
    with sharding.use_mesh(mesh):
      sharding.constrain(x, ("batch",))


def _gathers_after_partitioning(compile_dir, precision):
  """Element types of every all-gather in the tiny MLLM train step on an 8-way FSDP mesh,
  read from the HLO right after SPMD partitioning (the CPU backend later widens bfloat16
  collectives to float32, which a GPU or TPU does not)."""
  import functools
  import re

  from puma_jax.training import data as data_lib, init as init_lib, mllm, registry
  from tests.test_train import small_config

  c = small_config()
  c.precision, c.num_devices = precision, 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
  stage = registry.make(c)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  a = init_lib.abstract_state(stage, mesh)
  batch = data_lib.global_batch(stage.device_arrays(next(stage.train_data())), mesh)
  step = functools.partial(
    mllm.train_step, graphdef=a.graphdef, tx=a.tx, weights=stage.weights, ce_chunk=stage.ce_chunk
  )
  with sharding.use_mesh(mesh):
    jax.jit(step).lower(a.state(), a.frozen_structs(), a.rest_structs(), batch).compile(
      compiler_options={
        "xla_dump_to": str(compile_dir),
        "xla_dump_hlo_pass_re": "spmd-partitioning",
      }
    )
  (hlo,) = compile_dir.glob("*train_step*after_spmd-partitioning*.txt")
  return re.findall(r"= (\w+)\[[\d,]*\]\S* all-gather\(", hlo.read_text())


def test_fsdp_parameter_all_gathers_move_the_compute_dtype(tmp_path):
  """bfloat16 compute: every all-gather of the sharded step is bfloat16, half the bytes of the
  float32 masters; the LM head's backward (layers.dot_f32) was the one that gathered float32.
  float32 compute gathers float32 (the check sees the dtype)."""
  bf16 = _gathers_after_partitioning(tmp_path / "bf16", "bfloat16")
  floats = [t for t in bf16 if t in ("f32", "bf16", "f16")]
  assert len(floats) > 20 and set(floats) == {"bf16"}, sorted(set(bf16))
  f32 = _gathers_after_partitioning(tmp_path / "f32", "float32")
  assert {t for t in f32 if t in ("f32", "bf16", "f16")} == {"f32"}
