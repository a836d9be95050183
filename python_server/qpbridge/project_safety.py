"""Keeping a QuPath project's data safe while qpbridge writes into it (no Java needed here).

- Every ``data/<id>/data.qpdata`` is replaced atomically: the new file is written beside it, checked, synced and
  renamed over the old one, so a crash or ``kill -9`` leaves either the old file or the complete new one.
- Before the rename the old file is copied to ``data.qpdata.qpbridge-backup`` (the state before qpbridge's last
  write; restored when anything fails after the rename).
- QuPath itself moves ``data.qpdata`` to ``data.qpdata.bkp`` before saving and can leave a truncated
  ``data.qpdata`` when the save fails (e.g. its image reader is missing). Such a file is detected, and restored
  from QuPath's ``.bkp`` when that one is intact.
- A lock file keeps two qpbridge runs out of one project; QuPath processes that have the project open are
  looked for (Linux ``/proc``: the project on their command line, or files open inside the project).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from qpbridge.errors import ProjectBusyError

DATA_FILE = "data.qpdata"
BACKUP_SUFFIX = ".qpbridge-backup"
TMP_SUFFIX = ".qpbridge-tmp"
QUPATH_BACKUP_SUFFIX = ".bkp"
LOCK_FILE = ".qpbridge.lock"
JAVA_SERIAL_MAGIC = b"\xac\xed\x00\x05"
MIN_DATA_BYTES = 64  # QuPath's smallest data file (empty hierarchy) is a few hundred bytes


def data_file_problem(path: Path) -> str | None:
    """Why a ``data.qpdata`` cannot be QuPath data (None when it looks complete or does not exist)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {path}: {exc}"
    if head != JAVA_SERIAL_MAGIC:
        return f"{path} is not QuPath data (unexpected header)"
    if size < MIN_DATA_BYTES:
        return f"{path} is truncated ({size} bytes)"
    return None


def repair_truncated(entry_dir: Path) -> tuple[bool, str | None]:
    """Restore QuPath's own ``data.qpdata.bkp`` over a truncated ``data.qpdata`` (the bad file is kept as
    ``data.qpdata.truncated``). Returns (the data file is usable now, what was found or done)."""
    data = entry_dir / DATA_FILE
    problem = data_file_problem(data)
    if problem is None:
        return True, None
    bkp = entry_dir / (DATA_FILE + QUPATH_BACKUP_SUFFIX)
    if bkp.is_file() and data_file_problem(bkp) is None:
        keep = entry_dir / (DATA_FILE + ".truncated")
        tmp = entry_dir / (DATA_FILE + TMP_SUFFIX)
        shutil.copy2(bkp, tmp)
        _fsync(tmp)
        os.replace(data, keep)
        os.replace(tmp, data)
        _fsync_dir(entry_dir)
        return True, f"{problem}: restored QuPath's backup {bkp.name} (the bad file is kept as {keep.name})"
    return False, f"{problem}, and there is no intact {bkp.name} to restore it from: left as it is"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        _fsync(path)


def tmp_data_path(entry_dir: Path) -> Path:
    return entry_dir / (DATA_FILE + TMP_SUFFIX)


def backup_data(entry_dir: Path) -> Path | None:
    """Copy the entry's data file to its qpbridge backup (synced); None when the entry has no data yet."""
    data = entry_dir / DATA_FILE
    if not data.is_file():
        return None
    backup = entry_dir / (DATA_FILE + BACKUP_SUFFIX)
    tmp = entry_dir / (DATA_FILE + BACKUP_SUFFIX + ".tmp")
    shutil.copy2(data, tmp)
    _fsync(tmp)
    os.replace(tmp, backup)
    return backup


def install_data(entry_dir: Path, new_file: Path) -> None:
    """Atomically make ``new_file`` (in the same folder) the entry's data file."""
    _fsync(new_file)
    os.replace(new_file, entry_dir / DATA_FILE)
    _fsync_dir(entry_dir)


def restore_data(entry_dir: Path, backup: Path | None) -> None:
    """Put the backup back (or remove a data file the entry did not have before)."""
    data = entry_dir / DATA_FILE
    if backup is None:
        data.unlink(missing_ok=True)
        return
    tmp = entry_dir / (DATA_FILE + TMP_SUFFIX)
    shutil.copy2(backup, tmp)
    _fsync(tmp)
    os.replace(tmp, data)
    _fsync_dir(entry_dir)


def clean_leftovers(project_dir: Path) -> list[Path]:
    """Remove half-written temporary files of an interrupted run (they never replaced anything)."""
    removed = []
    data_dir = project_dir / "data"
    if data_dir.is_dir():
        for pattern in (f"*/{DATA_FILE}{TMP_SUFFIX}", f"*/{DATA_FILE}{BACKUP_SUFFIX}.tmp"):
            for p in data_dir.glob(pattern):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(data), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


# ---- who else has the project open ---------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProjectLock:
    """``.qpbridge.lock`` in the project folder while qpbridge writes; a lock of a dead process is taken over."""

    def __init__(self, project_dir: Path) -> None:
        self.path = project_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[:6]}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    other = {}
                pid = other.get("pid")
                same_host = other.get("host") == socket.gethostname()
                if isinstance(pid, int) and same_host and not _pid_alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: that run was killed
                    continue
                raise ProjectBusyError(
                    f"another qpbridge run is writing this project (pid {pid} on {other.get('host', '?')}, "
                    f"lock file {self.path}); wait for it, or delete the lock file if that run is gone") from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> ProjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_qupath(argv: list[str]) -> bool:
    if not argv:
        return False
    exe = Path(argv[0]).name.lower()
    if exe in ("qupath", "qupath.exe", "qupath.sh") or exe.startswith("qupath-"):
        return True
    return any(a == "qupath.QuPath" or ("qupath-app" in a.lower() and a.endswith(".jar")) for a in argv)


def qupath_processes(project_dir: Path, proc: Path = Path("/proc")) -> list[tuple[int, bool, str]]:
    """QuPath processes on this machine: (pid, has this project open, why we think so).

    Only Linux exposes this (``/proc``); elsewhere the list is empty.
    """
    out: list[tuple[int, bool, str]] = []
    if not proc.is_dir():
        return out
    project_dir = project_dir.resolve()
    needle = str(project_dir)
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = [a for a in (d / "cmdline").read_bytes().decode("utf-8", "replace").split("\0") if a]
        except OSError:
            continue
        if not _is_qupath(argv):
            continue
        pid = int(d.name)
        if any(needle in a for a in argv):
            out.append((pid, True, "the project is on its command line"))
            continue
        opened = False
        with contextlib.suppress(OSError):
            for fd in (d / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target == needle or target.startswith(needle + os.sep):
                        opened = True
                        break
        out.append((pid, opened, "it has files of the project open" if opened else "running"))
    return out


def check_not_open_in_qupath(project_dir: Path, warn: Any = print) -> None:
    """Refuse when a QuPath process has the project open; warn when QuPath runs with an unknown project."""
    for pid, has_it, why in qupath_processes(project_dir):
        if has_it:
            raise ProjectBusyError(
                f"QuPath (pid {pid}) has this project open ({why}): close the project in QuPath first, or QuPath "
                "would overwrite the results when it saves (pass --force to write anyway)")
        warn(f"note: QuPath is running (pid {pid}); if it has this project open, close it first: QuPath keeps its "
             "own copy of an open image and would overwrite these results when it saves")
