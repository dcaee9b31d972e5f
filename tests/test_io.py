"""psr.core.io: atomic writes, output numbers held before files are made, file modes that
follow the umask, write failures as one line, output folders removed when a run fails
before writing into them."""

import errno
import os
import stat

import pytest

from psr.core import io
from psr.errors import UserError


@pytest.fixture()
def umask():
    """Set a umask for one test, restored after."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_two_runs_reserving_at_once_get_different_numbers(tmp_path):
    (tmp_path / "0004.png").write_bytes(b"x")
    first = io.reserve_numbers(tmp_path, 2)   # a run holds its numbers while it generates …
    second = io.reserve_numbers(tmp_path, 1)  # … and a second run starting meanwhile passes them
    assert first.numbers == [5, 6] and second.numbers == [7]
    # Neither holder's number shows as an image, and none is taken twice once written.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["0004.png"]
    io.write_atomic(tmp_path / "0007.png", lambda tmp: tmp.write_bytes(b"second"))
    second.release()
    io.write_atomic(tmp_path / "0005.png", lambda tmp: tmp.write_bytes(b"first"))
    io.write_atomic(tmp_path / "0006.png", lambda tmp: tmp.write_bytes(b"first"))
    first.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0004.png", "0005.png", "0006.png", "0007.png"]
    with io.reserve_numbers(tmp_path, 1) as third:
        assert third.numbers == [8]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # released: no marker left


def test_a_number_released_after_its_file_was_written_is_not_taken_again(tmp_path, monkeypatch):
    # A run that listed the folder before another finished sees a free number whose file
    # now exists: it must pass over it, not write over the image.
    held = io.reserve_numbers(tmp_path, 1)
    io.write_atomic(tmp_path / "0000.png", lambda tmp: tmp.write_bytes(b"done"))
    held.release()
    stale = iter([-1])  # the listing the late run made before the other one finished
    real = io._highest_number
    monkeypatch.setattr(io, "_highest_number", lambda folder, suffix: next(stale, None) or real(folder, suffix))
    assert io.reserve_numbers(tmp_path, 1).numbers == [1]


def test_files_and_folders_follow_the_umask(tmp_path, umask):
    text = io.write_text_atomic(tmp_path / "a.txt", "x")
    data = io.write_json_atomic(tmp_path / "a.json", {"a": 1})
    image = io.write_atomic(tmp_path / "a.png", lambda tmp: tmp.write_bytes(b"png"))
    assert [_mode(p) for p in (text, data, image)] == [0o644] * 3
    assert _mode(io.create_temp_dir(tmp_path, ".tmp-x-")) == 0o755
    umask(0o027)
    assert _mode(io.write_text_atomic(tmp_path / "b.txt", "x")) == 0o640
    assert _mode(io.create_temp_dir(tmp_path, ".tmp-y-")) == 0o750


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EACCES, "Permission denied")])
def test_a_failed_write_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch, code, reason):
    path = io.write_text_atomic(tmp_path / "results.json", "old")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(code, os.strerror(code), str(tmp))
    with pytest.raises(UserError) as err:
        io.write_atomic(path, full)
    assert str(err.value) == f"cannot write {path}: {reason}"
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_an_output_folder_made_by_a_failed_run_is_removed_while_empty(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with io.output_dir(out):
            raise RuntimeError("the model failed to load")
    assert not (tmp_path / "new").exists()
    # A folder that was there, or that the run wrote into, stays.
    kept = tmp_path / "kept"
    with pytest.raises(RuntimeError):
        with io.output_dir(kept) as folder:
            (folder / "0000.png").write_bytes(b"x")
            raise RuntimeError("disk full on the second image")
    assert (kept / "0000.png").is_file()
