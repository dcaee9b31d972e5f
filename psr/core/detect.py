"""Open-vocabulary subject localization behind one interface.

`Localizer.detect(image, queries)` returns every instance scoring above the threshold,
best first. The registry `LOCALIZERS` maps names to factories `(device, **options)`.

`grounding-dino`: transformers' `GroundingDinoForObjectDetection` + `GroundingDinoProcessor`
(`IDEA-Research/grounding-dino-tiny`/`-base`, or a local folder). Scoring: the queries are
joined as "cat. dog." (Grounding DINO's prompt format); each box's score for a query is
the highest token probability over that query's own tokens, and the box takes the query
it scores best on. This keeps boxes labelled by the query that produced them, where the
processor's stock post-processing decodes whichever tokens pass a second threshold.

Test models: Grounding DINO's text backbone is BERT and its code hard-codes BERT's ids
for [CLS]=101, [SEP]=102, "."=1012 and "?"=1029 (they split the prompt into phrases).
BERT's vocabulary cannot be downloaded here, so `build_tiny_bert_tokenizer` writes a
WordPiece vocabulary with exactly that id layout: the special tokens at BERT's ids,
placeholders between them, then a-z and ##a-##z (so ANY lowercase word tokenizes, letter by
letter at worst) and any whole words given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from psr.core.components import HoldsModel
from psr.core.features import _first_line, _resolve_device, _torch_dtype
from psr.core.recipe import lookup
from psr.core.registry import Registry
from psr.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) in pixels of the input image, clipped to it."""
    score: float
    """Confidence in [0, 1]."""
    label: str
    """The query this box was found for, exactly as passed in."""


class Localizer(Protocol):
    def detect(self, image: "Image.Image", queries: Sequence[str]) -> list[Detection]:
        """All instances of any query above the threshold, sorted by score (best first)."""


# ---------------------------------------------------------------------------- box helpers
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assign_boxes(detections: Sequence[Detection], labels: Sequence[str],
                 max_overlap: float = 0.5) -> list[Detection | None]:
    """One detection per wanted label, in order: the best-scoring box of that label that
    overlaps no already-chosen box by more than `max_overlap` IoU (so two subjects of the
    same category get two different boxes), or None when there is none."""
    chosen: list[Detection | None] = []
    taken: list[Detection] = []
    for label in labels:
        pick = next((d for d in sorted(detections, key=lambda d: -d.score)
                     if d.label == label and all(box_iou(d.box, t.box) <= max_overlap for t in taken)), None)
        chosen.append(pick)
        if pick is not None:
            taken.append(pick)
    return chosen


def crop_box(image: "Image.Image", box: Sequence[float], pad: float = 0.0) -> "Image.Image":
    """The box grown by `pad` x its size on every side, clipped to the image, cropped
    (integer pixel bounds: floor of the start, ceil of the end, at least 1 px)."""
    import math

    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * pad, (y1 - y0) * pad
    left = min(max(0, math.floor(x0 - dx)), image.width - 1)
    top = min(max(0, math.floor(y0 - dy)), image.height - 1)
    right = min(image.width, max(left + 1, math.ceil(x1 + dx)))
    bottom = min(image.height, max(top + 1, math.ceil(y1 + dy)))
    return image.crop((left, top, right, bottom))


def box_mask(box: Sequence[float], height: int, width: int) -> "np.ndarray":
    """[H, W] bool: pixels whose centre lies in the box (x1/y1 exclusive)."""
    import numpy as np

    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    x0, y0, x1, y1 = box
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


# ---------------------------------------------------------------------------- tiny test parts
# BERT's ids for the tokens Grounding DINO's modeling code looks for by number.
_BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}


def build_tiny_bert_tokenizer(words: Sequence[str] = ()):
    """A `BertTokenizerFast` (WordPiece, lowercasing) built offline, with BERT's ids for the
    special tokens; see the module docstring. Whole `words` get one id each."""
    from transformers import BertTokenizerFast

    size = max(_BERT_SPECIAL_IDS.values()) + 1
    by_id = {i: t for t, i in _BERT_SPECIAL_IDS.items()}
    vocab = [by_id.get(i, f"[unused{i}]") for i in range(size)]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    extra = list(letters) + ["##" + c for c in letters] + [",", "!", "'", "-"]
    extra += [w.lower() for w in words if w.strip()]
    vocab += [t for t in dict.fromkeys(extra) if t not in set(vocab)]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


TINY_GROUNDING_DINO = dict(
    d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
    encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, max_text_len=32,
    encoder_n_points=2, decoder_n_points=2,
)
"""Sizes of the random-init test model (2 decoder layers: transformers ties the box heads
of decoder layers 1.. to layer 0 and rejects a single layer)."""


def build_tiny_grounding_dino(seed: int = 0, words: Sequence[str] = (), config: dict | None = None,
                              image_size: int = 128):
    """(model, processor): a random-init Grounding DINO with a tiny Swin backbone and a tiny
    BERT, and a processor whose images are resized so the shorter side is `image_size`
    (at 64 px the coarsest of the 4 feature levels would be 1x1, which GroupNorm rejects)."""
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessor

    tokenizer = build_tiny_bert_tokenizer(words)
    settings = dict(TINY_GROUNDING_DINO)
    settings.update(config or {})
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=image_size, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
        **settings)
    cpu_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GroundingDinoForObjectDetection(cfg)
    finally:
        torch.random.set_rng_state(cpu_state)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": image_size, "longest_edge": 2 * image_size}),
        tokenizer=tokenizer)
    return model.eval(), processor


# ---------------------------------------------------------------------------- Grounding DINO
def _query_text(queries: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's prompt ("cat. red dog.") and each query's character span in it."""
    text, spans = "", []
    for q in queries:
        phrase = " ".join(q.lower().replace(".", " ").split())
        if not phrase:
            raise UserError(f"detector query {q!r}: empty after normalisation")
        if text:
            text += " "
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase + "."
    return text, spans


class GroundingDinoLocalizer(HoldsModel):
    """Grounding DINO as a `Localizer`; see the module docstring for the scoring."""

    name = "grounding-dino"

    def __init__(self, model, processor, *, threshold: float = 0.35, nms_iou: float | None = 0.5,
                 max_detections: int | None = None):
        self.model = model.eval()
        self.processor = processor
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections

    def detect(self, image: "Image.Image", queries: Sequence[str]) -> list[Detection]:
        """Every box whose best query score exceeds `threshold`; same-label boxes that overlap
        a better one by more than `nms_iou` IoU are dropped (Grounding DINO emits
        near-duplicates); sorted by score, at most `max_detections`."""
        import torch

        if not queries:
            return []
        image = image.convert("RGB")
        text, spans = _query_text(queries)
        tokenizer = self.processor.tokenizer
        encoded = tokenizer(text, return_offsets_mapping=True)
        limit = self.model.config.max_text_len
        if len(encoded["input_ids"]) > limit:
            raise UserError(f"detector: {len(queries)} queries take {len(encoded['input_ids'])} tokens, "
                            f"more than this model's {limit}; detect fewer categories at a time")
        out = self._forward(image, text)
        probs = out.logits[0].float().sigmoid().cpu()  # [Q, max_text_len]; padded positions are 0
        # Token j belongs to query q when its characters lie inside q's span.
        owner = torch.full((probs.shape[1],), -1, dtype=torch.long)
        for j, (start, end) in enumerate(encoded["offset_mapping"]):
            for q, (s, e) in enumerate(spans):
                if end > start and start >= s and end <= e:
                    owner[j] = q
        per_query = torch.stack([
            probs[:, owner == q].max(dim=1).values if (owner == q).any() else torch.zeros(probs.shape[0])
            for q in range(len(queries))], dim=1)  # [Q, num queries]
        scores, labels = per_query.max(dim=1)
        boxes = self._pixel_boxes(out.pred_boxes[0].float().cpu(), image.width, image.height)
        keep = scores > self.threshold
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.nms_iou is not None and len(scores):
            from torchvision.ops import batched_nms

            kept = batched_nms(boxes, scores, labels, self.nms_iou)
            boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
        order = torch.argsort(scores, descending=True, stable=True)
        found = [Detection(box=tuple(float(v) for v in boxes[i]), score=float(scores[i]),
                           label=queries[int(labels[i])]) for i in order]
        return found[: self.max_detections] if self.max_detections else found

    def detect_psrbench(self, image: "Image.Image", caption: str) -> list[Detection]:
        """Grounding DINO as PSRBench's scripts call it (the original repository's
        `predict`): `caption` lower-cased and stripped with a period appended; a query is kept
        when its highest probability over ALL caption tokens, the special tokens and the
        period included, exceeds `threshold`; boxes in the decoder's query order, in pixels
        of `image`, not clipped; no NMS, no sorting. `image` must be RGB (the caller decides
        what a non-RGB image gets: the scripts' transform fails on one)."""
        caption = caption.lower().strip()
        caption = caption if caption.endswith(".") else caption + "."
        out = self._forward(image, caption)
        # Positions past the caption are -inf logits (probability 0), so the max over the
        # whole row is the max over the caption's own tokens, specials included.
        scores = out.logits[0].float().sigmoid().cpu().max(dim=1).values
        boxes = self._pixel_boxes(out.pred_boxes[0].float().cpu(), image.width, image.height, clip=False)
        return [Detection(box=tuple(float(v) for v in boxes[i]), score=float(scores[i]), label=caption)
                for i in range(len(scores)) if scores[i] > self.threshold]

    def _forward(self, image: "Image.Image", text: str):
        """The model's output for one image and one caption (inputs on the model's device,
        floating inputs in its dtype), without gradients."""
        import torch

        inputs = self.processor(images=image, text=text, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        with torch.no_grad():
            return self.model(**inputs)

    @staticmethod
    def _pixel_boxes(cxcywh: "torch.Tensor", width: int, height: int, clip: bool = True) -> "torch.Tensor":
        """Normalised (cx, cy, w, h) [Q, 4] → pixel (x0, y0, x1, y1), clipped to the image
        unless `clip` is False."""
        import torch

        cx, cy, w, h = cxcywh.unbind(-1)
        boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                             (cx + w / 2) * width, (cy + h / 2) * height], dim=-1)
        if not clip:
            return boxes
        limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
        return torch.minimum(boxes.clamp(min=0), limits)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model + processor so `path=folder` loads them back."""
        self.model.save_pretrained(str(folder))
        self.processor.save_pretrained(str(folder))


def _grounding_dino(device="cpu", *, path: str | None = None, tiny: bool = False, config: dict | None = None,
                    words: Sequence[str] = (), seed: int = 0, threshold: float = 0.35,
                    nms_iou: float | None = 0.5, max_detections: int | None = None,
                    dtype: str = "float32") -> GroundingDinoLocalizer:
    """`path`: hub id (IDEA-Research/grounding-dino-tiny) or local folder holding model and
    processor. `tiny`/`config`: random-init test model; `words` join its vocabulary."""
    if path is not None:
        if tiny or config:
            raise UserError("grounding-dino: give either path or tiny/config, not both")
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        local = Path(path).expanduser()
        source = str(local) if local.exists() else path
        try:
            model = GroundingDinoForObjectDetection.from_pretrained(source, dtype=_torch_dtype(dtype))
            processor = GroundingDinoProcessor.from_pretrained(source)
        except OSError as err:
            raise UserError(f"grounding-dino.path {path}: cannot load ({_first_line(err)})") from None
    elif tiny or config:
        model, processor = build_tiny_grounding_dino(seed=seed, words=words, config=config)
        model.to(_torch_dtype(dtype))
    else:
        raise UserError("grounding-dino: give path (a hub id such as IDEA-Research/grounding-dino-tiny "
                        "or a local folder), or tiny=true for a random-init test model")
    if not 0.0 <= threshold < 1.0:
        raise UserError(f"grounding-dino.threshold {threshold}: must be in [0, 1)")
    model.to(_resolve_device(device))
    return GroundingDinoLocalizer(model, processor, threshold=threshold, nms_iou=nms_iou,
                                  max_detections=max_detections)


# ToyWorld's localizer lives in a higher layer; it is named by path and imported on first use.
LOCALIZERS: Registry[Callable[..., Localizer]] = Registry("localizer", {
    "grounding-dino": _grounding_dino,
    "toyworld": "psr.toyworld.perception.localizer:toyworld_localizer",
})


def build_localizer(name: str, device="cpu", **options: Any) -> Localizer:
    """`LOCALIZERS[name](device, **options)` with a one-line error for a bad name."""
    return lookup(LOCALIZERS, name, "localizer")(device, **options)
