"""One run per output folder: the lock file, its holder, stale locks, release."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from psr.core import runlock
from psr.core.runlock import LOCK_NAME, RunLock, process_alive
from psr.errors import UserError


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder, **fields):
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": "psr synth",
              "started": "2026-01-01 00:00:00", "process_start": None, "token": "t"}
    holder.update(fields)
    (folder / LOCK_NAME).write_text(json.dumps(holder) + "\n")


def test_the_lock_names_its_holder_and_goes_on_exit(tmp_path):
    with RunLock(tmp_path, "psr synth") as lock:
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert lock.held and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "psr synth"
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_on_an_exception_or_ctrl_c(tmp_path, error):
    with pytest.raises(error), RunLock(tmp_path, "psr synth"):
        raise error()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path, "psr synth"):  # free again
        pass


def test_a_second_run_is_refused_while_the_holder_lives(tmp_path):
    code = ("import sys, time\nfrom psr.core.runlock import RunLock\n"
            "RunLock(sys.argv[1], 'psr synth').acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as err:
            RunLock(tmp_path, "psr synth").acquire()
        message = str(err.value)
        assert "\n" not in message and f"PID {holder.pid}" in message and "psr synth" in message
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left alone
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lock is stale now, and the next run takes it over with one note.
    notes = []
    with RunLock(tmp_path, "psr synth", notes=notes.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"PID {holder.pid}" in notes[0] and "taking it over" in notes[0]


def test_a_lock_of_a_gone_process_or_a_reused_pid_is_taken_over(tmp_path):
    for fields in ({"pid": _dead_pid()}, {"pid": os.getpid(), "process_start": "not-this-process"}):
        if fields["pid"] == os.getpid() and runlock._process_start(os.getpid()) is None:
            continue  # no /proc: a reused PID cannot be told from its first holder
        _write_lock(tmp_path, **fields)
        notes = []
        with RunLock(tmp_path, "psr synth", notes=notes.append):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] != "t"
        assert len(notes) == 1 and "gone" in notes[0]
        assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_with_no_readable_holder_is_taken_over_after_a_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "_WRITE_GRACE_S", 0.0)
    (tmp_path / LOCK_NAME).write_bytes(b"")  # killed between creating the file and writing it
    notes = []
    with RunLock(tmp_path, "psr synth", notes=notes.append):
        pass
    assert len(notes) == 1 and "names no holder" in notes[0]


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    _write_lock(tmp_path, host="elsewhere.example", pid=1)
    with pytest.raises(UserError, match=f"PID 1 on elsewhere.example.*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path, "psr synth").acquire()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path, "psr synth").acquire()
    _write_lock(tmp_path, token="someone else's")  # taken over behind our back
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "someone else's"


def test_process_alive():
    assert process_alive(os.getpid())
    assert not process_alive(_dead_pid())
    assert not process_alive(0) and not process_alive(-1)


@pytest.mark.parametrize("command, recipe", [("pretrain", "pretrain-toy.toml"), ("rl", "grpo-toy.toml")])
def test_training_into_a_folder_another_run_holds_is_refused_before_it_starts(tmp_path, capsys, command, recipe):
    from psr.cli import main

    out = tmp_path / "run"
    out.mkdir()
    root = Path(__file__).resolve().parent.parent
    with RunLock(out, f"psr {command}"):
        capsys.readouterr()
        assert main([command, "--recipe", str(root / "recipes" / recipe), "--out", str(out), "--resume", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {os.getpid()}" in err[0] and "one run per folder" in err[0], err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing of the refused run
    assert not (out / LOCK_NAME).exists()
