"""launch/local.sh: N jax.distributed processes on this machine, failure propagation."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "local.sh"


def _launch(n, tmp_path, **env):
  full = dict(
    os.environ, PUMA_ENTRY="tests.launch_payload", PUMA_LOG_DIR=str(tmp_path / "logs"), **env
  )
  full.pop("XLA_FLAGS", None)  # conftest's 8 fake devices would add to PUMA_LOCAL_DEVICES
  out = subprocess.run(
    ["bash", str(SCRIPT), str(n)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=300
  )
  return out


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_two_processes_sum_across_processes(tmp_path):
  out = _launch(2, tmp_path, PUMA_LOCAL_DEVICES="2")
  assert out.returncode == 0, out.stderr[-3000:]
  for i in range(2):
    log = (tmp_path / "logs" / f"process_{i}.log").read_text()
    # 2 processes x 2 devices holding 1, 1, 2, 2: only a cross-process collective gives 6
    assert f"process {i} of 2: 4 devices, sum 6.0 (want 6.0)" in log, log[-2000:]
  assert "all 2 processes finished" in out.stderr


def test_one_failure_stops_the_others(tmp_path):
  out = _launch(3, tmp_path, PUMA_TEST_FAIL_PROCESS="1")
  assert out.returncode == 3, out.stderr[-3000:]
  assert "process 1 (pid" in out.stderr and "failing on purpose" in out.stderr
  assert "exited with status 3; stopping the others" in out.stderr
  # Processes 0 and 2 were waiting for process 1 in jax.distributed.initialize: the launcher
  # stopped them (they never got past it, so they did not end on their own), and they are gone.
  pids = [int(p) for p in out.stderr.split("processes (")[1].split(")")[0].split()]
  assert len(pids) == 3 and not any(_alive(p) for p in pids)
  for i in (0, 2):
    log = (tmp_path / "logs" / f"process_{i}.log").read_text()
    assert f"process {i} of 3:" not in log, log[-2000:]


@pytest.mark.parametrize("arg", ["0", "two"])
def test_bad_process_count(arg):
  out = subprocess.run(
    ["bash", str(SCRIPT), arg], cwd=ROOT, capture_output=True, text=True, timeout=30
  )
  assert out.returncode == 2 and "usage" in out.stderr


def _fake_bin(tmp_path, name, body):
  """An executable `name` first on PATH that records its arguments (one per line)."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  exe = bindir / name
  exe.write_text("#!/bin/bash\n" + body)
  exe.chmod(0o755)
  return bindir


def test_slurm_script_runs_main_under_srun_with_auto_distributed(tmp_path):
  rec = tmp_path / "srun.args"
  bindir = _fake_bin(tmp_path, "srun", f'printf "%s\\n" "$@" > {rec}\n')
  env = dict(
    os.environ,
    PATH=f"{bindir}:{os.environ['PATH']}",
    WORKDIR="/shared/run 1",
    SLURM_SUBMIT_DIR=str(ROOT),
  )
  out = subprocess.run(
    [
      "bash",
      str(ROOT / "launch" / "slurm.sbatch"),
      "--config.seed=3",
      "--config.tokenizer=/a dir/tok",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert out.returncode == 0, out.stderr
  args = rec.read_text().splitlines()
  assert args[:2] == ["--kill-on-bad-exit=1", "--cpu-bind=none"]
  assert args[3:] == [
    "-m",
    "puma_jax.main",
    "--config=configs/pretrain.py:paper",
    "--workdir=/shared/run 1",
    "--config.distributed.auto=True",
    "--config.seed=3",
    "--config.tokenizer=/a dir/tok",
  ]
  no_workdir = dict(env)
  no_workdir.pop("WORKDIR")
  out = subprocess.run(
    ["bash", str(ROOT / "launch" / "slurm.sbatch")],
    env=no_workdir,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert out.returncode != 0 and "WORKDIR" in out.stderr


def test_tpu_script_runs_the_same_command_on_all_workers(tmp_path):
  # fake gcloud: record its arguments, then run --command like the worker's shell would
  rec, py_rec = tmp_path / "gcloud.args", tmp_path / "python.args"
  body = (
    f'printf "%s\\n" "$@" > {rec}\n'
    'for a in "$@"; do case $a in --command=*) cmd=${a#--command=};; esac; done\n'
    f'cd {tmp_path} && bash -c "$cmd"\n'
  )
  bindir = _fake_bin(tmp_path, "gcloud", body)
  _fake_bin(tmp_path, "python3", f'printf "%s\\n" "$@" > {py_rec}\n')
  (tmp_path / "repo").mkdir()
  env = dict(
    os.environ,
    PATH=f"{bindir}:{os.environ['PATH']}",
    TPU_NAME="pod",
    ZONE="z1",
    WORKDIR="/mnt/s/run 1",
    REPO_DIR="repo",
  )
  out = subprocess.run(
    ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--config.tokenizer=/a dir/tok"],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert out.returncode == 0, out.stderr
  g = rec.read_text().splitlines()
  assert g[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=z1"]
  assert "--worker=all" in g
  assert py_rec.read_text().splitlines() == [
    "-m",
    "puma_jax.main",
    "--config=configs/pretrain.py:paper",
    "--workdir=/mnt/s/run 1",
    "--config.distributed.auto=True",
    "--config.tokenizer=/a dir/tok",
  ]
  py_rec.unlink()
  dry = subprocess.run(
    ["bash", str(ROOT / "launch" / "tpu_pod.sh")],
    env=dict(env, DRY_RUN="1"),
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert dry.returncode == 0 and "tpu-vm ssh pod" in dry.stdout, dry.stderr
  assert not py_rec.exists()  # printed, not run
