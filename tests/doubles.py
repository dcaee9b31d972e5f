"""Test doubles shared by the training tests: reward components, and a kill after a checkpoint."""

import contextlib

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
