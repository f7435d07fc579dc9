"""Eval runs under adversarial conditions: a second run on the same workdir, a lock left by a
killed run, damaged shard files. Each is a one-line EvalError (exit 2 from the CLI) that leaves
what was saved unchanged, or, for a stale lock, a resumed run with the reference results."""

import json
import os
import subprocess
import sys

import pytest

from puma_jax import fileio
from puma_jax.evaluation import runner
from tests.test_eval_runner import cfg_for, quiet
from tests.utils import tree_digest

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
LOCK = "host000-of-001.lock"


def saved(d):
  """The saved state: every file but the (empty when released) lock files."""
  return {k: v for k, v in tree_digest(d).items() if not k.endswith(".lock")}


def holder(shard_dir):
  """A child process that takes the host lock and keeps it until killed."""
  code = (
    "import sys, time; from puma_jax.fileio import WorkdirLock; "
    f"WorkdirLock(sys.argv[1], name={LOCK!r}).acquire(); print('held', flush=True); "
    "time.sleep(120)"
  )
  p = subprocess.Popen(
    [sys.executable, "-c", code, str(shard_dir)], stdout=subprocess.PIPE, text=True, env=ENV
  )
  assert p.stdout.readline().strip() == "held"
  return p


def test_second_run_refused_and_stale_lock_taken_over(tmp_path):
  cfg = cfg_for("reconstruction", **{"data.synthetic.num_items": 3})
  work = tmp_path / "w"
  (work / "shards").mkdir(parents=True)
  p = holder(work / "shards")
  try:
    before = saved(work)
    with pytest.raises(
      runner.EvalError, match=f"in use by another eval run .*pid {p.pid} on host "
    ):
      runner.evaluate(cfg, str(work), log=quiet)
    assert saved(work) == before
  finally:
    p.kill()
    p.wait()
  logs = []
  out = runner.evaluate(cfg, str(work), log=logs.append)
  assert out is not None and out["records"] == 3
  assert any(f"taking over the lock of a run that died (pid {p.pid}" in m for m in logs), logs
  # released at the end: a rerun (all done) goes through without a takeover message
  logs.clear()
  assert runner.evaluate(cfg, str(work), log=logs.append)["metrics"] == out["metrics"]
  assert not any("taking over" in m for m in logs)


def test_lock_helper_names_holder_and_allows_reentry_after_release(tmp_path):
  a = fileio.WorkdirLock(tmp_path, "training run").acquire()
  info = json.loads((tmp_path / ".lock").read_text())
  assert info["pid"] == os.getpid()
  b = fileio.WorkdirLock(tmp_path, "training run")
  with pytest.raises(fileio.LockedError, match=f"another training run \\(pid {os.getpid()}"):
    b.acquire()
  a.release()
  b.acquire()
  assert b.took_over is None  # released cleanly: nothing stale
  b.release()


BAD_LINES = [
  ("[1, 2]", "not a shard line"),
  ('{"batch": 0}', "not a shard line"),
  ('{"batch": "0", "items": []}', "not a shard line"),
  ('{"batch": 0, "items": [{"id": "a"}]}', 'an item is not an object with "id" and "idx"'),
  ('{"batch": 0, "items": [5]}', "an item is not an object"),
  ('{"batch": 0, "items": [], "features": "../x.npz"}', "is not a file name"),
  (
    '{"batch": 0, "items": [{"id": "0", "idx": 0}], "features": "gone.npz"}',
    "names features file .*gone.npz, which cannot be read",
  ),
  ('{"batch": 0, "items": []}\n{oops\n{"batch": 1, "items": []}', ":2: not JSON"),
]


@pytest.mark.parametrize("content,match", BAD_LINES)
def test_damaged_shard_file_is_one_line_error(tmp_path, content, match):
  cfg = cfg_for("reconstruction", **{"data.synthetic.num_items": 3})
  shards = tmp_path / "w" / "shards"
  shards.mkdir(parents=True)
  (shards / "host000-of-001.jsonl").write_text(content + "\n")
  (shards / "junk.npz").write_bytes(b"not an npz")
  before = saved(shards)
  with pytest.raises(runner.EvalError, match=match) as e:
    runner.evaluate(cfg, str(tmp_path / "w"), log=quiet)
  assert "host000-of-001.jsonl" in str(e.value) and "\n" not in str(e.value)
  assert saved(shards) == before


def test_torn_tail_is_cut_not_fatal(tmp_path):
  cfg = cfg_for("reconstruction", **{"data.synthetic.num_items": 3})
  ref = runner.evaluate(cfg, str(tmp_path / "ref"), log=quiet)
  shard = tmp_path / "ref" / "shards" / "host000-of-001.jsonl"
  shard.write_bytes(shard.read_bytes()[:-10])  # the last line torn by a kill
  assert runner.evaluate(cfg, str(tmp_path / "ref"), log=quiet)["metrics"] == ref["metrics"]


def test_duplicate_results_are_refused(tmp_path):
  cfg = cfg_for("reconstruction", **{"data.synthetic.num_items": 3})
  runner.evaluate(cfg, str(tmp_path / "w"), log=quiet)
  shard = tmp_path / "w" / "shards" / "host000-of-001.jsonl"
  shard.write_text(shard.read_text() * 2)  # what two runs appending at once left behind
  with pytest.raises(runner.EvalError, match="duplicate result"):
    runner.evaluate(cfg, str(tmp_path / "w"), log=quiet)


def test_cli_exit_2_one_line(tmp_path):
  shards = tmp_path / "w" / "shards"
  shards.mkdir(parents=True)
  (shards / "host000-of-001.jsonl").write_text("[1, 2]\n")
  cmd = [
    sys.executable,
    "-m",
    "puma_jax.eval",
    "--config=configs/eval/reconstruction.py:toy",
    f"--workdir={tmp_path / 'w'}",
    "--config.data.synthetic.num_items=2",
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "not a shard line" in lines[0], r.stderr[-2000:]
