"""Attention regularizers for multi-reference training (REFERENCE §2).

Each regularizer reads head-averaged attention slices from an `AttentionCapture`
(averaged again over the blocks its spec selects) and returns a scalar loss. Exact
definitions, with N references, T target tokens and R = Σ ref_len_i reference tokens:

- `idar` (MultiCrafter's identity-disentangled attention regularization; the paper gives
  no formula, this is psr's): with A = "target_to_refs" [B, T, R] (softmax over all keys),
  every target token t gets a distribution over N+1 classes: p_i(t) = Σ_{r ∈ ref i} A[t, r]
  for each present reference i, and p_rest(t) = 1 − Σ_present p_i(t) (attention to text, to
  the target itself and to absent references). Its label is class i for a token inside
  subject i's mask and "rest" for background. Loss = −log max(p_label, eps), averaged over
  target tokens of the batch. Tokens labelled with an absent reference are left out.
  `class_balanced=True` instead averages within each (sample, class) first, then over the
  classes present in a sample, then over samples, so small subjects weigh as much as the
  background.
- `mosaic_align` (MOSAIC's L_align): with A = "refs_to_target" [B, R, T] (softmax over the
  target keys), for every token r of a present reference with a correspondence t(r) ≥ 0:
  −log max(A[r, t(r)], eps), averaged over those tokens of the batch.
- `mosaic_sep` (MOSAIC's L_sep): Ā_i = mean over reference i's tokens of the
  "refs_to_target" rows (a distribution over target tokens); loss = −mean over the pairs
  i<j of present references (pooled over the batch) of JSD(Ā_i, Ā_j), natural log, so it
  lies in [−log 2, 0]; 0 when no sample has two present references.

A loss with nothing to average (no references, no labelled token) is 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from psr.core.attention import (
    AttentionCapture,
    TokenLayout,
    all_blocks,
    check_block_names,
    select_blocks,
)
from psr.core.recipe import lookup
from psr.core.registry import Registry
from psr.errors import RecipeError, UserError


@dataclass
class RegBatch:
    """The per-sample supervision the regularizers need; one layout for the whole batch."""

    layout: TokenLayout
    target_labels: torch.Tensor
    """[B, target_len] long: 0 = background, i+1 = inside subject i's mask."""
    correspondence: list[torch.Tensor]
    """Per reference i: [B, ref_len_i] long, the target token that reference token shows,
    −1 = none (background, occluded, no reliable match)."""
    ref_valid: torch.Tensor
    """[B, N] bool: reference i is present in sample b (False for padding references)."""

    def __post_init__(self):
        n, b = self.layout.num_refs, self.target_labels.shape[0]
        if self.target_labels.shape != (b, self.layout.target_len):
            raise ValueError(f"target_labels: expected [B, {self.layout.target_len}], "
                             f"got {list(self.target_labels.shape)}")
        if len(self.correspondence) != n:
            raise ValueError(f"correspondence: expected {n} tensors (one per reference), got {len(self.correspondence)}")
        for i, (c, length) in enumerate(zip(self.correspondence, self.layout.ref_lens)):
            if c.shape != (b, length):
                raise ValueError(f"correspondence[{i}]: expected [{b}, {length}], got {list(c.shape)}")
            if c.numel() and (c.min() < -1 or c.max() >= self.layout.target_len):
                raise ValueError(f"correspondence[{i}]: indices must lie in [-1, {self.layout.target_len})")
        if self.ref_valid.shape != (b, n) or self.ref_valid.dtype != torch.bool:
            raise ValueError(f"ref_valid: expected a [{b}, {n}] bool tensor, got {list(self.ref_valid.shape)} "
                             f"{self.ref_valid.dtype}")
        if self.target_labels.numel() and (self.target_labels.min() < 0 or self.target_labels.max() > n):
            raise ValueError(f"target_labels: values must lie in [0, {n}] (0 = background, i+1 = subject i)")

    def to(self, device) -> RegBatch:
        return RegBatch(self.layout, self.target_labels.to(device), [c.to(device) for c in self.correspondence],
                        self.ref_valid.to(device))


class Regularizer(Protocol):
    needs: set[str]

    def __call__(self, capture: AttentionCapture, batch: RegBatch, blocks: Sequence[str] | None = None
                 ) -> torch.Tensor: ...


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0 that stays in the graph, so callers can always backward through the total."""
    return like.sum() * 0.0


def _no_refs(batch: RegBatch) -> torch.Tensor:
    """Without reference tokens nothing is captured and every loss is 0."""
    return torch.zeros((), device=batch.target_labels.device)


# ---------------------------------------------------------------------- the losses on maps
def reference_masses(attn: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """[B, T, R] target→reference attention → [B, T, N] mass per reference."""
    return torch.stack([attn[..., s].sum(-1) for s in layout.ref_slices()], dim=-1)


def idar_loss(attn: torch.Tensor, batch: RegBatch, *, class_balanced: bool = False,
              eps: float = 1e-6) -> torch.Tensor:
    """IDAR on a [B, T, R] "target_to_refs" map (see the module docstring)."""
    layout, n = batch.layout, batch.layout.num_refs
    if n == 0:
        return _zero(attn)
    valid = batch.ref_valid.to(attn.device)
    masses = reference_masses(attn, layout) * valid[:, None, :]          # absent references → rest
    rest = 1.0 - masses.sum(-1, keepdim=True)
    probs = torch.cat([masses, rest], dim=-1)                             # [B, T, N+1]
    labels = batch.target_labels.to(attn.device)
    classes = torch.where(labels == 0, torch.full_like(labels, n), labels - 1)  # subject i → i, bg → N
    keep = (labels == 0) | valid.gather(1, (labels - 1).clamp(min=0))
    nll = -probs.gather(-1, classes[..., None]).squeeze(-1).clamp(min=eps).log()  # [B, T]
    if not keep.any():
        return _zero(attn)
    if not class_balanced:
        return nll[keep].mean()
    per_sample = []
    for b in range(nll.shape[0]):
        terms = [nll[b][keep[b] & (classes[b] == c)].mean() for c in range(n + 1)
                 if (keep[b] & (classes[b] == c)).any()]
        if terms:
            per_sample.append(torch.stack(terms).mean())
    return torch.stack(per_sample).mean()


def mosaic_align_loss(attn: torch.Tensor, batch: RegBatch, *, eps: float = 1e-9) -> torch.Tensor:
    """L_align on a [B, R, T] "refs_to_target" map (see the module docstring): the mean of
    -log(p + eps), MOSAIC's form. Adding eps (not clamping p at it) keeps the gradient of the
    worst-aligned tokens, which a clamp would cut exactly where the loss matters most."""
    if batch.layout.num_refs == 0:
        return _zero(attn)
    valid = batch.ref_valid.to(attn.device)
    target = torch.cat([c.to(attn.device) for c in batch.correspondence], dim=1)          # [B, R]
    present = torch.cat([valid[:, i:i + 1].expand(-1, n) for i, n in enumerate(batch.layout.ref_lens)], dim=1)
    keep = (target >= 0) & present
    if not keep.any():
        return _zero(attn)
    picked = attn.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)                   # [B, R]
    return -(picked[keep] + eps).log().mean()


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """JSD(p, q) in nats over the last dim (each a probability distribution); in [0, log 2]."""
    m = 0.5 * (p + q)

    def kl(a):
        return (a * (a.clamp(min=eps).log() - m.clamp(min=eps).log())).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def mosaic_sep_loss(attn: torch.Tensor, batch: RegBatch) -> torch.Tensor:
    """L_sep on a [B, R, T] "refs_to_target" map (see the module docstring)."""
    n = batch.layout.num_refs
    if n < 2:
        return _zero(attn)
    mean_rows = torch.stack([attn[:, s].mean(1) for s in batch.layout.ref_slices()], dim=1)  # [B, N, T]
    valid = batch.ref_valid.to(attn.device)
    terms = []
    for i in range(n):
        for j in range(i + 1, n):
            both = valid[:, i] & valid[:, j]
            if both.any():
                terms.append(jensen_shannon(mean_rows[both, i], mean_rows[both, j]))
    if not terms:
        return _zero(attn)
    return -torch.cat(terms).mean()


# ---------------------------------------------------------------------- registry
@dataclass(frozen=True)
class IDAR:
    """Identity-disentangled attention regularization (MultiCrafter), psr's cross-entropy form."""

    class_balanced: bool = False
    eps: float = 1e-6
    needs: frozenset = frozenset({"target_to_refs"})

    def __call__(self, capture, batch, blocks=None):
        if not batch.layout.refs_len:
            return _no_refs(batch)
        return idar_loss(capture.mean("target_to_refs", blocks), batch, class_balanced=self.class_balanced,
                         eps=self.eps)


@dataclass(frozen=True)
class MosaicAlign:
    """MOSAIC's semantic-correspondence loss L_align."""

    eps: float = 1e-9
    needs: frozenset = frozenset({"refs_to_target"})

    def __call__(self, capture, batch, blocks=None):
        if not batch.layout.refs_len:
            return _no_refs(batch)
        return mosaic_align_loss(capture.mean("refs_to_target", blocks), batch, eps=self.eps)


@dataclass(frozen=True)
class MosaicSep:
    """MOSAIC's multi-reference disentanglement loss L_sep."""

    needs: frozenset = frozenset({"refs_to_target"})

    def __call__(self, capture, batch, blocks=None):
        if not batch.layout.refs_len:
            return _no_refs(batch)
        return mosaic_sep_loss(capture.mean("refs_to_target", blocks), batch)


REGULARIZERS: Registry[Regularizer] = Registry("regularizer", {
    "idar": IDAR(),
    "mosaic_align": MosaicAlign(),
    "mosaic_sep": MosaicSep(),
})


@dataclass(frozen=True)
class RegularizerSpec:
    """One `[[regularizers]]` table of a training recipe."""

    name: str
    """Which regularizer: "idar", "mosaic_align" or "mosaic_sep"."""
    weight: float = 1.0
    """Loss weight once warmed up (MOSAIC: 0.1 for mosaic_align, 1 for mosaic_sep)."""
    blocks: tuple[str, ...] = ("double",)
    """Blocks whose attention is averaged: "double", "single", "all", or names like
    "transformer_blocks.3" (MOSAIC: all double-stream blocks)."""
    warmup_start: int = 0
    """Step at which the weight starts to ramp up from 0 (MOSAIC's L_sep: 10000)."""
    warmup_end: int = 0
    """Step at which the ramp reaches `weight` (MOSAIC's L_sep: 11000)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Regularizer options: idar takes class_balanced (bool) and eps; mosaic_align takes eps."""

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.name not in REGULARIZERS:
            try:
                lookup(REGULARIZERS, self.name, "regularizer")
            except UserError as err:
                raise RecipeError("name", str(err)) from None
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise RecipeError("weight", f"must be a finite number ≥ 0, got {self.weight}")
        if self.warmup_start < 0 or self.warmup_end < self.warmup_start:
            raise RecipeError("warmup_end", f"need 0 ≤ warmup_start ≤ warmup_end, got {self.warmup_start} and "
                                            f"{self.warmup_end}")
        try:
            check_block_names(self.blocks, "blocks")
        except UserError as err:
            raise RecipeError("blocks", str(err).removeprefix("blocks: ")) from None
        build_regularizer(self)  # checks the options


def build_regularizer(spec: RegularizerSpec) -> Regularizer:
    """The registered regularizer with `spec.options` applied."""
    base = REGULARIZERS[spec.name]
    allowed = {f.name: f for f in dataclasses.fields(base) if f.name != "needs"}
    for key, value in spec.options.items():
        if key not in allowed:
            listed = ", ".join(allowed) or "none"
            raise RecipeError(f"options.{key}", f"unknown option of {spec.name} (options: {listed})")
        kind = type(getattr(base, key))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise RecipeError(f"options.{key}", f"expected {kind.__name__}, got {value!r}")
    return dataclasses.replace(base, **spec.options)


def regularizer_weight(spec: RegularizerSpec, step: int) -> float:
    """0 before `warmup_start`, `weight` from `warmup_end` on, linear in between."""
    if step < spec.warmup_start:
        return 0.0
    if step >= spec.warmup_end:
        return float(spec.weight)
    return float(spec.weight) * (step - spec.warmup_start) / (spec.warmup_end - spec.warmup_start)


def active_specs(specs: Sequence[RegularizerSpec], step: int | None = None) -> list[RegularizerSpec]:
    """The specs with a positive weight (at `step`, when given)."""
    return [s for s in specs if (s.weight > 0 if step is None else regularizer_weight(s, step) > 0)]


def capture_plan(specs: Sequence[RegularizerSpec], transformer, step: int | None = None
                 ) -> tuple[set[str], tuple[str, ...]]:
    """(maps, blocks): the union of the maps and the blocks the active specs need, blocks
    resolved against `transformer` in forward order; empty when nothing is active."""
    maps, blocks = set(), set()
    for spec in active_specs(specs, step):
        maps |= set(REGULARIZERS[spec.name].needs)
        blocks |= set(select_blocks(transformer, spec.blocks))
    return maps, tuple(b for b in all_blocks(transformer) if b in blocks)


def make_capture(specs: Sequence[RegularizerSpec], transformer, layout: TokenLayout,
                 step: int | None = None) -> AttentionCapture | None:
    """An `AttentionCapture` for what the active specs need, or None if none is active."""
    maps, blocks = capture_plan(specs, transformer, step)
    if not maps:
        return None
    return AttentionCapture(transformer, blocks, layout, maps)


def regularizer_losses(specs: Sequence[RegularizerSpec], capture: AttentionCapture | None, batch: RegBatch,
                       step: int) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(weighted total, raw loss per spec name) for the specs active at `step`.

    Each spec averages only over its own blocks. The total is Σ regularizer_weight·loss,
    None when no spec is active; the raw losses are for logging, keyed by name (by
    "name[k]", k the spec's index, when a name occurs twice).
    """
    total, terms = None, {}
    names = [s.name for s in specs]
    for index, spec in enumerate(specs):
        if regularizer_weight(spec, step) <= 0:
            continue
        if capture is None:
            raise ValueError("regularizer_losses: a spec is active but no attention was captured")
        loss = build_regularizer(spec)(capture, batch, select_blocks(capture.transformer, spec.blocks))
        terms[spec.name if names.count(spec.name) == 1 else f"{spec.name}[{index}]"] = loss
        weighted = regularizer_weight(spec, step) * loss
        total = weighted if total is None else total + weighted
    return total, terms
