"""One training run per workdir: `<workdir>/train.lock` holds the owner's host and PID.

Two runs on one workdir would interleave checkpoints and metrics. The lock is created with
O_EXCL (atomic on a local file system); a lock whose process is gone (same host, PID not alive,
or an unreadable lock file left by a crash) is stale and taken over, saying so.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable

LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another live process is training in this workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


class WorkdirLock:
    """Context manager: holds `<workdir>/train.lock` for the duration of a run."""

    def __init__(self, workdir: str, log: Callable[[str], None] = print):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.log = log
        self._held = False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return True

    def __enter__(self) -> "WorkdirLock":
        if not self._try_create():
            owner = _owner(self.path)
            here = socket.gethostname()
            if owner is not None and (owner.get("host") != here or _alive(owner["pid"])):
                where = "" if owner.get("host") == here else f" on host {owner.get('host')}"
                raise WorkdirLockedError(
                    f"{os.path.dirname(self.path)} is in use by another training run (process "
                    f"{owner['pid']}{where}, started {owner.get('started', '?')}): wait for it to "
                    f"finish or stop it; if that run no longer exists, delete {self.path}")
            self.log(f"removing a stale lock {self.path} "
                     + (f"(process {owner['pid']} is gone)" if owner else "(unreadable)"))
            os.remove(self.path)
            if not self._try_create():
                raise WorkdirLockedError(f"{self.path}: another run took the workdir just now")
        self._held = True
        return self

    def __exit__(self, *exc) -> None:
        if self._held:
            owner = _owner(self.path)
            if owner is not None and owner.get("pid") == os.getpid():  # ours, not a successor's
                os.remove(self.path)
        self._held = False
