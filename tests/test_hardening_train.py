"""The training loop under adversarial conditions: a second run on one workdir, a killed run's
lock, a damaged latest checkpoint, stray entries in checkpoints/, a torn metrics.jsonl, Ctrl-C,
a finished run rerun, a noisy console, and CLI mistakes. Each case is refused in one line or
recovered from, and nothing already saved is changed or lost."""

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puma_jax.training import checkpoints, loop
from tests.test_train import REPO, read_metrics, small_config
from tests.utils import tree_digest


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """Every run here compiles the same step: compile it once (a minute on a loaded 2-core
  machine), then load it from JAX's persistent cache (seconds)."""
  import jax

  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = [getattr(jax.config, n) for n in names]
  for n, v in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
    jax.config.update(n, v)
  yield
  for n, v in zip(names, old):
    jax.config.update(n, v)


ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def config(total=4):
  c = small_config()
  c.optim.total_steps = total
  c.train.checkpoint_every = 2
  return c


def lock_holder(workdir: Path):
  """A child process that takes the training lock of `workdir` and keeps it until killed."""
  code = (
    "import sys, time; from puma_jax.fileio import WorkdirLock; "
    "WorkdirLock(sys.argv[1], 'training run', name='.train-host000.lock').acquire(); "
    "print('held', flush=True); time.sleep(300)"
  )
  p = subprocess.Popen(
    [sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True, env=ENV
  )
  assert p.stdout.readline().strip() == "held"
  return p


def flip_a_byte(step_dir: Path) -> Path:
  f = max(
    (p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))
  return f


def test_lock_damaged_checkpoint_strays_torn_metrics_and_finished_run(tmp_path, caplog, capfd):
  work = tmp_path / "w"
  work.mkdir()
  # 1. Another live run holds the workdir: refused at once, naming it; nothing written.
  holder = lock_holder(work)
  try:
    with pytest.raises(
      loop.StopTraining, match=f"in use by another training run \\(pid {holder.pid} on host "
    ):
      loop.train_and_evaluate(config(), str(work))
    assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()
  finally:
    holder.kill()
    holder.wait()
  # 2. Its lock, left by the killed process, is taken over; the run trains steps 1..4.
  caplog.set_level("WARNING")
  loop.train_and_evaluate(config(), str(work))
  assert f"lock of a run that died (pid {holder.pid}" in caplog.text
  ref = read_metrics(work)
  assert sorted(ref) == [1, 2, 3, 4]
  for step in (2, 4):
    assert (work / "checkpoints" / str(step) / checkpoints.MANIFEST).exists()
  # 3. A flipped byte in the latest checkpoint, a stray step directory and file, a torn line.
  flipped = flip_a_byte(work / "checkpoints" / "4")
  damaged = flipped.read_bytes()
  (work / "checkpoints" / "1000000").mkdir()
  (work / "checkpoints" / "notes.txt").write_text("mine")
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')
  caplog.clear()
  loop.train_and_evaluate(config(), str(work))
  text = caplog.text
  assert "checkpoints/4 is not a usable checkpoint (file state/" in text
  assert "does not match its sha256" in text and "checkpoints/1000000 is not a usable" in text
  assert "checkpoints/notes.txt is not a checkpoint; ignored" in text
  assert "resuming from step 2" in text and "dropped 1 unreadable line" in text
  got = read_metrics(work)
  assert sorted(got) == [1, 2, 3, 4] and got[4]["loss"] == ref[4]["loss"]
  aside = {p.name.split("-")[0]: p for p in (work / "checkpoints.unreadable").iterdir()}
  assert set(aside) == {"4", "1000000"}  # set aside, not deleted: the damaged bytes are kept
  assert (aside["4"] / flipped.relative_to(work / "checkpoints" / "4")).read_bytes() == damaged
  assert (work / "checkpoints" / "notes.txt").read_text() == "mine"
  kinds = [k for k in got[4] if k.startswith("data/task/")]
  assert kinds and "data/task/other" not in kinds, sorted(got[4])  # real sequence kinds
  # 4. A checkpoint without a manifest (an older save) whose data file is cut short: its
  # restore fails, it is set aside the same way, and the run resumes from the one before.
  (work / "checkpoints" / "4" / checkpoints.MANIFEST).unlink()
  data_file = flip_a_byte(work / "checkpoints" / "4")
  data_file.write_bytes(data_file.read_bytes()[:100])
  caplog.clear()
  loop.train_and_evaluate(config(), str(work))
  assert "checkpoints/4 is not a usable checkpoint (restore failed" in caplog.text
  assert read_metrics(work)[4]["loss"] == ref[4]["loss"]
  # orbax's other failed reads of that step are not echoed later, whenever they are collected
  # (they once printed TensorStore dumps into a later run's console)
  capfd.readouterr()
  gc.collect()
  err = capfd.readouterr().err
  assert "never retrieved" not in err and "never retrieved" not in caplog.text, err[-2000:]
  # 5. The finished run rerun: the message, and nothing changes.
  before = tree_digest(work / "checkpoints"), (work / "metrics.jsonl").read_text()
  assert loop.train_and_evaluate(config(), str(work)) == {}
  assert (tree_digest(work / "checkpoints"), (work / "metrics.jsonl").read_text()) == before


def test_sigint_saves_console_is_calm_and_eta_skips_compilation(tmp_path, capfd, monkeypatch):
  """Ctrl-C in the middle of a run (a real SIGINT, sent once step 2's metrics are written, so
  it always lands inside the run) saves the step and returns; the console has one progress
  line per step and no orbax INFO (the log has)."""
  work = tmp_path / "w"
  write, sent = loop.MetricsLog.write, []

  def write_then_interrupt(self, step, scalars, **kw):
    write(self, step, scalars, **kw)
    if step == 2 and not sent:
      sent.append(step)
      os.kill(os.getpid(), signal.SIGINT)  # handled before os.kill returns: in the run

  monkeypatch.setattr(loop.MetricsLog, "write", write_then_interrupt)
  loop.train_and_evaluate(config(), str(work))
  monkeypatch.undo()
  assert sent == [2]
  out, err = capfd.readouterr()
  saved = [int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved == [2] and max(read_metrics(work)) == 2
  assert "Ctrl-C: saving a checkpoint" in out
  progress = [l for l in out.splitlines() if l.startswith("step ")]
  assert [l.split()[1] for l in progress] == [f"{s}/4" for s in range(1, saved[0] + 1)], out
  assert "ETA ?" in progress[0]  # the first step's time is compilation: no ETA from it
  assert "orbax" not in err and "Finished saving checkpoint" not in out + err
  log = (work / "train.log").read_text()
  assert "Finished saving checkpoint" in log and f"SIGINT: saved step {saved[0]}" in log
  # the run goes on from there to the same numbers as an uninterrupted one
  loop.train_and_evaluate(config(), str(work))
  assert sorted(read_metrics(work)) == [1, 2, 3, 4]


def test_second_ctrl_c_aborts_at_once():
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a job started in the background
  sig = loop._Signals()
  with sig:
    os.kill(os.getpid(), signal.SIGINT)
    assert sig.requested == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before  # the handler from before is back


def main_cli(args, cwd):
  return subprocess.run(
    [sys.executable, "-m", "puma_jax.main", *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=ENV,
    timeout=300,
  )


def test_cli_help_wrong_field_and_config_from_anywhere(tmp_path):
  r = main_cli(["--help"], tmp_path)
  assert r.returncode == 0 and "--workdir" in r.stdout, r.stderr[-2000:]
  r = main_cli(
    ["--config=pretrain.py:tiny", f"--workdir={tmp_path / 'w'}", "--config.train.steps=abc"],
    tmp_path,
  )
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
  assert "did you mean train.total_steps?" in lines[0]
  assert not (tmp_path / "w").exists()


def test_tiny_pretraining_fits_every_task():
  from configs import pretrain
  from puma_jax.training import registry

  c = pretrain.get_config("tiny")
  assert registry.make(c).check_fit() == []
  c.seq_len = 768
  warnings = registry.make(c).check_fit()
  assert len(warnings) == 1 and "kind 'conditional' never fits" in warnings[0]


def test_data_path_matching_no_file_is_a_value_error(tmp_path):
  """The training CLI reports ValueErrors in one line with exit 2 (cli.run)."""
  from puma_jax.data.sources import DataPathError

  c = config()
  c.data.sources.text.format = "jsonl"
  c.data.sources.text.paths = str(tmp_path / "nothing-*.jsonl")
  with pytest.raises(DataPathError, match="nothing-\\*.jsonl' matches no file") as e:
    loop.train_and_evaluate(c, str(tmp_path / "w"))
  assert isinstance(e.value, ValueError)
  assert not (tmp_path / "w" / "checkpoints").exists()


def _rewrite_state(step_dir: Path, edit) -> None:
  """Rewrites a checkpoint's train state through `edit(tree)` (as another version of the code
  would have saved it); its manifest goes, as an older save has none."""
  import shutil

  import orbax.checkpoint as ocp

  ckptr = ocp.StandardCheckpointer()
  tree = ckptr.restore(step_dir / "state")
  edit(tree)
  shutil.rmtree(step_dir / "state")
  ckptr.save(step_dir / "state", tree)
  ckptr.wait_until_finished()
  (step_dir / checkpoints.MANIFEST).unlink()


def test_checkpoint_of_an_older_format_resumes_and_another_structure_is_refused(tmp_path):
  import shutil

  ref_dir = tmp_path / "ref"
  loop.train_and_evaluate(config(), str(ref_dir))
  ref = read_metrics(ref_dir)
  # Saved before the train state carried the loss scale: resumes, with a fresh scale, to the
  # same losses as the uninterrupted run.
  old = tmp_path / "old"
  shutil.copytree(ref_dir, old)
  shutil.rmtree(old / "checkpoints" / "4")
  _rewrite_state(old / "checkpoints" / "2", lambda t: t.pop("loss_scale"))
  loop.train_and_evaluate(config(), str(old))
  got = read_metrics(old)
  assert sorted(got) == [1, 2, 3, 4] and got[4]["loss"] == ref[4]["loss"]
  assert not (old / "checkpoints.unreadable").exists()
  # A state of another structure is no damage: refused by name, nothing moved or changed.
  other = tmp_path / "other"
  shutil.copytree(ref_dir, other)
  _rewrite_state(other / "checkpoints" / "4", lambda t: t.update(extra={"x": t["step"]}))
  before = tree_digest(other / "checkpoints")
  with pytest.raises(ValueError, match="checkpoint step 4 in .* holds a training state of another"):
    loop.train_and_evaluate(config(total=6), str(other))
  assert tree_digest(other / "checkpoints") == before
  assert not (other / "checkpoints.unreadable").exists()


def test_echoes_of_orbax_failed_reads_are_dropped_and_nothing_else(tmp_path_factory):
  """The records asyncio logs for a damaged checkpoint's abandoned reads (a task's or the
  gather's "exception was never retrieved", the exception raised in orbax's code) are dropped
  once a restore has failed; other records, and the same message for other code, are kept."""
  import logging

  def raised_in(filename: str) -> BaseException:
    code = compile(
      "raise Exception('Encountered error while reading array index')", filename, "exec"
    )
    try:
      exec(code, {})
    except Exception as e:  # noqa: BLE001
      return e
    raise AssertionError("not raised")

  def record(msg, exc):
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, msg, None, info)

  root = tmp_path_factory.mktemp("run")  # (tmp_path would hold this test's name: "orbax")
  step = root / "w" / "checkpoints" / "4"
  checkpoints.drop_failed_read_echoes(step)
  assert checkpoints._DROP_READ_ERRORS in logging.getLogger("asyncio").filters
  keep = checkpoints._DROP_READ_ERRORS.filter
  orbax = raised_in("/site-packages/orbax/checkpoint/_src/serialization/serialization.py")
  other = raised_in("/site-packages/mylib/io.py")
  future = "\nfuture: <_GatheringFuture finished exception=Exception('...')>"
  assert not keep(record("_GatheringFuture exception was never retrieved" + future, orbax))
  assert not keep(record("Task exception was never retrieved" + future, orbax))
  wrapped = Exception("wrapper")
  wrapped.__cause__ = orbax
  assert not keep(record("Task exception was never retrieved", wrapped))
  assert keep(record("Task exception was never retrieved" + future, other))
  assert keep(record("some other asyncio error", orbax))
  # TensorStore's own futures: the error is set by a C++ callback, so it has no traceback, and
  # its text names only the file of the step whose restore failed (CI once printed three)
  err = ValueError(
    f'OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database at local file "{step}/state/"'
    ": Requested byte range [6, 9) is not valid for value of size 1"
  )
  assert err.__traceback__ is None
  echo = f"Future exception was never retrieved\nfuture: <Future finished exception={err!r}>"
  assert not keep(record(echo, err))
  assert not keep(record(echo, None))
  for other_step in (root / "other" / "4", root / "w" / "checkpoints" / "40"):
    elsewhere = ValueError(str(err).replace(str(step), str(other_step)))
    assert keep(record(echo.replace(str(step), str(other_step)), elsewhere)), other_step
