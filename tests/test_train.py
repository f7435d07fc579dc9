"""The training system: sharded == single-device step, resume after kill -9, two processes,
NaN stop, SIGTERM, bad input, and the tiny default end to end."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from puma_jax import checkpoints, sharding
from puma_jax.training import (
  checkpoints as checkpoints_lib,
  data as data_lib,
  init as init_lib,
  loop,
  registry,
)

REPO = Path(__file__).resolve().parents[1]


def small_config():
  """configs/pretrain.py:tiny, cut down so each step takes well under a second on CPU."""
  sys.path.insert(0, str(REPO))
  from configs import pretrain

  c = pretrain.get_config("tiny")
  c.seq_len = 448
  for name in ("chat", "edit", "conditional"):
    c.data.sources[name].weight = 0.0
  c.data.max_images = 1
  c.data.batch_size = 8
  c.train.log_every = 1
  c.train.checkpoint_every = 4
  c.train.eval_every = 0
  c.train.async_checkpointing = False
  c.optim.total_steps = 12
  c.optim.warmup_steps = 2
  c.num_devices = 1  # sharding has its own tests; one device keeps compiles short
  return c


def overrides(c) -> list[str]:
  """The command-line overrides that turn configs/pretrain.py:tiny into `small_config()`."""
  return [
    f"--config.seq_len={c.seq_len}",
    "--config.data.sources.chat.weight=0",
    "--config.data.sources.edit.weight=0",
    "--config.data.sources.conditional.weight=0",
    "--config.data.max_images=1",
    f"--config.data.batch_size={c.data.batch_size}",
    "--config.train.log_every=1",
    f"--config.train.checkpoint_every={c.train.checkpoint_every}",
    "--config.train.eval_every=0",
    "--config.train.async_checkpointing=False",
    f"--config.optim.total_steps={c.optim.total_steps}",
    f"--config.optim.warmup_steps={c.optim.warmup_steps}",
  ]


def read_metrics(workdir):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, lines)}


def run_main(workdir, extra=(), env=None, module="puma_jax.main", **kw):
  cmd = [
    sys.executable,
    "-m",
    module,
    "--config=configs/pretrain.py",
    f"--workdir={workdir}",
    *overrides(small_config()),
    *extra,
  ]
  e = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.Popen(
    cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
  )


def one_step(config, mesh):
  stage = registry.make(config)
  with sharding.use_mesh(mesh):
    got = init_lib.restore_or_init(stage, None, mesh)
  host = next(stage.train_data())
  batch = data_lib.global_batch(stage.device_arrays(host), mesh)
  step = jax.jit(stage.train_step(got.abstract.graphdef, got.abstract.tx))
  with sharding.use_mesh(mesh):
    new, metrics = step(got.state, got.frozen, got.rest, batch)
  return new, metrics, got.state.params


def linear_update_config(config):
  """A first step that updates (no warm-up: the learning rate is at its peak from step 0) and
  whose update is linear in the gradient (Adam's eps far above the gradients, so Adam does not
  divide a gradient's scale away; no global-norm clipping, which would scale it back). A gradient
  off by a factor (a sum instead of a mean over devices) or missing a shard's rows then changes
  the update and Adam's moments. The large eps also keeps float32 rounding in near-zero
  gradients from flipping an update's sign."""
  config.optim.warmup_steps = 0
  config.optim.eps = 1.0
  config.optim.grad_clip = 0.0
  return config


def _leaves(tree):
  return jax.tree.leaves(jax.device_get(tree))


def assert_same_update(new, ref, init):
  """The two steps moved the parameters (not two no-ops) by the same amount."""
  d_new, d_ref = ([a - b for a, b in zip(_leaves(x.params), _leaves(init))] for x in (new, ref))
  scale = max(float(np.abs(d).max()) for d in d_ref)
  assert scale > 0
  worst = max(float(np.abs(a - b).max()) for a, b in zip(d_new, d_ref)) / scale
  assert worst < 1e-3, worst


def assert_same_state(new, ref, init, steps=1):
  """Same step count, the same parameter update (`assert_same_update`) and the same optimizer
  state: each kind of moment (Adam's mu, nu; counts) compared against its own largest value, so
  a gradient scaled by a factor shows in mu (linear in g) and nu (quadratic)."""
  assert int(new.step) == int(ref.step) == steps
  assert_same_update(new, ref, init)
  by_kind = {}
  for (path, a), (_, b) in zip(
    jax.tree_util.tree_leaves_with_path(jax.device_get(new.opt_state)),
    jax.tree_util.tree_leaves_with_path(jax.device_get(ref.opt_state)),
  ):
    kind = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)][-1]
    by_kind.setdefault(kind, []).append((np.asarray(a, np.float64), np.asarray(b, np.float64)))
  assert {"mu", "nu", "count"} <= set(by_kind), sorted(by_kind)
  for kind, pairs in by_kind.items():
    scale = max(float(np.abs(b).max()) for _, b in pairs)
    assert scale > 0, kind
    worst = max(float(np.abs(a - b).max()) for a, b in pairs) / scale
    assert worst < 1e-4, (kind, worst)


def test_sharded_step_equals_single_device():
  """One update on 8 devices (data x fsdp x tensor = 2 x 2 x 2) is the one-device update: the
  parameters, Adam's moments and the loss, with a first step that moves linearly in g."""
  config = linear_update_config(small_config())
  single = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  ref, ref_m, init = one_step(config, single)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  new, m, _ = one_step(config, mesh)
  # parameters and optimizer state really are sharded over fsdp x tensor
  k = new.params["llm"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
  assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  mu = (
    new.opt_state.inner_states["llm"]  # multi_transform's state (no clipping in front of it)
    .inner_state[0]
    .mu["llm"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
  )
  assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert_same_state(new, ref, init)
  np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=1e-4)


def test_grad_accumulation_equals_one_big_batch():
  config = linear_update_config(small_config())
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  ref, ref_m, init = one_step(config, mesh)
  config.train.grad_accum_steps = 4
  new, m, _ = one_step(config, mesh)
  np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
  assert_same_update(new, ref, init)


def test_loss_falls_and_resume_after_kill9_is_identical(tmp_path):
  """Uninterrupted run vs a run killed (-9) after its step-4 checkpoint and then resumed."""
  full = tmp_path / "full"
  # Both runs are processes with the same device setup (in-process runs see 8 fake devices,
  # which changes XLA's CPU partitioning and so the last bits).
  proc = run_main(full)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  ref = read_metrics(full)
  assert sorted(ref) == list(range(1, 13))
  assert np.mean([ref[s]["loss"] for s in (10, 11, 12)]) < np.mean(
    [ref[s]["loss"] for s in (1, 2, 3)]
  )

  crash = tmp_path / "crash"
  # The run kills itself (-9) right after saving step 4 (tests/kill9_payload.py): a known point,
  # on any machine.
  proc = run_main(crash, module="tests.kill9_payload", env={"PUMA_TEST_KILL_AFTER_SAVE": "4"})
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  assert sorted(p.name for p in (crash / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
  assert sorted(read_metrics(crash)) == [1, 2, 3, 4]
  done = run_main(crash)
  out, err = done.communicate(timeout=600)
  assert done.returncode == 0, err[-3000:]
  got = read_metrics(crash)
  assert sorted(got) == list(range(1, 13))
  for s in range(5, 13):
    assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])


_PORT_TAKEN = "Failed to start RPC server"  # jax.distributed: the coordinator could not bind


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def final_state(workdir, config, step):
  """The training state a run saved at `step`, restored on one device, and the fresh init."""
  stage = registry.make(config)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with sharding.use_mesh(mesh):
    init = init_lib.restore_or_init(stage, None, mesh)
    manager = checkpoints_lib.train_manager(Path(workdir) / "checkpoints", config)
    state, _, _ = checkpoints_lib.restore_train(
      manager, step, init.abstract.state(), init.abstract.frozen_structs()
    )
  manager.close()
  return state, init.state.params


def test_two_processes_agree_with_one(tmp_path):
  """Two processes (one device each, a coordinator) train as one process does: the losses, and
  after 3 updates that move linearly in g the parameters and Adam's moments (a gradient summed
  over hosts instead of averaged, or one host's rows missing from it, would differ)."""
  steps = [
    "--config.optim.total_steps=3",
    "--config.optim.warmup_steps=0",
    "--config.optim.eps=1.0",
    "--config.optim.grad_clip=0.0",
    "--config.train.same_data_on_hosts=True",
  ]
  for attempt in range(3):
    # A port found free here can be taken before the coordinator binds it: then a new one.
    port = _free_port()
    procs = [
      run_main(
        tmp_path / f"multi{attempt}",
        steps + ["--config.data.batch_size=4"],
        env={
          "PUMA_COORDINATOR": f"localhost:{port}",
          "PUMA_NUM_PROCESSES": "2",
          "PUMA_PROCESS_ID": str(i),
        },
      )
      for i in range(2)
    ]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, errs)]
    if not any(rc and _PORT_TAKEN in err for rc, err in results):
      break
  for rc, err in results:
    assert rc == 0, err[-3000:]
  multi_dir = tmp_path / f"multi{attempt}"
  one = run_main(tmp_path / "one", steps + ["--config.data.batch_size=8"])
  out, err = one.communicate(timeout=900)
  assert one.returncode == 0, err[-3000:]
  config = linear_update_config(small_config())
  multi, init = final_state(multi_dir, config, 3)
  single, _ = final_state(tmp_path / "one", config, 3)
  assert_same_state(multi, single, init, steps=3)
  a, b = read_metrics(multi_dir), read_metrics(tmp_path / "one")
  for s in (1, 2, 3):
    np.testing.assert_allclose(a[s]["loss"], b[s]["loss"], rtol=1e-5)
    np.testing.assert_allclose(a[s]["grad_norm"], b[s]["grad_norm"], rtol=1e-4)


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = small_config()
  config.optim.total_steps = 4
  loop.train_and_evaluate(config, str(tmp_path))
  config.optim.total_steps = 8
  config.loss.image_weight = float("nan")
  with pytest.raises(loop.StopTraining, match="non-finite loss or gradient at step 5.*step 4"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
    4
  ]
  config.loss.image_weight = 1.0
  config.optim.total_steps = 5
  loop.train_and_evaluate(config, str(tmp_path))  # resumes from the good step 4
  assert read_metrics(tmp_path)[5]["loss"] > 0


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = run_main(
    tmp_path, ["--config.optim.total_steps=1000", "--config.train.checkpoint_every=1000"]
  )
  deadline = time.time() + 600
  while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 1 <= saved[0] < 1000


def test_bad_inputs(tmp_path):
  config = small_config()
  config.num_devices = 0
  config.mesh.data, config.mesh.fsdp = 3, -1
  with pytest.raises(ValueError, match="does not divide the 8 available devices"):
    loop.train_and_evaluate(config, str(tmp_path / "a"))
  config = small_config()
  config.num_devices = 0
  config.data.batch_size = 6
  config.mesh.data, config.mesh.fsdp = 4, 2
  with pytest.raises(ValueError, match="data.batch_size=6 .* does not divide over mesh"):
    loop.train_and_evaluate(config, str(tmp_path / "b"))
  config = small_config()
  config.seq_len = 300  # no image example (343 image positions) can fit
  config.data.sources.text.weight = 0.0  # (text-only documents are cut to fit)
  config.data.max_consecutive_skips = 20
  with pytest.raises(Exception, match="bad records in a row"):
    loop.train_and_evaluate(config, str(tmp_path / "c"))


def test_workdir_of_another_model_is_refused_and_kept(tmp_path):
  config = small_config()
  config.optim.total_steps = 4
  loop.train_and_evaluate(config, str(tmp_path))
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  other = small_config()
  other.model.llm.num_hidden_layers = 3
  with pytest.raises(checkpoints.CheckpointError, match="another model.*llm|another model"):
    loop.train_and_evaluate(other, str(tmp_path))
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_unknown_config_field_is_a_clear_error(tmp_path):
  proc = run_main(tmp_path, ["--config.train.totl_steps=5"])
  out, err = proc.communicate(timeout=300)
  assert proc.returncode != 0 and "totl_steps" in err
