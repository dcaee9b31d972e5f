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
        """The EMA weights in the model for the `with` block, then the training weights again,
        exactly. No copy of the weights is made: each parameter's data is pointed at its
        shadow tensor (same dtype, shape and device, as psr's float32 trainable weights are)
        and pointed back afterwards; a parameter of another dtype is copied alone. The
        shadow tensors are the model's weights during the block, so `update` waits until
        after it; a block that replaces a parameter's data (`module.to(dtype)`) leaves the
        EMA as it was."""
        held: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    shadow = self.shadow[name]
                    if (shadow.dtype, shadow.shape, shadow.device) == (param.dtype, param.shape, param.device):
                        held[name] = param.data
                        param.data = shadow
                    else:
                        kept[name] = param.detach().clone()
                        param.copy_(shadow)
            yield
        finally:
            with torch.no_grad():
                for name, data in held.items():
                    self.params[name].data = data
                for name, data in kept.items():
                    self.params[name].copy_(data)
