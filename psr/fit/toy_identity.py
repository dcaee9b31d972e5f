"""Fitter `toy-identity`: the ToyWorld identity encoder (psr.toyworld.perception.identity).

Data. A stream of items from the training id range (data.paired_views): item n (a pure
function of seed and n) shows 1-4 identities twice, in new poses, scenes and layouts,
as target/target, target/reference or reference/reference views; half the multi-subject
items hold two identities one factor apart (same shape and colours but other eyes, say).
Every render feeds crops of all its paired subjects, so fresh identities are cheap:
`refresh` new items per step, the window [s·refresh, s·refresh + pool) of items
trains step s, and a resumed run rebuilds its window exactly.

Batch. `batch_size / 2` random pairs of the window, both views of each. Every image is
degraded like a generated one (psr.toyworld.perception.data.degrade), then the subject is
cropped around its ground-truth box with random padding and jitter, resampled to
`crop` px with roi_align (the encoder's own resampling) and randomly mirrored.

Loss. Supervised contrastive loss (SupCon: positives = the other view of the same
identity; the sibling in the batch is a hard negative) at `temperature`
+ `factor_weight` × the sum of the auxiliary identity-part losses (cross-entropy for
shape, pattern, eyes and top; multi-label BCE for the colours shown), which carry the
parts of an identity over to held-out identities
+ `mask_weight` × BCE of the subject's silhouette read from the stride-2 and stride-4
stages (a small CNN learns shapes slowly from patterned colour images and quickly from
silhouettes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from psr import toyworld as tw
from psr.errors import RecipeError
from psr.fit.loop import lr_at
from psr.toyworld.identity import COLOUR_NAMES
from psr.toyworld.perception.data import (
    FACTORS,
    NUM_COLOURS,
    degrade,
    identity_colours,
    identity_factors,
    paired_views,
    to_float,
)
from psr.toyworld.perception.identity import ToyIdentityEncoder
from psr.toyworld.perception.metrics import retrieval_table
from psr.toyworld.perception.nets import build_net

ASSET = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "identity"


@dataclass(frozen=True)
class ToyIdentityOptions:
    crop: int = 24
    """Side of the square crop the net sees, px."""
    stem: int = 16
    widths: tuple[int, ...] = (32, 64, 128)
    """Channels of the stride-2 stages (the last is the feature dimension)."""
    embed_dim: int = 128
    pool: int = 600
    """Items in the training window (about 2.4 identity pairs each)."""
    refresh: int = 6
    """New items rendered per step (the oldest leave the window)."""
    sibling_rate: float = 0.5
    """Chance that a multi-subject item holds two identities one factor apart."""
    attribute_rate: float = 0.3
    temperature: float = 0.1
    factor_weight: float = 1.0
    mask_weight: float = 1.0
    """Weight of the silhouette loss (the subject's mask read from the stride-2 and -4 stages)."""
    pad: tuple[float, float] = (0.05, 0.2)
    """Crop padding range on every side, fraction of the box side."""
    jitter: float = 0.04
    """Box centre and size jitter, fraction of the box side."""
    degrade: bool = True
    eval_identities: int = 1000
    """Gallery size of the final retrieval measurement (held-out identities)."""
    eval_pad: float = 0.1


class ToyIdentityFitter:
    Options = ToyIdentityOptions
    asset = ASSET

    @classmethod
    def check(cls, recipe) -> None:
        o = recipe.fitter_options()
        if recipe.batch_size % 2 or recipe.batch_size < 4:
            raise RecipeError("batch_size", "must be an even number >= 4 (two views of each identity)")
        if recipe.batch_size // 2 > o.pool:
            raise RecipeError("options.pool", "must hold at least the pairs of one batch (one item has >= 1)")
        if o.refresh < 0 or o.eval_identities < 5:
            raise RecipeError("options", "need refresh >= 0 and eval_identities >= 5")
        if not 0.0 <= o.pad[0] <= o.pad[1] or len(o.pad) != 2:
            raise RecipeError("options.pad", "expected [low, high] with 0 <= low <= high")

    def __init__(self, recipe, options: ToyIdentityOptions, device):
        import torch

        self.recipe, self.o, self.device = recipe, options, device
        self.config = dict(crop=options.crop, stem=options.stem, widths=list(options.widths),
                           embed_dim=options.embed_dim, factor_classes=[*FACTORS.values(), NUM_COLOURS])
        self.model = build_net("identity", self.config).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.pool: dict[int, tuple] = {}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    # ------------------------------------------------------------------ data
    def _item(self, n: int):
        """Stream item n with its labels: (PairedViews, factors [k, 4], colours [k, 10])."""
        import numpy as np

        views = paired_views(self.recipe.seed, n, tw.DEFAULT_ID_RANGES["train"], self.recipe.size,
                             self.o.sibling_rate, self.o.attribute_rate)
        return (views, np.array([identity_factors(i) for i in views.identity]),
                np.array([identity_colours(i) for i in views.identity], np.float32))

    def _window(self, step: int, show_progress: bool = False) -> None:
        first = step * self.o.refresh
        wanted = range(first, first + self.o.pool)
        for n in list(self.pool):
            if n not in wanted:
                del self.pool[n]
        missing = [n for n in wanted if n not in self.pool]
        if show_progress and len(missing) > 1:
            from tqdm import tqdm

            missing = tqdm(missing, desc="render identity pool", leave=False)
        for n in missing:
            self.pool[n] = self._item(n)

    def prepare(self, step: int, show_progress: bool) -> None:
        self._window(step, show_progress)

    def _batch(self, step: int):
        """(crops [B, 3, crop, crop] in [0, 1], mask crops [B, 1, crop, crop], identity ids [B],
        factors [B, 4], colours [B, 10]) for one step: view 0 of B/2 pairs, then their view 1."""
        import numpy as np
        import torch
        from torchvision.ops import roi_align

        o = self.o
        rng = np.random.default_rng([0xBA7C, self.recipe.seed, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        pairs = [(n, j) for n in sorted(self.pool) for j in range(len(self.pool[n][0].identity))]
        chosen = [pairs[i] for i in rng.choice(len(pairs), size=self.recipe.batch_size // 2, replace=False)]
        images, masks, boxes = [], [], []
        for v in (0, 1):
            for n, j in chosen:
                views = self.pool[n][0]
                images.append(views.images[views.image[v][j]])
                masks.append(views.mask[v][j])
                boxes.append(views.box[v][j])
        labels = np.array([self.pool[n][0].identity[j] for n, j in chosen] * 2)
        factors = np.stack([self.pool[n][1][j] for n, j in chosen] * 2)
        colours = np.stack([self.pool[n][2][j] for n, j in chosen] * 2)
        x = to_float(np.stack(images))
        if o.degrade:
            x = degrade(x, gen)
        x = torch.cat([x, torch.from_numpy(np.stack(masks)).float()[:, None]], 1)  # cropped together
        b = torch.from_numpy(np.stack(boxes))
        w, h = (b[:, 2] - b[:, 0]).clamp(min=1), (b[:, 3] - b[:, 1]).clamp(min=1)
        n = len(b)

        def u(lo, hi):
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        cx = (b[:, 0] + b[:, 2]) / 2 + u(-o.jitter, o.jitter) * w
        cy = (b[:, 1] + b[:, 3]) / 2 + u(-o.jitter, o.jitter) * h
        half_w = w * (0.5 + u(*o.pad)) * (1 + u(-o.jitter, o.jitter))
        half_h = h * (0.5 + u(*o.pad)) * (1 + u(-o.jitter, o.jitter))
        rois = torch.stack([torch.arange(n, dtype=torch.float32), cx - half_w, cy - half_h, cx + half_w,
                            cy + half_h], 1)
        crops = roi_align(x, rois, output_size=o.crop, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flip = torch.rand(n, generator=gen) < 0.5
        crops[flip] = crops[flip].flip(-1)
        return (crops[:, :3], crops[:, 3:], torch.from_numpy(labels), torch.from_numpy(factors),
                torch.from_numpy(colours))

    # ------------------------------------------------------------------ training
    def train_step(self, step: int) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        self._window(step)
        crops, masks, labels, factors, colours = self._batch(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.recipe)
        self.model.train()
        emb, logits, mask_logits = self.model.forward_train(crops.to(self.device))
        z = F.normalize(emb, dim=-1)
        sim = z @ z.T / self.o.temperature
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        sim = sim.masked_fill(eye, float("-inf"))
        labels = labels.to(z.device)
        positive = (labels[:, None] == labels[None, :]) & ~eye
        log_prob = sim.log_softmax(dim=1).masked_fill(eye, 0.0)
        contrastive = -(log_prob * positive).sum(1).div(positive.sum(1).clamp(min=1)).mean()
        *parts, colour_logits = logits.split(self.model.factor_classes, dim=1)
        factor_loss = sum(F.cross_entropy(part, factors[:, k].to(z.device)) for k, part in enumerate(parts))
        # Summed, not averaged: each part (shape above all) must weigh as much as SupCon.
        factor_loss = factor_loss + F.binary_cross_entropy_with_logits(colour_logits, colours.to(z.device)) * 4
        masks = masks.to(z.device)
        mask_loss = sum(F.binary_cross_entropy_with_logits(m, F.adaptive_avg_pool2d(masks, m.shape[-2:]))
                        for m in mask_logits) / len(mask_logits)
        loss = contrastive + self.o.factor_weight * factor_loss + self.o.mask_weight * mask_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "supcon": contrastive.item(), "factors": factor_loss.item(),
                "mask": mask_loss.item()}

    # ------------------------------------------------------------------ output
    def encoder(self):
        meta = {"config": self.config, "labels": {"factors": dict(FACTORS), "colours": list(COLOUR_NAMES)}}
        return ToyIdentityEncoder(self.model.eval(), meta)

    def save(self, folder: Path) -> None:
        self.encoder().save_pretrained(folder)

    def evaluate(self, show_progress: bool) -> dict:
        return {"retrieval": retrieval_table(self.encoder(), self.o.eval_identities, seed=12345,
                                             pad=self.o.eval_pad, show_progress=show_progress),
                "eval_identities": self.o.eval_identities, "image_size": self.recipe.size}
