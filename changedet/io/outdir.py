"""The output folder of a run: checked against the inputs, locked while a run writes it, cleaned of
what dead runs left behind.

* :func:`check_out_dir` refuses an empty ``--out``, an output folder that is an input folder (or
  the folder a glob input scans: outputs would become "bands" of the next run), and outputs that
  would overwrite an input file;
* :class:`OutputLock` holds an exclusive ``flock`` on ``<out>/.changedet.lock`` (the holder's pid
  inside) from the first tile to the last output. A second run into the same folder is refused with
  :class:`~changedet.errors.BusyError` naming that pid (exit status 75). The kernel drops the lock
  when its process dies, even by SIGKILL, so a dead run never blocks the next one; under the lock,
  every ``.changedet-staging-*`` folder is a dead run's leftover and is removed.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
from pathlib import Path
from typing import Sequence

from changedet.errors import BusyError, OutputError
from changedet.io.remote import is_remote
from changedet.io.writers import OutputStaging

LOCK_NAME = ".changedet.lock"
STAGING_PREFIX = ".changedet-staging-"


def _scanned_folder(spec: str) -> Path | None:
    """The folder an input spec lists files from (a folder input, or a glob's folder), else None."""
    path = Path(spec)
    if path.is_dir():
        return path.resolve()
    if not path.exists() and glob.has_magic(spec):
        return Path(os.path.dirname(spec) or ".").resolve()
    return None


def check_out_dir(out_dir: str | Path, inputs: Sequence[str | Path], output_names: Sequence[str] = ()) -> None:
    """Refuse (:class:`OutputError`) an output folder that is empty, a dangling symlink, an input
    folder, or whose outputs would replace an input file."""
    if not str(out_dir).strip():
        raise OutputError("--out is empty: give an output folder")
    if Path(out_dir).is_symlink() and not Path(out_dir).exists():
        raise OutputError(f"--out {out_dir} is a symlink to {os.readlink(out_dir)}, which does not exist")
    out = Path(out_dir).resolve()
    for spec in inputs:
        spec = str(spec)
        if is_remote(spec):  # a URL reads nothing from the output folder
            continue
        if _scanned_folder(spec) == out:
            raise OutputError(
                f"--out {out_dir} is the folder input {spec} reads its bands from: outputs written there would "
                "become bands of the next run; choose another output folder"
            )
        target = Path(spec).resolve()  # through symlinks: the file that would be replaced
        if Path(spec).is_file() and target.parent == out and target.name in output_names:
            raise OutputError(f"--out {out_dir} would overwrite the input {spec}; choose another output folder")


class OutputLock:
    """Exclusive lock on an output folder for the duration of one run (a context manager).

    Creates the folder if needed (and removes it again on exit when the run left it empty), refuses
    with :class:`BusyError` when another live process holds it, removes stale staging folders.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "OutputLock":
        OutputStaging.check(self.out_dir, [], overwrite=False)  # a file in the way of the folder
        self._created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._acquire()
        except BaseException:
            self._remove_if_created()
            raise
        for stale in self.out_dir.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        return self

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise BusyError(
                        f"{self.out_dir} is being written by another changedet run (pid {holder}); wait for it to "
                        "finish or choose another --out"
                    ) from None
                raise
            try:  # the holder may have unlinked the file between our open and flock: lock the live file
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            try:
                self.out_dir.rmdir()  # only succeeds when nothing was left in it
            except OSError:
                pass
