"""One run per output folder: a lock file that names its holder.

A command that writes into a folder (and cleans that folder's staging leftovers at start)
takes `FOLDER/.psr-lock` first. The file is created with O_CREAT|O_EXCL, so of two runs
starting together exactly one gets it, and it holds one JSON line: the holder's PID, host,
command, start time and a random token. A second run is refused with one line naming
the holder while that process lives. A lock whose process is gone (killed, host
rebooted) is stale: it is taken over with a one-line note, so a kill never leaves a
folder blocked. The lock is removed when the holder exits the `with` block, also on an
exception or Ctrl-C.

Liveness can only be checked on the holder's host (`os.kill(pid, 0)`, and on Linux the
process start time from /proc, which tells a reused PID from the holder). A lock taken on
another host sharing the folder counts as live; the refusal says how to clear it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from psr.core.io import output_dir
from psr.errors import UserError

LOCK_NAME = ".psr-lock"
# A holder writes its line right after creating the file; a reader that finds it empty or
# cut waits this long for the line before calling the lock abandoned.
_WRITE_GRACE_S = 2.0


def _process_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None where
    there is no /proc or no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name in (…) may hold spaces
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether `pid` runs on this host (and, where `start` is given and /proc tells, is the
    same process that had that start time, not a later one given the same PID)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # os.kill(0, …) would signal our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except OSError:
        return False
    info = _process_start(pid)
    if info is None:
        return True
    state, ticks = info
    if state == "Z":  # exited, waiting for its parent to reap it
        return False
    return start is None or ticks == start


def _note(message: str) -> None:
    print(message, file=sys.stderr)


class RunLock:
    """`with RunLock(folder, "psr synth"):` holds `folder/.psr-lock` for the block (module
    docstring). `notes` receives the one-line note of a stale lock taken over."""

    def __init__(self, folder: str | Path, command: str, notes: Callable[[str], None] = _note):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.notes = notes
        self._text: str | None = None  # our line while we hold the lock

    @property
    def held(self) -> bool:
        return self._text is not None

    def _line(self) -> str:
        info = _process_start(os.getpid())
        return json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "process_start": info[1] if info else None,
            "token": secrets.token_hex(8),
        }) + "\n"

    def _create(self) -> bool:
        """Create the lock file with our line; False if it exists."""
        line = self._line()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise UserError(f"{self.folder}: cannot create the lock {self.path.name} "
                            f"({err.strerror or err})") from None
        try:
            data = line.encode()
            while data:
                data = data[os.write(fd, data):]
        except OSError as err:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise UserError(f"{self.folder}: cannot write the lock {self.path.name} "
                            f"({err.strerror or err})") from None
        os.close(fd)
        self._text = line
        return True

    def _read_holder(self) -> tuple[str, dict | None] | None:
        """(file text, holder) of the present lock, None if there is none; holder is None
        when the text stays unreadable past the write grace."""
        deadline = time.monotonic() + _WRITE_GRACE_S
        while True:
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                return None
            try:
                holder = json.loads(text)
                if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                    return text, holder
            except ValueError:
                pass
            if time.monotonic() >= deadline:
                return text, None
            time.sleep(0.05)

    def _remove_stale(self, stale_text: str) -> None:
        """Remove the stale lock we read, and only that one: another run may have taken it
        over and written its own line since we read it. Moving the file aside first lets us
        look at what we removed, and put back a live line."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = aside.read_text(encoding="utf-8", errors="replace")
        except OSError:
            moved = stale_text
        if moved == stale_text:
            aside.unlink(missing_ok=True)
        else:
            os.replace(aside, self.path)

    def acquire(self) -> RunLock:
        for _ in range(20):  # a few rounds: others may be taking over the same stale lock
            if self._create():
                return self
            found = self._read_holder()
            if found is None:
                continue  # released between our attempt and the read: try again
            text, holder = found
            if holder is None:
                self.notes(f"{self.command}: {self.path} names no holder (a run killed while taking "
                           "it); taking it over")
                self._remove_stale(text)
                continue
            pid, host = holder["pid"], holder.get("host")
            what = f"{holder.get('command') or 'a psr run'} (PID {pid} on {host}, since {holder.get('started')})"
            if host != socket.gethostname():
                raise UserError(f"{self.folder}: in use by {what}; one run per folder. If that run is gone, "
                                f"delete {self.path}")
            if process_alive(pid, holder.get("process_start")):
                raise UserError(f"{self.folder}: in use by {what}; one run per folder: wait for it to "
                                "end or choose another output folder")
            self.notes(f"{self.command}: {self.folder} was locked by {what}, which is gone; taking it over")
            self._remove_stale(text)
        raise UserError(f"{self.folder}: could not take {self.path}: other runs keep taking it")

    def release(self) -> None:
        """Remove the lock if it is still ours (a forked child holds nothing to release)."""
        if self._text is None:
            return
        text, self._text = self._text, None
        try:
            if json.loads(text)["pid"] != os.getpid():
                return
            if self.path.read_text(encoding="utf-8", errors="replace") == text:
                self.path.unlink()
        except OSError:
            pass  # already gone, or the folder went away

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def holding(folder: str | Path, command: str):
    """`folder` (created if needed) held by this launch for the block: the main process
    (RANK 0, or no launcher) takes the lock, the others rely on it. A folder this call
    created is removed again when the block fails before anything was written into it."""
    with output_dir(folder) as out:
        if int(os.environ.get("RANK", "0")) != 0:
            yield out
            return
        with RunLock(out, command):
            yield out
