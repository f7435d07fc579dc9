"""launch/local.sh: N jax.distributed processes on this machine, failure propagation."""

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "local.sh"


def _launch(n, tmp_path, **env):
  full = dict(os.environ, PUMA_ENTRY="tests.launch_payload", PUMA_LOG_DIR=str(tmp_path / "logs"),
              **env)
  full.pop("XLA_FLAGS", None)  # conftest's 8 fake devices would add to PUMA_LOCAL_DEVICES
  t0 = time.monotonic()
  out = subprocess.run(["bash", str(SCRIPT), str(n)], cwd=ROOT, env=full, capture_output=True,
                       text=True, timeout=120)
  return out, time.monotonic() - t0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_two_processes_sum_across_processes(tmp_path):
  out, _ = _launch(2, tmp_path, PUMA_LOCAL_DEVICES="2")
  assert out.returncode == 0, out.stderr[-3000:]
  for i in range(2):
    log = (tmp_path / "logs" / f"process_{i}.log").read_text()
    # 2 processes x 2 devices holding 1, 1, 2, 2: only a cross-process collective gives 6
    assert f"process {i} of 2: 4 devices, sum 6.0 (want 6.0)" in log, log[-2000:]
  assert "all 2 processes finished" in out.stderr


def test_one_failure_stops_the_others(tmp_path):
  out, seconds = _launch(3, tmp_path, PUMA_TEST_FAIL_PROCESS="1")
  assert out.returncode == 3, out.stderr[-3000:]
  assert "process 1 (pid" in out.stderr and "failing on purpose" in out.stderr
  # processes 0 and 2 were waiting for process 1 in jax.distributed.initialize; they are gone
  pids = [int(p) for p in out.stderr.split("processes (")[1].split(")")[0].split()]
  assert len(pids) == 3 and not any(_alive(p) for p in pids)
  assert seconds < 60


@pytest.mark.parametrize("arg", ["0", "two"])
def test_bad_process_count(arg):
  out = subprocess.run(["bash", str(SCRIPT), arg], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
  assert out.returncode == 2 and "usage" in out.stderr
