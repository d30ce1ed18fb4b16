"""Atomic file writing: a file is either its old self or complete, never half-written.

``atomic_write`` writes beside the target under a temporary name (``.NAME.HOST-PID.XXXX.tmp``), fsyncs and
renames it into place; ``remove_partial_writes`` clears the temporary files of writers that were killed
outright. Every file a run writes (adapters, checkpoints, caches, records) goes through it.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _writer_tag() -> str:
    return f"{_host()}-{os.getpid()}"


PARTIAL_WRITE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]*)-(?P<pid>\d+)\.[^.]+\.tmp$")


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result into place with one rename.

    The temporary file (``.NAME.HOST-PID.XXXX.tmp``, beside the target) is removed on any error; one left
    by a process that was killed outright is removed by ``remove_partial_writes``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file gets the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``atomic_write`` calls on this host left behind when their process
    was killed (SIGKILL, out of memory, power). A file whose writer is still running is kept. Returns
    the files removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    host = _host()
    for f in folder.iterdir():
        m = PARTIAL_WRITE.match(f.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
