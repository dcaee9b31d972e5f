"""The scoring components (extractor, localizer, CLIP, rewards) behind the disk cache.

Components are built on the first cache miss only, so a rerun whose answers are all
cached loads no weights at all (`built` lists what was loaded). Every value is stored as
JSON: detections as {"box": [x0, y0, x1, y1], "score", "label"}, embeddings as lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from psr.core.components import resolve_device
from psr.core.detect import build_localizer, crop_box
from psr.core.features import build_feature_extractor
from psr.core.images import load_image
from psr.errors import UserError
from psr.eval import psrbench
from psr.eval.cache import DiskCache, component_key, text_hash
from psr.eval.config import clip_options
from psr.rewards import REWARDS, RewardBatch

if TYPE_CHECKING:
    from PIL import Image

    from psr.eval.config import EvalRecipe


@dataclass
class Picture:
    """An image read from disk, with the SHA-256 of the file's bytes (the cache key)."""

    path: Path
    sha256: str
    image: "Image.Image"
    _raw: "Image.Image | None" = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def raw(self) -> "Image.Image":
        """The file's pixels as stored: no EXIF rotation, no mode conversion (what PSRBench's
        scripts see through `Image.open`)."""
        if self._raw is None:
            from PIL import Image

            with Image.open(self.path) as opened:
                opened.load()
                self._raw = opened.copy()
        return self._raw


class UnreadableImage(Exception):
    """An output or reference image that cannot be used; `reason` is one line."""

    def __init__(self, path: Path, reason: str):
        super().__init__(reason)
        self.path = path
        self.reason = reason


def open_picture(path: Path, what: str = "image") -> Picture:
    """Read `path` as RGB (psr's reader: EXIF, alpha onto white, 16-bit → 8-bit) or raise
    `UnreadableImage` with the reason."""
    try:
        image = load_image(path, what)
        data = Path(path).read_bytes()
    except UserError as err:
        raise UnreadableImage(Path(path), str(err)) from None
    except OSError as err:
        raise UnreadableImage(Path(path), f"{what} {path}: cannot read it ({err.strerror or err})") from None
    return Picture(Path(path), hashlib.sha256(data).hexdigest(), image)


def _jsonable(value: Any) -> Any:
    """Detections and analysis results (dataclasses, numpy, tuples) → plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):  # torch tensors
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__dict__"):
        return {k: _jsonable(v) for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


def _box_key(box: Sequence[float] | None) -> str:
    return "whole" if box is None else "box:" + ",".join(f"{float(v):.3f}" for v in box)


class Perception:
    """Cached detections, analyses, crop embeddings, CLIP embeddings and reward values."""

    def __init__(self, recipe: "EvalRecipe", cache: DiskCache, device: str = "auto"):
        self.recipe = recipe
        self.cache = cache
        self.device = device
        self.built: list[str] = []
        self._components: dict[str, Any] = {}
        self._reward_specs: dict[str, tuple[str, dict]] = {}
        ext, loc = dict(recipe.extractor), dict(recipe.localizer)
        self.extractor_key = component_key(ext.pop("name"), ext)
        self.localizer_key = component_key(loc.pop("name"), loc)
        self.clip_key = component_key("clip", dict(recipe.clip_t.options))

    # ------------------------------------------------------------------ components
    def _device(self) -> str:
        return str(resolve_device(self.device))

    def _component(self, kind: str):
        if kind not in self._components:
            if kind == "extractor":
                options = dict(self.recipe.extractor)
                made = build_feature_extractor(options.pop("name"), self._device(), **options)
            elif kind == "localizer":
                options = dict(self.recipe.localizer)
                made = build_localizer(options.pop("name"), self._device(), **options)
            elif kind == "clip":
                made = build_feature_extractor("clip", self._device(), **clip_options(self.recipe.clip_t.options))
            else:  # "reward:<name>:<options hash>"

                name, options = self._reward_specs[kind]
                made = REWARDS[name](self._device(), **options)
            self._components[kind] = made
            self.built.append(kind)
        return self._components[kind]

    # ------------------------------------------------------------------ localizer
    def detect(self, pic: Picture, query: str) -> list[dict]:
        """Detections of `query` in `pic`, best first: [{"box", "score", "label"}]."""
        def compute():
            found = self._component("localizer").detect(pic.image, [query])
            return [{"box": [float(v) for v in d.box], "score": float(d.score), "label": d.label} for d in found]

        return self.cache.get_or_compute(self.localizer_key, pic.sha256, "detect:" + query, compute)

    def analyze(self, pic: Picture) -> dict | None:
        """The localizer's whole-image analysis (ToyWorld: every subject with its attributes,
        and the scene) as JSON, or None when the localizer has no `analyze`."""
        def compute():
            localizer = self._component("localizer")
            if not hasattr(localizer, "analyze"):
                return None
            return _jsonable(localizer.analyze(pic.image))

        return self.cache.get_or_compute(self.localizer_key, pic.sha256, "analyze", compute)

    def detect_psrbench(self, pic: Picture, category: str) -> list[dict]:
        """The detections PSRBench's scripts get for `category` on the stored pixels, in their
        order (psr.eval.psrbench). A non-RGB image gets none: the scripts' detector
        transform fails on it and they use the whole image. A localizer without
        `detect_psrbench` (ToyWorld's) gives its own `detect` order."""
        raw = pic.raw
        if raw.mode != "RGB":
            return []

        def compute():
            localizer = self._component("localizer")
            if hasattr(localizer, "detect_psrbench"):
                found = localizer.detect_psrbench(raw, category)
            else:
                found = localizer.detect(raw, [category])
            return [{"box": [float(v) for v in d.box], "score": float(d.score), "label": d.label} for d in found]

        return self.cache.get_or_compute(self.localizer_key, pic.sha256, "psrbench-detect:" + category, compute)

    def embed_psrbench(self, pic: Picture, box: Sequence[float] | None) -> np.ndarray:
        """[D] embedding of PSRBench's crop of `box` from the stored pixels, or of the whole
        stored image when there is no box or the crop is empty (psr.eval.psrbench.crop)."""
        piece = psrbench.crop(pic.raw, box)
        key = "psrbench-whole" if piece is None else "psrbench-crop:" + ",".join(
            str(v) for v in psrbench.truncated_box(box))

        def compute():
            return [float(v) for v in self._component("extractor").embed_images(
                [pic.raw if piece is None else piece])[0].tolist()]

        return np.asarray(self.cache.get_or_compute(self.extractor_key, pic.sha256, key, compute), np.float32)

    # ------------------------------------------------------------------ extractor
    def embed(self, pic: Picture, boxes: Sequence[Sequence[float] | None]) -> np.ndarray:
        """[len(boxes), D] float32 L2-normalised embeddings of the crops (None: the whole
        image); one extractor call for all boxes not cached yet."""
        table = {}
        missing = []
        for box in boxes:
            key = _box_key(box)
            if key in table:
                continue
            found, table[key] = self.cache.lookup(self.extractor_key, pic.sha256, key)
            if not found:
                missing.append(box)
        if missing:
            crops = [pic.image if box is None else crop_box(pic.image, box) for box in missing]
            vectors = self._component("extractor").embed_images(crops)
            for box, vector in zip(missing, vectors):
                value = [float(v) for v in vector.tolist()]
                self.cache.put(self.extractor_key, pic.sha256, _box_key(box), value)
                table[_box_key(box)] = value
        if not boxes:
            return np.zeros((0, 0), np.float32)
        return np.asarray([table[_box_key(b)] for b in boxes], dtype=np.float32)

    # ------------------------------------------------------------------ CLIP
    def clip_t(self, pic: Picture, text: str) -> float:
        """Cosine between the CLIP embeddings of the image and the text."""
        def image():
            return [float(v) for v in self._component("clip").embed_images([pic.image])[0].tolist()]

        def words():
            return [float(v) for v in self._component("clip").embed_texts([text])[0].tolist()]

        a = np.asarray(self.cache.get_or_compute(self.clip_key, pic.sha256, "image", image), np.float64)
        b = np.asarray(self.cache.get_or_compute(self.clip_key, text_hash(text), "text", words), np.float64)
        return float(a @ b)

    # ------------------------------------------------------------------ rewards
    def reward(self, name: str, options: dict, pic: Picture, prompt: str, references: Sequence[Picture],
               categories: Sequence[str]) -> dict:
        """{"total": float, "terms": {name: float}} of REWARDS[name] on this one sample."""
        key = component_key("reward-" + name, options)
        self._reward_specs[key] = (name, dict(options))
        subkey = text_hash("\n".join([prompt, *[r.sha256 for r in references], *categories]))

        def compute():
            result = self._component(key)(RewardBatch(
                images=[pic.image], prompts=[prompt], references=[[r.image for r in references]],
                categories=[list(categories)]))
            return {"total": float(result.total[0]),
                    "terms": {k: float(v[0]) for k, v in result.terms.items()}}

        return self.cache.get_or_compute(key, pic.sha256, subkey, compute)
