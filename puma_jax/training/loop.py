"""Training loop shared by every PUMA stage: mesh, sharded init, restore, steps, logging.

    train_and_evaluate(config, workdir)

The stage (`config.stage`, looked up in `training.registry`) supplies a `Stage`
(training/stage.py): how to build the model, which parameters are frozen, how examples become
arrays, and the pure step function. Everything else lives here once:

  * mesh from `config.mesh`; parameters initialized through eval_shape -> shardings -> jitted
    init with out_shardings (`training.init`; a model larger than one device never
    materializes whole);
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

import contextlib
import json
import logging as logging_std
import math
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from puma_jax import distributed, fileio, perf, sharding
from puma_jax.models import layers
from puma_jax.training import checkpoints, data as data_lib, init as init_lib, registry


class StopTraining(RuntimeError):
  pass


class _Guard:
  """The non-finite guard, read one step late: step N's metrics are fetched to the host while
  step N + 1 runs, so the loop never waits on the device just to check them. `check()` reads
  every step not yet read (before checkpoints and evaluations, so neither follows an unchecked
  step)."""

  def __init__(self, manager):
    self.manager, self.unread = manager, []

  def add(self, step: int, metrics: dict) -> None:
    self.unread.append((step, metrics))
    while len(self.unread) > 1:
      self._read(*self.unread.pop(0))

  def check(self) -> None:
    while self.unread:
      self._read(*self.unread.pop(0))

  def _read(self, step: int, metrics: dict) -> None:
    if float(metrics["finite"]) < 1:
      self.manager.wait_until_finished()
      raise StopTraining(
        f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}); the update was not applied and the run "
        f"stopped. Last good checkpoint: step {self.manager.latest_step()} in "
        f"{self.manager.directory}"
      )


def _window_scalars(summed: dict, n_steps: int, last: dict) -> tuple[dict, dict]:
  """Splits the loop's own metrics off a log window's summed step metrics: real tokens, and
  with float16 loss scaling the skipped (overflow) steps and the current scale. Overflowed
  steps report a zero gradient norm, so the window's mean norm is over the applied steps."""
  summed = dict(summed)
  own = {}
  if "real_tokens" in summed:
    own["real_tokens"] = float(summed.pop("real_tokens"))
  if "overflow" in summed:
    skipped = float(summed.pop("overflow"))
    summed.pop("loss_scale")
    own["overflow_steps"] = skipped
    own["loss_scale"] = float(last["loss_scale"])
    summed["grad_norm"] = summed["grad_norm"] * n_steps / max(n_steps - skipped, 1.0)
  return summed, own


class _Signals:
  """SIGTERM (preemption, scancel) or Ctrl-C -> save at the current step and exit cleanly.
  A second Ctrl-C aborts at once (KeyboardInterrupt), without saving."""

  def __init__(self):
    self.requested = None  # the signal's name once one arrived
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (tests calling train in a thread)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C aborts
      if jax.process_index() == 0:
        print(
          "Ctrl-C: saving a checkpoint at the end of this step (Ctrl-C again aborts "
          "without saving)",
          flush=True,
        )

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class MetricsLog:
  """metrics.jsonl in the workdir (one JSON object per logged step) + clu writers."""

  def __init__(self, workdir: Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.is_main = jax.process_index() == 0
    if self.is_main and self.path.exists():
      # After a resume, steps past the restored checkpoint are recomputed: drop their old lines.
      # A line that does not parse (the torn tail of a killed run) is dropped with a warning.
      keep, torn = [], 0
      for line in self.path.read_text(errors="replace").splitlines():
        try:
          rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
          rec, torn = None, torn + 1
        if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
          keep.append(line)
      if torn:
        logging.warning("%s: dropped %d unreadable line(s) (a write cut short)", self.path, torn)
      self.path.write_text("".join(l + "\n" for l in keep))
    self.writer = None
    if self.is_main:
      try:
        from clu import metric_writers

        self.writer = metric_writers.create_default_writer(
          str(workdir / "tensorboard"), just_logging=False
        )
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


class _ConsoleFilter(logging_std.Filter):
  """Keeps the console calm: orbax's INFO records and records marked `file_only` go to the
  log file only; records below the verbosity the run started with stay off the console."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record) -> bool:
    if getattr(record, "file_only", False) or record.levelno < self.level:
      return False
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


@contextlib.contextmanager
def _log_file(workdir: Path):
  """Every INFO record of the run (orbax's included) to workdir/train.log (train-hostN.log on
  host N > 0), while the console keeps its verbosity minus orbax's INFO."""
  pi = jax.process_index()
  name = "train.log" if pi == 0 else f"train-host{pi}.log"
  handler = logging_std.FileHandler(workdir / name)
  handler.setLevel(logging_std.INFO)
  handler.setFormatter(logging.PythonFormatter())
  absl_logger = logging.get_absl_logger()
  # The console: absl's handler (installed by cli.run) and whatever else sits on the root
  # logger (a library's basicConfig).
  consoles = {logging.get_absl_handler(), *logging_std.getLogger().handlers}
  level_before = absl_logger.getEffectiveLevel()
  flt = _ConsoleFilter(level_before)
  for h in consoles:
    h.addFilter(flt)
  absl_logger.addHandler(handler)
  absl_logger.setLevel(min(level_before, logging_std.INFO))
  try:
    yield
  finally:
    absl_logger.setLevel(level_before)
    absl_logger.removeHandler(handler)
    for h in consoles:
      h.removeFilter(flt)
    handler.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.stage` in `workdir` (resuming from its latest checkpoint). Returns the last
  logged metrics.

  One run per work directory: a second one is refused with the holder's pid and host; the
  lock of a run that died is taken over (fileio.WorkdirLock)."""
  stage_cls = registry.get_stage(str(config.stage))
  distributed.initialize(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lock = fileio.WorkdirLock(
    workdir, "training run", name=f".train-host{jax.process_index():03d}.lock"
  )
  try:
    lock.acquire()
  except fileio.LockedError as e:
    raise StopTraining(str(e)) from None
  try:
    with _log_file(workdir):
      if lock.took_over:
        logging.warning(
          "taking over the work directory lock of a run that died (pid %s on %s)",
          lock.took_over.get("pid"),
          lock.took_over.get("host"),
        )
      return _train(stage_cls(config, workdir), config, workdir)
  finally:
    lock.release()


def _open_manager(config, directory: Path):
  """The checkpoint manager, after setting aside what is no usable checkpoint."""
  say = lambda msg: logging.warning("%s", msg) if jax.process_index() == 0 else None
  checkpoints.sanitize(directory, say)
  return checkpoints.train_manager(directory, config)


def _train(stage, config: ml_collections.ConfigDict, workdir: Path) -> dict:
  # read by every attention layer at trace time (models/layers.py)
  layers.set_attention_impl(str(config.get("attention", "auto")))
  n_dev = int(config.get("num_devices", 0) or 0)
  if n_dev and jax.process_count() > 1:
    raise ValueError(
      "config.num_devices restricts a single-process run; leave it 0 with several processes"
    )
  mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:n_dev] if n_dev else None)
  rules = sharding.DEFAULT_RULES
  global_batch = data_lib.check_batch_divides(config, mesh)
  total = int(config.train.total_steps)
  data = stage.train_data()  # first: a bad data or tokenizer setting fails fast, writing nothing
  ckpt_dir = workdir / "checkpoints"
  manager = _open_manager(config, ckpt_dir)
  while True:  # newest readable checkpoint first; what fails is set aside, never loaded
    try:
      got = init_lib.restore_or_init(stage, manager, mesh, rules)
      break
    except checkpoints.UnreadableCheckpoint as e:
      manager.close()
      if jax.process_index() == 0:
        checkpoints.set_aside(
          ckpt_dir, str(e.step), e.reason, lambda msg: logging.warning("%s", msg)
        )
      manager = _open_manager(config, ckpt_dir)
  if got.data_state is not None:
    logging.warning("resuming from step %d (%s)", int(got.state.step), manager.directory)
  a, state, frozen, rest = got.abstract, got.state, got.frozen, got.rest
  check_frozen = getattr(stage, "check_frozen", None)
  if check_frozen is not None:  # e.g. inputs precomputed with frozen weights (a latent cache)
    check_frozen(frozen)
  graphdef, tx, schedules = a.graphdef, a.tx, a.schedules
  start = int(state.step)
  if start >= total:
    msg = f"already at step {start}; raise train.total_steps to go on"
    logging.info("%s", msg, extra={"file_only": True})
    if jax.process_index() == 0:
      print(msg, flush=True)
    manager.close()
    return {}
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  if got.data_state is not None:
    data.set_state(got.data_state)
  jit_step = jax.jit(
    stage.train_step(graphdef, tx),
    in_shardings=(
      a.state_sharding,
      a.frozen_sharding,
      a.rest_sharding,
      data_lib.batch_sharding(mesh),
    ),
    out_shardings=(a.state_sharding, None),
    donate_argnums=(0,),
  )

  log = MetricsLog(workdir, start)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info(
    "stage %s: %s trainable parameters, %s frozen; mesh %s; global batch %d",
    config.stage,
    f"{n_params:,}",
    f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen)):,}",
    dict(mesh.shape),
    global_batch,
  )
  kind = jax.devices()[0].device_kind
  peak = perf.peak_flops(kind, str(stage.dtype))
  flops = stage.flops_per_token()
  window = perf.ThroughputWindow(flops, peak, mesh.size)
  logging.info(
    "compute %s on %s: peak %s FLOP/s per device; %s training FLOPs per real token",
    stage.dtype,
    kind,
    peak,
    flops,
  )
  guard = _Guard(manager)
  pending, last = [], {}
  t_start = time.perf_counter()
  t_compiled, step_compiled = None, start  # the ETA counts steps after the first (compile)
  with _Signals() as sig, sharding.use_mesh(mesh, rules):
    step = start
    while step < total:
      host_batch = next(data)
      batch = data_lib.global_batch(stage.device_arrays(host_batch), mesh)
      state, metrics = jit_step(state, frozen, rest, batch)
      step += 1
      pending.append(metrics)
      if t_compiled is None:
        jax.block_until_ready(metrics)
        t_compiled, step_compiled = time.perf_counter(), step
      guard.add(step, metrics)
      if step % int(config.train.log_every) == 0 or step == total:
        guard.check()
        summed = jax.tree.map(
          lambda *xs: np.sum(np.stack([np.asarray(x) for x in xs]), 0), *pending
        )
        summed, own = _window_scalars(summed, len(pending), jax.device_get(pending[-1]))
        window.add(steps=len(pending), real_tokens=own.pop("real_tokens", 0))
        scalars = stage.summarize(summed, len(pending))
        scalars.update({f"lr/{g}": float(s(step - 1)) for g, s in schedules.items()})
        scalars.update(own)
        scalars.update(window.read())
        steps_per_s = scalars["steps_per_s"]
        scalars.update(stage.throughput(global_batch, steps_per_s))
        scalars.update(data.metrics())
        log.write(step, scalars)
        after = step - step_compiled
        eta = (
          (total - step) * (time.perf_counter() - t_compiled) / after if after > 0 else float("nan")
        )
        line = (
          f"step {step}/{total}  loss {scalars['loss']:.4f}  "
          + "  ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k in stage.progress_keys)
          + f"  {steps_per_s:.2f} steps/s  ETA {_fmt_time(eta)}"
        )
        logging.info("%s", line, extra={"file_only": True})  # the console has the print
        if jax.process_index() == 0:
          print(line, flush=True)
        last, pending = scalars, []
      if int(config.train.eval_every) and step % int(config.train.eval_every) == 0:
        guard.check()
        with window.paused():
          log.write(step, stage.evaluate(graphdef, state, frozen, rest, mesh), prefix="eval/")
      if step % int(config.train.checkpoint_every) == 0 or step == total or sig.requested:
        guard.check()
        with window.paused():
          checkpoints.write_manifests(manager)  # of the previous save, now complete
          checkpoints.save_train(manager, step, state, frozen, data.get_state(), stage.meta())
      if sig.requested:
        checkpoints.write_manifests(manager)
        logging.warning("%s: saved step %d, exiting", sig.requested, step)
        break
  checkpoints.write_manifests(manager)
  manager.close()
  log.close()
  logging.info("done in %s", _fmt_time(time.perf_counter() - t_start))
  return last


def _fmt_time(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
