"""Fitter `toy-localizer`: the ToyWorld localizer (psr.toyworld.perception.localizer).

Data. A stream of training-range target scenes (psr.toyworld.perception.data.
localizer_scene: 1-4 subjects, categories repeating half the time, attributes at
`attribute_rate`, a few empty scenes); scene n is a pure function of (seed, n). Step s
trains on the window of scenes [s·refresh, s·refresh + pool), so a step renders only
`refresh` new scenes and a resumed run rebuilds its window exactly. Each batch image is
randomly mirrored and degraded like a generated image (data.degrade).

Targets at stride 4 (16x16 for 64 px), CenterNet's: a gaussian at every visible
subject's box centre (sigma = max(0.6, short side in cells / 6)) with 1 at the centre
cell, in one class-agnostic map; at the centre cell the box size (px / 16) and the
sub-cell offset. Subjects with fewer than 4 visible pixels are left out. The crop
classifier sees every such subject cropped from the same degraded image around its box,
jittered like a detection (centre and size by up to `crop_jitter` of the box, padding in
`crop_pad`), and learns its category and attributes.

Loss = focal heatmap loss (CenterNet's, alpha 2, beta 4, per instance) + `size_weight` ×
L1 size + `offset_weight` × L1 offset + `category_weight` × category CE + `attribute_weight`
× attribute BCE (crop classifier) + `scene_weight` × scene CE + `mask_weight` ×
foreground-mask BCE at strides 2 and 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from psr import toyworld as tw
from psr.errors import RecipeError
from psr.fit.loop import lr_at
from psr.toyworld.perception.data import ATTRIBUTE_NAMES, CATEGORIES, SCENE_NAMES, degrade, localizer_scene, to_float
from psr.toyworld.perception.localizer import ToyLocalizer, crop_subjects
from psr.toyworld.perception.metrics import detection_renders, detection_table
from psr.toyworld.perception.nets import build_net

ASSET = Path(__file__).resolve().parents[1] / "assets" / "toyworld" / "localizer"
MAX_SUBJECTS = 4
MIN_AREA = 4


@dataclass(frozen=True)
class ToyLocalizerOptions:
    widths: tuple[int, ...] = (16, 32, 64, 96)
    """Channels at strides 2, 4, 8, 16."""
    head: int = 32
    """Channels of the stride-4 head trunk."""
    pool: int = 3000
    """Scenes in the training window."""
    refresh: int = 8
    """New scenes rendered per step (the oldest leave the window)."""
    attribute_rate: float = 0.3
    empty_rate: float = 0.03
    size_weight: float = 1.0
    category_weight: float = 1.0
    offset_weight: float = 1.0
    attribute_weight: float = 1.0
    scene_weight: float = 0.5
    mask_weight: float = 1.0
    """Weight of the foreground-silhouette loss at strides 2 and 4 (see nets.LocalizerNet)."""
    classifier_widths: tuple[int, ...] = (32, 64, 128)
    """Channels of the crop classifier's stride-2 stages."""
    classifier_crop: int = 24
    crop_jitter: float = 0.08
    """Classifier crops: box centre and size jitter, fraction of the box side."""
    crop_pad: tuple[float, float] = (0.05, 0.2)
    """Classifier crops: padding range on every side, fraction of the box side."""
    degrade: bool = True
    threshold: float = 0.5
    """Detection threshold of the final measurement (and of the shipped localizer's default)."""
    eval_images: int = 400
    """Held-out renders per condition in the final measurement."""


class ToyLocalizerFitter:
    Options = ToyLocalizerOptions
    asset = ASSET

    @classmethod
    def check(cls, recipe) -> None:
        o = recipe.fitter_options()
        if len(o.widths) != 4:
            raise RecipeError("options.widths", "give 4 widths (strides 2, 4, 8, 16)")
        if recipe.size % 16:
            raise RecipeError("size", "must be a multiple of 16 for the localizer")
        if o.pool < recipe.batch_size or o.refresh < 0:
            raise RecipeError("options.pool", "must hold at least one batch (and refresh >= 0)")
        if not 0.0 < o.threshold < 1.0 or o.eval_images < 1:
            raise RecipeError("options", "need 0 < threshold < 1 and eval_images >= 1")

    def __init__(self, recipe, options: ToyLocalizerOptions, device):
        import torch

        self.recipe, self.o, self.device = recipe, options, device
        self.config = dict(input_size=recipe.size, widths=list(options.widths), head=options.head,
                           num_categories=len(CATEGORIES), num_attributes=len(ATTRIBUTE_NAMES),
                           num_scenes=len(SCENE_NAMES),
                           classifier=dict(crop=options.classifier_crop, widths=list(options.classifier_widths)))
        self.labels = {"categories": list(CATEGORIES), "attributes": list(ATTRIBUTE_NAMES),
                       "scenes": list(SCENE_NAMES)}
        self.model = build_net("localizer", self.config).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.pool: dict[int, tuple] = {}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    # ------------------------------------------------------------------ data
    def _scene(self, n: int) -> tuple:
        """(image uint8 [S, S, 3], boxes [4, 4] px, categories [4] (-1 = none),
        attributes [4, A], scene index, foreground mask bool [S, S]) of stream scene n."""
        import numpy as np

        rng = np.random.default_rng([0x10C, self.recipe.seed, n])
        spec = localizer_scene(rng, tw.DEFAULT_ID_RANGES["train"], self.o.attribute_rate, self.o.empty_rate)
        r = tw.render(spec, self.recipe.size)
        boxes = np.zeros((MAX_SUBJECTS, 4), np.float32)
        cats = np.full(MAX_SUBJECTS, -1, np.int64)
        attrs = np.zeros((MAX_SUBJECTS, len(ATTRIBUTE_NAMES)), np.float32)
        for i, s in enumerate(spec.subjects):
            if r.masks[i].sum() >= MIN_AREA:
                boxes[i] = r.boxes[i]
                cats[i] = CATEGORIES.index(tw.Identity.from_id(s.identity).category)
                attrs[i] = [a in s.attributes for a in ATTRIBUTE_NAMES]
        return r.image, boxes, cats, attrs, SCENE_NAMES.index(spec.scene), r.masks.any(0)

    def _window(self, step: int, show_progress: bool = False) -> None:
        first = step * self.o.refresh
        wanted = range(first, first + self.o.pool)
        for n in list(self.pool):
            if n not in wanted:
                del self.pool[n]
        missing = [n for n in wanted if n not in self.pool]
        if show_progress and len(missing) > 1:
            from tqdm import tqdm

            missing = tqdm(missing, desc="render localizer pool", leave=False)
        for n in missing:
            self.pool[n] = self._scene(n)

    def prepare(self, step: int, show_progress: bool) -> None:
        self._window(step, show_progress)

    def targets(self, boxes, cats):
        """Detector targets of a batch: boxes [B, 4, 4] px, cats [B, 4] (-1 = none) → dict with
        heatmap [B, 1, h, w] and the N valid instances' (batch, slot) indices, centre cells
        (batch, y, x), size [N, 2] and offset [N, 2]."""
        import torch

        b, s = boxes.shape[0], self.recipe.size // 4
        heat = torch.zeros(b, s, s)
        bi, si = torch.nonzero(cats >= 0, as_tuple=True)
        box = boxes[bi, si]
        cx, cy = (box[:, 0] + box[:, 2]) / 8, (box[:, 1] + box[:, 3]) / 8      # cells
        w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
        ix, iy = cx.floor().long().clamp(0, s - 1), cy.floor().long().clamp(0, s - 1)
        sigma = (torch.minimum(w, h) / 4 / 6).clamp(min=0.6)
        grid = torch.arange(s, dtype=torch.float32) + 0.5
        for n in range(len(bi)):
            d2 = (grid[None, :] - cx[n]) ** 2 + (grid[:, None] - cy[n]) ** 2
            j = int(bi[n])
            heat[j] = torch.maximum(heat[j], torch.exp(-d2 / (2 * sigma[n] ** 2)))
            heat[j, iy[n], ix[n]] = 1.0
        return {"heatmap": heat[:, None], "instances": (bi, si), "centres": (bi, iy, ix),
                "size": torch.stack([w, h], 1) / 16, "offset": torch.stack([cx - ix, cy - iy], 1)}

    def _batch(self, step: int):
        import numpy as np
        import torch

        rng = np.random.default_rng([0xBA7D, self.recipe.seed, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        keys = rng.choice(sorted(self.pool), size=self.recipe.batch_size, replace=False)
        items = [self.pool[int(k)] for k in keys]
        x = to_float(np.stack([it[0] for it in items]))
        boxes = torch.from_numpy(np.stack([it[1] for it in items]))
        cats = torch.from_numpy(np.stack([it[2] for it in items]))
        attrs = torch.from_numpy(np.stack([it[3] for it in items]))
        scenes = torch.tensor([it[4] for it in items])
        masks = torch.from_numpy(np.stack([it[5] for it in items])).float()[:, None]
        flip = torch.rand(len(items), generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        masks[flip] = masks[flip].flip(-1)
        side = float(self.recipe.size)
        flipped = torch.stack([side - boxes[..., 2], boxes[..., 1], side - boxes[..., 0], boxes[..., 3]], -1)
        boxes = torch.where(flip[:, None, None], flipped, boxes)
        if self.o.degrade:
            x = degrade(x, gen)
        return x, boxes, cats, attrs, scenes, masks, gen

    # ------------------------------------------------------------------ training
    def train_step(self, step: int) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        self._window(step)

        x, boxes, cats, attrs, scenes, masks, gen = self._batch(step)
        t = self.targets(boxes, cats)
        bi, si = t["instances"]
        # The classifier's crops: ground-truth boxes moved and resized like imperfect detections.
        box = boxes[bi, si].clone()
        n = len(box)
        w, h = (box[:, 2] - box[:, 0]).clamp(min=1), (box[:, 3] - box[:, 1]).clamp(min=1)
        j = self.o.crop_jitter

        def u(lo, hi):
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        cx, cy = (box[:, 0] + box[:, 2]) / 2 + u(-j, j) * w, (box[:, 1] + box[:, 3]) / 2 + u(-j, j) * h
        w, h = w * (1 + u(-j, j)), h * (1 + u(-j, j))
        jittered = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        crops = crop_subjects(x, bi, jittered, self.model.classifier.crop, u(*self.o.crop_pad))
        flip = torch.rand(n, generator=gen) < 0.5
        crops[flip] = crops[flip].flip(-1)
        t = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.recipe)
        self.model.train()
        out = self.model(x.to(self.device))
        heat_t = t["heatmap"]
        p = out["heatmap"].sigmoid().clamp(1e-4, 1 - 1e-4)
        pos = heat_t.eq(1.0)
        focal = -(torch.where(pos, (1 - p) ** 2 * p.log(), (1 - heat_t) ** 4 * p ** 2 * (1 - p).log())).sum()
        focal = focal / pos.sum().clamp(min=1)
        loss, terms = focal, {"heat": focal.item()}
        ci, iy, ix = t["centres"]
        if len(ci):
            size_l = F.l1_loss(out["size"][ci, :, iy, ix], t["size"])
            offset_l = F.l1_loss(out["offset"][ci, :, iy, ix], t["offset"])
            cat_logits, attr_logits = self.model.classify(crops.to(self.device))
            cat_l = F.cross_entropy(cat_logits, cats[bi, si].to(self.device))
            attr_l = F.binary_cross_entropy_with_logits(attr_logits, attrs[bi, si].to(self.device))
            loss = loss + (self.o.size_weight * size_l + self.o.offset_weight * offset_l
                           + self.o.category_weight * cat_l + self.o.attribute_weight * attr_l)
            terms.update(size=size_l.item(), offset=offset_l.item(), cat=cat_l.item(), attr=attr_l.item())
        scene_l = F.cross_entropy(out["scene"], scenes.to(self.device))
        masks = masks.to(self.device)
        mask_l = sum(F.binary_cross_entropy_with_logits(out[k], F.adaptive_avg_pool2d(masks, out[k].shape[-2:]))
                     for k in ("mask2", "mask4")) / 2
        loss = loss + self.o.scene_weight * scene_l + self.o.mask_weight * mask_l
        terms.update(scene=scene_l.item(), mask=mask_l.item())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        terms["loss"] = loss.item()
        return terms

    # ------------------------------------------------------------------ output
    def localizer(self):
        return ToyLocalizer(self.model.eval(), {"config": self.config, "labels": self.labels},
                            threshold=self.o.threshold)

    def save(self, folder: Path) -> None:
        self.localizer().save_pretrained(folder)

    def evaluate(self, show_progress: bool) -> dict:
        renders = detection_renders(self.o.eval_images, size=self.recipe.size)
        return {"detection": detection_table(self.localizer(), renders, show_progress=show_progress),
                "eval_images": self.o.eval_images, "threshold": self.o.threshold, "image_size": self.recipe.size}
