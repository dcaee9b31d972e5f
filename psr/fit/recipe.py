"""The `psr fit` recipe: one generic schema for every fitter in `psr.fit.FITTERS`.

Shared keys (steps, batch size, learning rate, seed, image size, output folder, device,
threads, checkpoint interval) sit at the top level; what only one fitter understands goes
in its `[options]` table, which that fitter's own options dataclass checks (unknown keys
are errors naming `options.<key>`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from psr.core.recipe import _suggest, build
from psr.core.recipe import require as _require
from psr.fit.fitters import FITTERS


@dataclass(frozen=True)
class FitRecipe:
    """`psr fit`: train one small model (a name from psr.fit.FITTERS) and ship its weights."""

    command: Literal["fit"] = "fit"
    model: str = "toy-identity"
    """Which fitter: a name from psr.fit.FITTERS (toy-identity, toy-localizer, ...)."""
    steps: int = 1000
    """Optimisation steps."""
    batch_size: int = 64
    """Training examples per step (the fitter says what one example is)."""
    lr: float = 2e-3
    """Peak learning rate (linear warm-up over `warmup` steps, then cosine decay to 0)."""
    warmup: int = 50
    weight_decay: float = 1e-4
    seed: int = 0
    """Seeds the initialisation, the data stream and the augmentations."""
    size: int = 64
    """Side of the rendered training images in pixels."""
    out: str | None = None
    """Output folder; None writes the fitter's shipped asset folder (psr/assets/...)."""
    device: str = "cpu"
    """'cpu', 'auto' (cuda, then mps, then cpu) or any torch device string."""
    threads: int = 1
    """torch intra-op threads (torch.set_num_threads); 1 keeps a shared machine usable."""
    checkpoint_every: int = 100
    """Steps between checkpoints (written atomically into the output folder)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Fitter-specific settings; see the fitter's options dataclass."""

    def __post_init__(self):
        _require(self.model in FITTERS, "model",
                 f"unknown fitter {self.model!r}{_suggest(self.model, FITTERS)}; choose one of {', '.join(FITTERS)}")
        _require(self.steps >= 1, "steps", "must be >= 1")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.warmup >= 0, "warmup", "must be >= 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.seed >= 0, "seed", "must be >= 0")
        _require(self.size >= 16, "size", "must be >= 16 pixels")
        _require(self.threads >= 1, "threads", "must be >= 1")
        _require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        FITTERS[self.model].check(self)

    def fitter_options(self):
        """The `[options]` table built into the fitter's options dataclass."""
        return build(FITTERS[self.model].Options, dict(self.options), "options")
