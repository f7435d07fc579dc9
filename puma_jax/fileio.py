"""Safe file handling shared by every reader and writer.

* `read_regular(path, max_bytes)`: reads a file only if it is a regular file of at most
  `max_bytes` (a FIFO, a device such as /dev/zero or a directory is refused without blocking).
* `staged_output(dst, what, src=None)`: an output directory is written under a temporary
  sibling and renamed into place at the end, so a failed run leaves nothing behind and an
  existing non-empty destination is never written into.
* `WorkdirLock(path)`: one run per work directory; a lock left by a dead process is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path


class NotRegularFileError(OSError):
  """A path that is not a regular file (FIFO, device, directory, socket)."""


class FileTooLargeError(OSError):
  """A file larger than the configured cap."""


class OutputError(ValueError):
  """An output destination that cannot be used; the message names it and why."""


class LockedError(RuntimeError):
  """The work directory is in use by another live run; the message names the holder."""


def _kind(mode: int) -> str:
  for test, name in (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
  ):
    if test(mode):
      return name
  return "not a regular file"


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
  """The bytes of `path`, which must be a regular file of at most `max_bytes` bytes.

  O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; fstat on the
  open descriptor (not stat on the name) checks the very file that is then read.
  """
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except IsADirectoryError:
    raise NotRegularFileError(errno.EISDIR, "is a directory", str(path)) from None
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise NotRegularFileError(errno.EINVAL, f"is {_kind(st.st_mode)}", str(path))
    if st.st_size > max_bytes:
      raise FileTooLargeError(
        errno.EFBIG, f"{st.st_size} bytes exceeds the cap of {max_bytes}", str(path)
      )
    chunks, left = [], st.st_size + 1  # one byte more: a file growing while read is caught
    while left > 0:
      b = os.read(fd, min(left, 1 << 24))
      if not b:
        break
      chunks.append(b)
      left -= len(b)
    data = b"".join(chunks)
    if len(data) > max_bytes:
      raise FileTooLargeError(errno.EFBIG, f"grew past the cap of {max_bytes} bytes", str(path))
    return data
  finally:
    os.close(fd)


def check_regular(path: str | os.PathLike) -> None:
  """Raises NotRegularFileError unless `path` is a regular file (following symlinks)."""
  st = os.stat(path)
  if not stat.S_ISREG(st.st_mode):
    raise NotRegularFileError(errno.EINVAL, f"is {_kind(st.st_mode)}", str(path))


# ----------------------------------------------------------------------------------------------
# Outputs


def _is_within(path: Path, root: Path) -> bool:
  return path == root or root in path.parents


def check_output_dir(
  dst: str | os.PathLike, what: str, src: str | os.PathLike | None = None
) -> Path:
  """`dst` must be absent or an empty directory, in a writable parent, and (when `src` is
  given) neither equal to nor inside `src`, nor holding it. Returns its absolute path."""
  dst = Path(dst).expanduser().absolute()
  if src is not None:
    s = Path(src).expanduser().resolve()
    d = dst.resolve()
    if _is_within(d, s):
      raise OutputError(
        f"{what}: --dst {dst} is {'the same as' if d == s else 'inside'} "
        f"--src {src}; choose a directory outside the source"
      )
    if _is_within(s, d):
      raise OutputError(f"{what}: --dst {dst} contains --src {src}; choose another directory")
  if dst.exists() or dst.is_symlink():
    if not dst.is_dir():
      raise OutputError(f"{what}: --dst {dst} exists and is not a directory")
    entries = sorted(p.name for p in dst.iterdir())
    if entries:
      raise OutputError(
        f"{what}: --dst {dst} is not empty (already holds {entries[:5]}); "
        "choose an empty or new directory"
      )
  parent = dst.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(f"{what}: cannot write under {parent} (read-only or not a directory)")
  return dst


@contextlib.contextmanager
def staged_output(
  dst: str | os.PathLike, what: str, src: str | os.PathLike | None = None
) -> Iterator[Path]:
  """Yields a fresh temporary sibling of `dst` to write into; renames it to `dst` on success,
  deletes it on failure. `dst` is checked first (see `check_output_dir`)."""
  dst = check_output_dir(dst, what, src)
  try:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
  except OSError as e:
    raise OutputError(
      f"{what}: cannot create the output next to {dst}: {e.strerror or e}"
    ) from None
  try:
    yield tmp
    # Checked again: another process may have written there meanwhile.
    if dst.exists():
      if any(dst.iterdir()):
        raise OutputError(
          f"{what}: --dst {dst} was filled by someone else during the run; "
          f"the result is left in {tmp}"
        )
      dst.rmdir()
    os.rename(tmp, dst)
  except BaseException:
    if tmp.exists() and not (dst.exists() and dst.samefile(tmp)):
      shutil.rmtree(tmp, ignore_errors=True)
    raise


# ----------------------------------------------------------------------------------------------
# Work directory lock


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


class WorkdirLock:
  """An exclusive lock on a work directory, held by a file `<dir>/<name>` naming its holder.

  `fcntl.flock` is the lock proper: the kernel drops it when the holder dies, however it dies,
  so a lock file left by a killed run is detected as stale and taken over. The file's JSON
  (pid, host, start time) only names the holder in the refusal message. On a filesystem
  without flock support, a live pid on this host is the fallback test.
  """

  def __init__(self, directory: str | os.PathLike, what: str = "run", name: str = ".lock"):
    self.dir = Path(directory)
    self.path = self.dir / name
    self.what = what
    self._fd: int | None = None
    self.took_over: dict | None = None

  def _holder(self) -> dict:
    try:
      info = json.loads(self.path.read_text() or "{}")
      return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
      return {}

  def acquire(self) -> WorkdirLock:
    import fcntl

    self.dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      h = self._holder()
      raise LockedError(
        f"{self.dir} is in use by another {self.what} (pid {h.get('pid', '?')} on host "
        f"{h.get('host', '?')}, since {h.get('started', '?')}); wait for it to finish, stop "
        f"it, or use another directory"
      ) from None
    except OSError:
      pass  # no flock here (some network filesystems): the pid test below decides
    prev = self._holder()
    same_host = prev.get("host") == socket.gethostname()
    if prev.get("pid") not in (None, os.getpid()) and same_host and _pid_alive(int(prev["pid"])):
      # Only reachable without flock: a live holder on this host.
      os.close(fd)
      raise LockedError(
        f"{self.dir} is in use by another {self.what} (pid {prev['pid']} on "
        f"host {prev['host']}); wait for it to finish or stop it"
      )
    if prev.get("pid") is not None:
      self.took_over = prev
    info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # an empty file: nobody holds it
    except OSError:
      pass
    os.close(self._fd)  # closing drops the flock
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
