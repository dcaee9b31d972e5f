"""Atomic file output: a reader never sees a half-written file, and a killed run leaves
none behind (only hidden `.tmp-*` files in the same folder, which a rerun ignores).

Files and folders are created with the modes the umask gives (0644 and 0755 under the
usual 022), not the private 0600/0700 of `tempfile`, so a dataset or cache written into a
shared place can be read by the other users the umask lets in.

A write that fails (a read-only folder, a full disk) raises a one-line `UserError` naming
the file and the system's reason, and leaves the file as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from psr.errors import UserError

RESERVED_SUFFIX = ".reserved"
"""Hidden `.NNNN<suffix>.reserved` files hold an output number while a run makes its files."""


def _unique_name(folder: Path, prefix: str) -> Path:
    return folder / f"{prefix}{secrets.token_hex(6)}"


def create_temp_file(folder: str | Path, prefix: str) -> Path:
    """An empty new file `folder/<prefix><random>`, created with mode 0666 less the umask."""
    folder = Path(folder)
    while True:
        path = _unique_name(folder, prefix)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def create_temp_dir(folder: str | Path, prefix: str) -> Path:
    """A new empty folder `folder/<prefix><random>`, created with mode 0777 less the umask
    (where `tempfile.mkdtemp` would make it 0700 whatever the umask)."""
    folder = Path(folder)
    while True:
        path = _unique_name(folder, prefix)
        try:
            path.mkdir(0o777)
        except FileExistsError:
            continue
        return path


def _cannot_write(path: Path, err: OSError) -> UserError:
    return UserError(f"cannot write {path}: {err.strerror or err}")


def prepare_output_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove it is writable, before any expensive work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise UserError(f"output {path}: exists and is not a directory") from None
    except OSError as err:
        raise UserError(f"output {path}: cannot write there ({err.strerror or err})") from None
    return path


@contextlib.contextmanager
def output_dir(path: str | Path) -> Iterator[Path]:
    """`prepare_output_dir`, and when the block raises, the folders this call created are
    removed again while they are still empty: a run refused or failed at start leaves no
    empty output folder behind."""
    path = Path(path)
    created, parent = [], path.absolute()
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    out = prepare_output_dir(path)
    try:
        yield out
    except BaseException:
        for folder in created:  # deepest first; rmdir leaves a folder something was written to
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` then rename the temporary file onto `path`."""
    path = Path(path)
    try:
        tmp = create_temp_file(path.parent, f".tmp-{path.name}-")
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@dataclass
class Reservation:
    """Output numbers held by one run (`reserve_numbers`); `release()` gives them back
    once their files are written (or the run failed)."""

    folder: Path
    numbers: list[int]
    markers: list[Path] = field(default_factory=list)

    @property
    def first(self) -> int:
        return self.numbers[0]

    def release(self) -> None:
        for marker in self.markers:
            marker.unlink(missing_ok=True)
        self.markers = []

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _highest_number(folder: Path, suffix: str) -> int:
    pattern = re.compile(rf"\.?(\d+){re.escape(suffix)}(?:{re.escape(RESERVED_SUFFIX)})?")
    used = [int(m.group(1)) for p in folder.iterdir()
            if (m := pattern.fullmatch(p.name)) and p.name.startswith(".") == p.name.endswith(RESERVED_SUFFIX)]
    return max(used, default=-1)


def reserve_numbers(folder: str | Path, count: int, suffix: str = ".png", width: int = 4) -> Reservation:
    """Hold `count` consecutive numbers after the highest `NNNN<suffix>` in `folder` (or
    held by another run) before any file is made, so two runs writing into one folder at
    once never pick the same number. Each number is held by a hidden marker created with
    O_CREAT|O_EXCL, of which exactly one run can create each; a number whose file appears
    meanwhile (a run that finished and released it) is passed over."""
    folder = Path(folder)
    while True:
        start = _highest_number(folder, suffix) + 1
        held = Reservation(folder, [start + k for k in range(count)])
        for number in held.numbers:
            name = f"{number:0{width}d}{suffix}"
            marker = folder / f".{name}{RESERVED_SUFFIX}"
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                break
            except OSError as err:
                held.release()
                raise _cannot_write(marker, err) from None
            os.close(fd)
            held.markers.append(marker)
            if (folder / name).exists():
                break
        else:
            return held
        held.release()  # another run holds one of them: try again above its numbers
