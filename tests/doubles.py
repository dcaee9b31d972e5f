"""Test doubles shared by the tests: reward components, a kill after a checkpoint, and a
disk that fills up."""

import builtins
import contextlib
import errno as errnos
import io
import os

import numpy as np
import torch

from psr.core.detect import Detection


class WholeImage:
    """Localizer double: every query is found once, as the whole image."""

    def detect(self, image, queries):
        return [Detection((0.0, 0.0, float(image.width), float(image.height)), 1.0, q) for q in queries]


class MeanColour:
    """Extractor double: mean RGB minus grey, L2-normalised (rollouts differ, so rewards do)."""

    def embed_images(self, images):
        rows = [np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3).mean(0) - 128.0 for im in images]
        return torch.nn.functional.normalize(torch.tensor(np.stack(rows), dtype=torch.float32), dim=-1)

    def embed_texts(self, texts):
        raise NotImplementedError


def psr_reward_on_doubles():
    """psr's consistency reward with ToyWorld's perception swapped for the doubles above: a
    random tiny model's images hold nothing ToyWorld's would find, and equal rewards train
    nothing."""
    from psr.rewards import RewardSpec, build_rewards

    return build_rewards([RewardSpec("psr", options={"extractor": MeanColour(), "localizer": WholeImage()})])


@contextlib.contextmanager
def killed_after_first_checkpoint(monkeypatch, workflow):
    """Inside the block, `workflow.save_checkpoint` writes its checkpoint and then raises
    KeyboardInterrupt, as a kill right after the first checkpoint would; restored after."""
    real = workflow.save_checkpoint

    def save_then_die(run, step):
        real(run, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "save_checkpoint", save_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(workflow, "save_checkpoint", real)


class _FailingFile:
    """A file opened for writing whose every write raises `error`, as on a full disk: the
    file exists (empty) and its first write fails."""

    def __init__(self, file, error):
        self._file, self._error = file, error

    def write(self, data):
        raise self._error

    def writelines(self, lines):
        raise self._error

    def fileno(self):  # no descriptor: C encoders (PIL) must go through write()
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __iter__(self):
        return iter(self._file)


@contextlib.contextmanager
def fail_writes_after(monkeypatch, n, errno=errnos.ENOSPC, under=None):
    """Inside the block, the first `n` files opened for writing (through `open`, `io.open`,
    so `Path.write_text`/`write_bytes` and PIL's `Image.save` too) work; every later one
    is created but its writes raise OSError(`errno`), as when the disk fills up midway
    and stays full. `under` limits this to files below that folder. Yields a dict whose
    "opened" counts the files opened for writing; everything is restored after."""
    real = builtins.open
    state = {"opened": 0}
    root = None if under is None else os.path.realpath(under)

    def counted(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wax+") or isinstance(file, int):
            return handle
        if root is not None and not os.path.realpath(file).startswith(root + os.sep):
            return handle
        state["opened"] += 1
        if state["opened"] <= n:
            return handle
        # As from a real write(): errno and message, no file name (only open() names one).
        return _FailingFile(handle, OSError(errno, os.strerror(errno)))

    monkeypatch.setattr(builtins, "open", counted)
    monkeypatch.setattr(io, "open", counted)
    try:
        yield state
    finally:
        monkeypatch.setattr(builtins, "open", real)
        monkeypatch.setattr(io, "open", real)
