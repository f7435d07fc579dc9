"""Training loop shared by every PUMA stage: mesh, sharded init, restore, steps, logging.

    train_and_evaluate(config, workdir)

The stage (`config.stage`: "mllm" or "decoder") supplies a `Task` (puma_jax/tasks.py): how to
build the model, which parameters are frozen, how examples become arrays, and the pure step
functions. Everything else lives here once:

  * mesh from `config.mesh`; parameters initialized through eval_shape -> shardings -> jitted
    init with out_shardings (a model larger than one device never materializes whole);
  * FSDP: parameters, gradients and optimizer state sharded by the logical-axis rules;
  * jitted step with explicit in/out shardings and the train state donated;
  * orbax CheckpointManager (async, keep N): parameters, optimizer state, step, data-iterator
    state and the config; automatic resume from `workdir`; SIGTERM saves and exits cleanly;
  * a non-finite loss stops the run with a clear message (the step never applies a non-finite
    update, so every saved checkpoint is good);
  * clu metric writers (TensorBoard + console) plus `metrics.jsonl`; progress line with ETA;
    throughput and MFU.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from puma_jax import checkpoints, distributed, optim, sharding
from puma_jax.steps import TrainState

# Dense bf16 peak FLOP/s per device, for MFU (None: unknown, MFU not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}


def device_peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


class StopTraining(RuntimeError):
  pass


class _Signals:
  """SIGTERM (preemption, scancel) -> save at the current step and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (tests calling train in a thread)
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _check_batch_divides(config, mesh) -> int:
  per_host = int(config.data.batch_size)
  global_batch = per_host * jax.process_count()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise ValueError(f"data.batch_size={per_host} per host x {jax.process_count()} host(s) = "
                     f"{global_batch} does not divide over mesh data x fsdp = {shards} devices")
  accum = int(config.train.grad_accum_steps)
  if accum < 1 or global_batch % accum or (global_batch // accum) % shards:
    raise ValueError(f"train.grad_accum_steps={accum} must split the global batch "
                     f"{global_batch} into microbatches divisible by data x fsdp = {shards}")
  return global_batch


def _global_batch(host_batch: dict, mesh) -> dict:
  def put(x):
    x = np.asarray(x)
    spec = P(("data", "fsdp")) if x.ndim else P()
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
  return {k: put(v) for k, v in host_batch.items()}


class MetricsLog:
  """metrics.jsonl in the workdir (one JSON object per logged step) + clu writers."""

  def __init__(self, workdir: Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.is_main = jax.process_index() == 0
    if self.is_main and self.path.exists():
      # After a resume, steps past the restored checkpoint are recomputed: drop their old lines.
      keep = [l for l in self.path.read_text().splitlines()
              if l.strip() and json.loads(l).get("step", 0) <= resume_step]
      self.path.write_text("".join(l + "\n" for l in keep))
    self.writer = None
    if self.is_main:
      try:
        from clu import metric_writers
        self.writer = metric_writers.create_default_writer(str(workdir / "tensorboard"),
                                                           just_logging=False)
      except Exception as e:  # clu's TensorBoard writer needs tensorflow; console still works
        logging.warning("metric writers unavailable (%s); writing metrics.jsonl only", e)

  def write(self, step: int, scalars: dict, prefix: str = ""):
    scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    if not self.is_main:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)
      self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _restore_or_init(task, manager, mesh, rules, config):
  """(graphdef, TrainState, frozen, rest, data_state or None), sharded."""
  build = lambda: task.build(nnx.Rngs(int(config.seed)))
  abstract = nnx.eval_shape(build)
  graphdef, trainable_a, frozen_a, rest_a = optim.split_trainable(abstract, task.frozen)
  to_pure = nnx.to_pure_dict
  p_shard = to_pure(sharding.state_shardings(trainable_a, mesh, rules))
  f_shard = to_pure(sharding.state_shardings(frozen_a, mesh, rules))
  r_shard = jax.tree.map(lambda _: NamedSharding(mesh, P()), to_pure(rest_a))
  tx, schedules = task.optimizer(to_pure(trainable_a))
  opt_a = jax.eval_shape(tx.init, to_pure(trainable_a))
  replicated = NamedSharding(mesh, P())
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shard = optax.tree_map_params(
      tx, lambda v, s: v if masked(v) else s, opt_a, p_shard,
      transform_non_params=lambda x: x if masked(x) else replicated, is_leaf=masked)
  state_shard = TrainState(step=replicated, params=p_shard, opt_state=opt_shard)

  latest = manager.latest_step() if manager is not None else None
  if latest is not None:
    checkpoints.check_train_meta(manager, latest, task.meta())
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            to_pure(trainable_a), p_shard),
        opt_state=jax.tree.map(
            lambda v, s: v if masked(v) else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
            opt_a, opt_shard, is_leaf=masked))
    abstract_frozen = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), to_pure(frozen_a),
        f_shard)
    state, frozen, data_state = checkpoints.restore_train(manager, latest, abstract_state,
                                                          abstract_frozen)
    rest = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), to_pure(rest_a))
    logging.info("restored step %d from %s", latest, manager.directory)
  else:
    def init():
      model = build()
      task.load_pretrained(model)
      _, trainable, frozen, rest = optim.split_trainable(model, task.frozen)
      params = to_pure(trainable)
      return (TrainState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=tx.init(params)), to_pure(frozen), to_pure(rest))
    if task.loads_pretrained:  # host-side weights: build, then place on the mesh
      state, frozen, rest = init()
      state, frozen = jax.device_put((state, frozen), (state_shard, f_shard))
    else:
      with sharding.use_mesh(mesh, rules):
        state, frozen, rest = jax.jit(init, out_shardings=(state_shard, f_shard, r_shard))()
    data_state = None
  return graphdef, state, frozen, rest, data_state, (state_shard, f_shard, r_shard), tx, schedules


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.stage` in `workdir` (resuming from its latest checkpoint). Returns the last
  logged metrics."""
  from puma_jax import tasks
  distributed.initialize(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  task = tasks.make(config)
  task.workdir = workdir
  n_dev = int(config.get("num_devices", 0) or 0)
  if n_dev and jax.process_count() > 1:
    raise ValueError("config.num_devices restricts a single-process run; leave it 0 with "
                     "several processes")
  mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:n_dev] if n_dev else None)
  rules = sharding.DEFAULT_RULES
  global_batch = _check_batch_divides(config, mesh)
  total = int(config.train.total_steps)
  manager = checkpoints.train_manager(workdir / "checkpoints", config)

  graphdef, state, frozen, rest, data_state, shards, tx, schedules = _restore_or_init(
      task, manager, mesh, rules, config)
  state_shard, f_shard, r_shard = shards
  start = int(state.step)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  data = task.train_data()
  if data_state is not None:
    data.set_state(data_state)
  step_fn = task.train_step(graphdef, tx)
  batch_shard = NamedSharding(mesh, P(("data", "fsdp")))
  jit_step = jax.jit(step_fn, in_shardings=(state_shard, f_shard, r_shard, batch_shard),
                     out_shardings=(state_shard, None), donate_argnums=(0,))

  log = MetricsLog(workdir, start)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("stage %s: %s trainable parameters, %s frozen; mesh %s; global batch %d",
               config.stage, f"{n_params:,}",
               f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen)):,}",
               dict(mesh.shape), global_batch)
  peak = device_peak_flops()
  pending, last = [], {}
  t_log, steps_since = time.perf_counter(), 0
  t_start = time.perf_counter()
  with _Signals() as sig, sharding.use_mesh(mesh, rules):
    step = start
    while step < total:
      host_batch = next(data)
      batch = _global_batch(task.device_arrays(host_batch), mesh)
      state, metrics = jit_step(state, frozen, rest, batch)
      step += 1
      steps_since += 1
      pending.append(metrics)
      if float(metrics["finite"]) < 1:
        manager.wait_until_finished()
        raise StopTraining(
            f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}); the update was not applied and the run "
            f"stopped. Last good checkpoint: step {manager.latest_step()} in "
            f"{manager.directory}")
      if step % int(config.train.log_every) == 0 or step == total:
        dt = time.perf_counter() - t_log
        summed = jax.tree.map(lambda *xs: np.sum(np.stack([np.asarray(x) for x in xs]), 0),
                              *pending)
        scalars = task.summarize(summed, len(pending))
        scalars.update({f"lr/{g}": float(s(step - 1)) for g, s in schedules.items()})
        steps_per_s = steps_since / dt
        scalars["steps_per_s"] = steps_per_s
        scalars.update(task.throughput(global_batch, steps_per_s, peak, jax.device_count()))
        scalars.update(data.metrics() if hasattr(data, "metrics") else {})
        log.write(step, scalars)
        eta = (total - step) / max(steps_per_s, 1e-9)
        logging.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s", step, total,
                     scalars["loss"], steps_per_s, _fmt_time(eta))
        if jax.process_index() == 0:
          print(f"step {step}/{total}  loss {scalars['loss']:.4f}  "
                + "  ".join(f"{k} {v:.4g}" for k, v in scalars.items()
                            if k in task.progress_keys) +
                f"  {steps_per_s:.2f} steps/s  ETA {_fmt_time(eta)}", flush=True)
        last, pending, t_log, steps_since = scalars, [], time.perf_counter(), 0
      if int(config.train.eval_every) and step % int(config.train.eval_every) == 0:
        log.write(step, task.evaluate(graphdef, state, frozen, rest, mesh), prefix="eval/")
      if step % int(config.train.checkpoint_every) == 0 or step == total or sig.requested:
        checkpoints.save_train(manager, step, state, frozen, data.get_state(), task.meta())
      if sig.requested:
        logging.warning("SIGTERM: saved step %d, exiting", step)
        break
  manager.wait_until_finished()
  manager.close()
  log.close()
  logging.info("done in %s", _fmt_time(time.perf_counter() - t_start))
  return last


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
