"""AdamW, the learning-rate schedule, and the EMA of the trainable weights."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch


def build_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.AdamW:
    """AdamW over `params` with the recipe's lr, betas, eps and weight decay."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (counted from 0): linear warmup over
    `cfg.warmup` steps, then 1 (constant) or a cosine from 1 to 0 at `cfg.steps`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


class EMA:
    """Exponential moving average of named parameters, kept in float32 (on their device).

    update: shadow ← shadow + (1 − decay)·(param − shadow), after every optimizer step.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} weights, e.g. {missing[0]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name])

    @contextlib.contextmanager
    def applied(self):
        """Swap the EMA weights into the model for the `with` block, then restore the
        training weights exactly (copies, not arithmetic)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])
