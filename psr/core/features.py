"""Image (and text) feature extractors behind one small interface.

Three kinds, one registry (`FEATURE_EXTRACTORS`):

* `dino`   — transformers `ViTModel` in DINO ViT-S/16 layout (`facebook/dino-vits16`); the
  image embedding is the class token of the last layer. Images are prepared exactly as
  PSR's evaluation does (REFERENCE §3/§5): shorter side to 256 px bicubic, center crop
  224, ImageNet mean/std.
* `dinov2` — transformers `Dinov2Model` (`facebook/dinov2-small`, …), same preparation.
* `clip`   — open_clip (`ViT-B-32` for CLIP-T/CLIP-I, `ViT-L-14`, …): image and text
  embeddings, open_clip's own evaluation transform.

Every factory takes `device` plus options and either loads real weights (`path`: a hub
id or a local folder; nothing is fetched unless the user names it) or builds a random-init
model from a config (`tiny=True`, or `config={...}` overrides) for tests.

All outputs are float32 on the CPU whatever the model's device and dtype: they are small,
and every consumer (rewards, filters, matchers) compares them with CPU-side numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

from psr.core.components import HoldsModel, resolve_device, torch_dtype
from psr.core.recipe import lookup
from psr.core.registry import Registry
from psr.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Sizes of the random-init test models. Image sizes stay at the real 224 so the
# preprocessing under test is the protocol's, only the widths and depths shrink.
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=224, patch_size=16)
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                   image_size=224, patch_size=14)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str

    def embed_images(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        """[N, D] float32, each row L2-normalised."""

    def embed_texts(self, texts: Sequence[str]) -> "torch.Tensor":
        """[N, D] float32, each row L2-normalised (CLIP only)."""

    def patch_features(self, image: "Image.Image") -> "torch.Tensor":
        """[h, w, D] float32 patch grid over the WHOLE image, each patch L2-normalised."""


# ---------------------------------------------------------------------------- preprocessing
def psr_preprocess(image: "Image.Image", resize: int = 256, crop: int = 224,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> "torch.Tensor":
    """PSR's / DINO's evaluation transform: [3, crop, crop] float32.

    Shorter side → `resize` px (bicubic, longer side truncated as torchvision does),
    center crop `crop`, to RGB, scale to [0, 1], subtract `mean`, divide by `std` per
    channel. The RGB conversion comes after the crop, in PSRBench's order: the same for an
    RGB image, and for an RGBA one the resize (premultiplied alpha in Pillow) sees the alpha.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    image = TF.resize(image, resize, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, crop).convert("RGB")
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def whole_image_size(width: int, height: int, longest: int, multiple: int) -> tuple[int, int]:
    """(width, height) for patch features: longer side `longest`, aspect kept, each side
    rounded to a multiple of the patch size (at least one patch)."""
    scale = longest / max(width, height)
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def patch_preprocess(image: "Image.Image", longest: int, patch: int,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> "torch.Tensor":
    """The whole image (no crop, so patch (r, c) covers rows r·H/h…(r+1)·H/h and columns
    c·W/w…(c+1)·W/w of the original) resized bicubic: [3, h·patch, w·patch] float32."""
    import torchvision.transforms.functional as TF
    from PIL import Image as PILImage

    image = image.convert("RGB")
    size = whole_image_size(image.width, image.height, longest, patch)
    image = image.resize(size, PILImage.Resampling.BICUBIC)
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def _normalize(x: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    return F.normalize(x.float(), dim=-1).cpu()


def _resolve_device(device) -> "torch.device":
    import torch

    if isinstance(device, torch.device):
        return device

    return resolve_device(str(device))


def _torch_dtype(name: str):
    try:
        return torch_dtype(name)
    except KeyError:
        raise UserError(f"dtype {name!r}: choose float32, bfloat16 or float16") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


# ---------------------------------------------------------------------------- DINO / DINOv2
class ViTFeatures(HoldsModel):
    """A DINO-family ViT (transformers `ViTModel` or `Dinov2Model`): class token for image
    embeddings, last-layer patch tokens for correspondences."""

    def __init__(self, name: str, model, *, patch_size: int, resize: int = 256, crop: int = 224,
                 patch_image_size: int = 224, batch_size: int = 32, interpolate_flag: bool = False):
        self.name = name
        # ViTModel only resizes its position table when asked (Dinov2Model always does);
        # patch grids of other sizes and aspect ratios need it.
        self.interpolate_flag = interpolate_flag
        self.model = model.eval()
        self.patch_size = patch_size
        self.resize = resize
        self.crop = crop
        self.patch_image_size = patch_image_size
        self.batch_size = batch_size

    def _forward(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """[B, 3, H, W] → last hidden state [B, 1 + (H/p)(W/p), D] (post layer norm)."""
        pixels = pixels.to(self.device, self.dtype)
        if self.interpolate_flag:
            return self.model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        return self.model(pixel_values=pixels).last_hidden_state

    def embed_images(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        """[N, D]: the class token of each image after `psr_preprocess`, L2-normalised."""
        import torch

        if not images:
            return torch.zeros(0, self.model.config.hidden_size)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([psr_preprocess(im, self.resize, self.crop)
                                     for im in images[start:start + self.batch_size]])
                out.append(self._forward(batch)[:, 0])
        return _normalize(torch.cat(out))

    def embed_texts(self, texts: Sequence[str]) -> "torch.Tensor":
        raise NotImplementedError(f"{self.name} has no text tower; use the 'clip' extractor for text embeddings")

    def patch_features(self, image: "Image.Image") -> "torch.Tensor":
        """[h, w, D]: last-layer patch tokens of the whole image (see `patch_preprocess`;
        the longer side becomes `patch_image_size` px), each L2-normalised."""
        import torch

        pixels = patch_preprocess(image, self.patch_image_size, self.patch_size)
        h, w = pixels.shape[1] // self.patch_size, pixels.shape[2] // self.patch_size
        with torch.no_grad():
            tokens = self._forward(pixels[None])[0, 1:]
        # DINOv2 checkpoints with register tokens put them between the class and patch tokens.
        tokens = tokens[tokens.shape[0] - h * w:]
        return _normalize(tokens.reshape(h, w, -1))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a transformers folder that `path=folder` loads back."""
        self.model.save_pretrained(str(folder))


def _load_vit(kind: str, device, path, tiny, config, dtype, seed):
    """The model for `dino` (ViTModel) or `dinov2` (Dinov2Model), from `path` or a config."""
    import torch

    if kind == "dino":
        from transformers import ViTConfig as Config
        from transformers import ViTModel as Model

        tiny_sizes, example = TINY_VIT, "facebook/dino-vits16"
        # DINO checkpoints carry no pooler; the class token after the final norm is the embedding.
        extra = {"add_pooling_layer": False}
    else:
        from transformers import Dinov2Config as Config
        from transformers import Dinov2Model as Model

        tiny_sizes, example = TINY_DINOV2, "facebook/dinov2-small"
        extra = {}
    dt = _torch_dtype(dtype)
    if path is not None:
        if tiny or config:
            raise UserError(f"{kind}: give either path or tiny/config, not both")
        try:
            model = Model.from_pretrained(str(Path(path).expanduser()) if Path(path).expanduser().exists() else path,
                                          dtype=dt, **extra)
        except OSError as err:
            raise UserError(f"{kind}.path {path}: cannot load a {Model.__name__} ({_first_line(err)})") from None
    elif tiny or config:
        settings = dict(tiny_sizes) if tiny else {}
        settings.update(config or {})
        cpu_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = Model(Config(**settings), **extra)
        finally:
            torch.random.set_rng_state(cpu_state)
        model.to(dt)
    else:
        raise UserError(f"{kind}: give path (a hub id such as {example} or a local folder), "
                        "or tiny=true for a random-init test model")
    return model.to(_resolve_device(device)).eval()


def _dino(device="cpu", *, path: str | None = None, tiny: bool = False, config: dict | None = None,
          dtype: str = "float32", seed: int = 0, resize: int = 256, crop: int = 224,
          patch_image_size: int = 224, batch_size: int = 32) -> ViTFeatures:
    model = _load_vit("dino", device, path, tiny, config, dtype, seed)
    return ViTFeatures("dino", model, patch_size=model.config.patch_size, resize=resize, crop=crop,
                       patch_image_size=patch_image_size, batch_size=batch_size, interpolate_flag=True)


def _dinov2(device="cpu", *, path: str | None = None, tiny: bool = False, config: dict | None = None,
            dtype: str = "float32", seed: int = 0, resize: int = 256, crop: int = 224,
            patch_image_size: int = 224, batch_size: int = 32) -> ViTFeatures:
    model = _load_vit("dinov2", device, path, tiny, config, dtype, seed)
    return ViTFeatures("dinov2", model, patch_size=model.config.patch_size, resize=resize, crop=crop,
                       patch_image_size=patch_image_size, batch_size=batch_size)


# ---------------------------------------------------------------------------- CLIP
class ClipFeatures(HoldsModel):
    """An open_clip model: image and text embeddings in one space."""

    name = "clip"

    def __init__(self, model, preprocess: Callable, tokenizer: Callable, *, model_cfg: dict | None = None,
                 preprocess_cfg: dict | None = None, batch_size: int = 32):
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.batch_size = batch_size

    def embed_images(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        """[N, D]: `encode_image` after open_clip's eval transform, L2-normalised."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([self.preprocess(im.convert("RGB"))
                                     for im in images[start:start + self.batch_size]])
                out.append(self.model.encode_image(batch.to(self.device, self.dtype)))
        return _normalize(torch.cat(out)) if out else torch.zeros(0, self.model.text_projection.shape[-1])

    def embed_texts(self, texts: Sequence[str]) -> "torch.Tensor":
        """[N, D]: `encode_text` of each text (open_clip tokenizer, truncated to its context), L2-normalised."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start:start + self.batch_size]))
                out.append(self.model.encode_text(tokens.to(self.device)))
        return _normalize(torch.cat(out)) if out else torch.zeros(0, self.model.text_projection.shape[-1])

    def patch_features(self, image: "Image.Image") -> "torch.Tensor":
        raise NotImplementedError("clip patch tokens are not trained for correspondence; use 'dino' or 'dinov2'")

    def save_pretrained(self, folder: str | Path) -> None:
        """Write open_clip's local-dir layout (open_clip_config.json + open_clip_model.safetensors)."""
        from safetensors.torch import save_file

        if self.model_cfg is None:
            raise UserError("clip: this model's config is unknown, so it cannot be saved as a folder")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg or {}}, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))


def _clip(device="cpu", *, arch: str = "ViT-B-32", path: str | None = None, tiny: bool = False,
          config: dict | None = None, dtype: str = "float32", seed: int = 0, batch_size: int = 32) -> ClipFeatures:
    """`arch`: an open_clip architecture (ViT-B-32, ViT-L-14, …) or 'hf-hub:org/repo'.
    `path`: a checkpoint file, an open_clip pretrained tag (e.g. 'openai'), or a folder in
    open_clip's local-dir layout (what `save_pretrained` writes)."""
    import copy
    from dataclasses import asdict

    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    dev = _resolve_device(device)
    dt = _torch_dtype(dtype)
    if tiny or config:
        if path is not None:
            raise UserError("clip: give either path or tiny/config, not both")
        model_cfg = copy.deepcopy(TINY_CLIP) if tiny else copy.deepcopy(open_clip.get_model_config(arch) or {})
        for key, value in (config or {}).items():
            if isinstance(value, dict):
                model_cfg.setdefault(key, {}).update(value)
            else:
                model_cfg[key] = value
        cpu_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = open_clip.CLIP(**copy.deepcopy(model_cfg))
        finally:
            torch.random.set_rng_state(cpu_state)
        # open_clip's defaults (OpenAI mean/std, bicubic, shortest-side resize), as
        # `create_model` would set them, so a saved folder loads back with the same transform.
        preprocess_cfg = asdict(PreprocessCfg(size=model_cfg["vision_cfg"]["image_size"]))
        preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
        return ClipFeatures(model.to(dev, dt), preprocess, tokenizer, model_cfg=model_cfg,
                            preprocess_cfg=preprocess_cfg, batch_size=batch_size)
    if path is None and not arch.startswith("hf-hub:"):
        raise UserError(f"clip: give path (a checkpoint file, a pretrained tag such as 'openai', or an "
                        f"open_clip folder) for {arch}, or tiny=true for a random-init test model")
    local = Path(path).expanduser() if path is not None else None
    if local is not None and local.is_dir():
        model_name, pretrained = f"local-dir:{local}", None
    else:
        model_name, pretrained = arch, (str(local) if local is not None and local.is_file() else path)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"clip {arch} path {path}: cannot load ({_first_line(err)})") from None
    if model_name.startswith("local-dir:"):
        model_cfg = json.loads((local / "open_clip_config.json").read_text())["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(model_name)
    return ClipFeatures(model.to(dev, dt), preprocess, tokenizer, model_cfg=model_cfg,
                        preprocess_cfg=dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
                        batch_size=batch_size)


# ---------------------------------------------------------------------------- registry
# ToyWorld's encoder lives in a higher layer; it is named by path and imported on first use.
FEATURE_EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("feature extractor", {
    "dino": _dino,
    "dinov2": _dinov2,
    "clip": _clip,
    "toyworld": "psr.toyworld.perception.identity:toyworld_extractor",
})


def build_feature_extractor(name: str, device="cpu", **options: Any) -> FeatureExtractor:
    """`FEATURE_EXTRACTORS[name](device, **options)` with a one-line error for a bad name."""
    return lookup(FEATURE_EXTRACTORS, name, "feature extractor")(device, **options)


def as_feature_extractor(spec: "FeatureExtractor | dict", device="cpu") -> FeatureExtractor:
    """A built extractor as is, or `{"name": ..., **options}` built with `build_feature_extractor`."""
    if isinstance(spec, dict):
        options = dict(spec)
        if "name" not in options:
            raise UserError(f"feature extractor options {sorted(options)}: missing 'name' "
                            f"(one of {', '.join(FEATURE_EXTRACTORS)})")
        return build_feature_extractor(options.pop("name"), device, **options)
    return spec
