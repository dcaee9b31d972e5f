"""The two small conv nets, built from plain config dicts (what `config.json` stores).

IdentityNet (input [B, 3, S, S], S = crop size, 24 by default):
    stem 3x3 conv at full resolution (eyes and pattern dots are 1-2 px), then stages of
    (stride-2 3x3 conv, 3x3 conv), each conv followed by BatchNorm and ReLU →
    feature map [B, C, S/8, S/8] → global average pool → `embed` linear → [B, D]
    (normalised by the caller) and one linear head whose outputs are split by
    `factor_classes` (training aid: the single-label identity factors, then the colours).
    Training also reads the subject's silhouette from the stride-2 and stride-4 stages
    (`forward_train`, 1x1 convs).

LocalizerNet (input [B, 3, 64, 64]):
    encoder at strides 2, 4, 8, 16; a top-down path (nearest up-sampling + 1x1 lateral)
    back to stride 4 → head trunk [B, H, 16, 16] →
    heatmap [B, 1, 16, 16] (subject-centre logits, any category),
    size [B, 2, 16, 16] (box width/height in input pixels / 16),
    offset [B, 2, 16, 16] (sub-cell centre offset in cells, 0-1),
    and from the stride-16 features, scene [B, num_scenes] (logits); for training,
    foreground-mask logits at stride 2 ("mask2") and 4 ("mask4").
    `classifier` is an IdentityNet over subject crops whose heads give the category
    (softmax) and the added attributes (sigmoid): telling ten outlines apart under busy
    patterns needs the subject enlarged to the crop, where a 4-px cell of the full image
    holds too little of it; the centre map only has to find subjects, which it learns fast.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IDENTITY_DEFAULTS = dict(crop=24, stem=16, widths=(32, 64, 128), embed_dim=128, factor_classes=(10, 6, 4, 4, 10))
LOCALIZER_DEFAULTS = dict(input_size=64, widths=(16, 32, 64, 96), head=32, num_categories=10, num_attributes=4,
                          num_scenes=10, classifier=None)
CLASSIFIER_DEFAULTS = dict(crop=24, stem=16, widths=(32, 64, 128), embed_dim=8)


def _cbr(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class IdentityNet(nn.Module):
    def __init__(self, crop: int = 24, stem: int = 16, widths=(32, 64, 128), embed_dim: int = 128,
                 factor_classes=(10, 6, 4, 4, 10)):
        super().__init__()
        self.crop = crop
        self.stem = _cbr(3, stem)
        stages, cin = [], stem
        for w in widths:
            stages.append(nn.Sequential(_cbr(cin, w, 2), _cbr(w, w)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.masks = nn.ModuleList([nn.Conv2d(w, 1, 1) for w in widths[:2]])
        self.embed = nn.Linear(cin, embed_dim)
        self.factor_classes = tuple(factor_classes)
        self.factors = nn.Linear(cin, sum(self.factor_classes))

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs at strides 2, 4, 8."""
        out, h = [], self.stem(x * 2.0 - 1.0)
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → last feature map [B, C, H/8, W/8]."""
        return self._stages(x)[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, S, S] → (embedding [B, D] unnormalised, factor logits [B, sum(classes)])."""
        pooled = self.features(x).mean((2, 3))
        return self.embed(pooled), self.factors(pooled)

    def forward_train(self, x: torch.Tensor):
        """(embedding, factor logits, silhouette logits [[B, 1, S/2, S/2], [B, 1, S/4, S/4]])."""
        stages = self._stages(x)
        pooled = stages[-1].mean((2, 3))
        return self.embed(pooled), self.factors(pooled), [head(f) for head, f in zip(self.masks, stages)]


class LocalizerNet(nn.Module):
    def __init__(self, input_size: int = 64, widths=(16, 32, 64, 96), head: int = 32, num_categories: int = 10,
                 num_attributes: int = 4, num_scenes: int = 10, classifier: dict | None = None):
        super().__init__()
        self.input_size = input_size
        settings = dict(CLASSIFIER_DEFAULTS)
        settings.update({k: tuple(v) if isinstance(v, list) else v for k, v in (classifier or {}).items()})
        self.classifier = IdentityNet(**settings, factor_classes=(num_categories, num_attributes))
        w1, w2, w3, w4 = widths
        self.s1 = nn.Sequential(_cbr(3, w1, 2), _cbr(w1, w1))      # stride 2
        self.s2 = nn.Sequential(_cbr(w1, w2, 2), _cbr(w2, w2))     # stride 4
        self.s3 = nn.Sequential(_cbr(w2, w3, 2), _cbr(w3, w3))     # stride 8
        self.s4 = nn.Sequential(_cbr(w3, w4, 2), _cbr(w4, w4))     # stride 16
        self.lat3 = _cbr(w3 + w4, head, kernel=1)
        self.lat2 = _cbr(w2 + head, head, kernel=1)
        self.trunk = nn.Sequential(_cbr(head, head), _cbr(head, head))
        self.num_categories, self.num_attributes = num_categories, num_attributes
        self.out = nn.Conv2d(head, 1 + 4 + 1, 1)
        self.mask2 = nn.Conv2d(w1, 1, 1)
        self.scene = nn.Linear(w4, num_scenes)
        with torch.no_grad():  # CenterNet's prior: centres are rare, start near p = 0.01
            self.out.bias[0].fill_(-4.6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, 64, 64] in [0, 1] → dict of the maps in the module docstring."""
        a = self.s1(x * 2.0 - 1.0)
        b = self.s2(a)
        c = self.s3(b)
        d = self.s4(c)
        c = self.lat3(torch.cat([F.interpolate(d, scale_factor=2.0, mode="nearest"), c], 1))
        b = self.lat2(torch.cat([F.interpolate(c, scale_factor=2.0, mode="nearest"), b], 1))
        o = self.out(self.trunk(b))
        return {"heatmap": o[:, :1], "size": o[:, 1:3], "offset": o[:, 3:5].sigmoid(), "mask4": o[:, 5:6],
                "mask2": self.mask2(a), "scene": self.scene(d.mean((2, 3)))}

    def classify(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Subject crops [N, 3, c, c] in [0, 1] → (category logits [N, K], attribute logits [N, A])."""
        _, logits = self.classifier(crops)
        return logits[:, :self.num_categories], logits[:, self.num_categories:]


NETS = {"identity": (IdentityNet, IDENTITY_DEFAULTS), "localizer": (LocalizerNet, LOCALIZER_DEFAULTS)}


def build_net(kind: str, config: dict) -> nn.Module:
    """`NETS[kind]` built from its defaults updated with `config` (lists become tuples)."""
    cls, defaults = NETS[kind]
    settings = dict(defaults)
    settings.update({k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return cls(**settings)
