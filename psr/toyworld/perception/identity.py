"""The ToyWorld identity encoder as a `FeatureExtractor` (`FEATURE_EXTRACTORS["toyworld"]`).

`embed_images` takes subject crops of any size: each is resampled to the net's square
input (`crop` px, 32 by default) with the same `roi_align` sampling used in training
(bilinear, several samples per output pixel when shrinking), so the aspect ratio is not
kept. Crops are expected to hold one subject with a little margin (`crop_box(image, box,
pad=0.1)` of a detection is what the measurements below use).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from psr.core.components import HoldsModel
from psr.core.features import whole_image_size
from psr.errors import UserError
from psr.toyworld.perception import IDENTITY_ASSETS
from psr.toyworld.perception.weights import load_folder, save_folder

if TYPE_CHECKING:
    import torch
    from PIL import Image


def crops_to_tensor(images: Sequence["Image.Image"], size: int) -> "torch.Tensor":
    """PIL crops of any sizes → [N, 3, size, size] float in [0, 1], each resampled whole."""
    import numpy as np
    import torch
    from torchvision.ops import roi_align

    out = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        h, w = pixels.shape[1:]
        box = torch.tensor([[0.0, 0.0, 0.0, float(w), float(h)]])
        out.append(roi_align(pixels[None], box, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                             aligned=True))
    return torch.cat(out) if out else torch.zeros(0, 3, size, size)


class ToyIdentityEncoder(HoldsModel):
    """Identity embeddings of ToyWorld subject crops; see the module docstring."""

    name = "toyworld"

    def __init__(self, model, meta: dict | None = None, *, batch_size: int = 256, patch_image_size: int = 64):
        self.model = model.eval()
        self.meta = meta or {}
        self.batch_size = batch_size
        self.patch_image_size = patch_image_size

    @property
    def dim(self) -> int:
        return self.model.embed.out_features

    def embed_tensor(self, crops: "torch.Tensor") -> "torch.Tensor":
        """[N, 3, S, S] in [0, 1] (S = the net's crop size) → [N, D] L2-normalised float32 CPU."""
        import torch
        import torch.nn.functional as F

        out = []
        with torch.no_grad():
            for start in range(0, len(crops), self.batch_size):
                emb, _ = self.model(crops[start:start + self.batch_size].to(self.device, self.dtype))
                out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def embed_images(self, images: Sequence["Image.Image"]) -> "torch.Tensor":
        """[N, D]: one L2-normalised identity embedding per crop."""
        return self.embed_tensor(crops_to_tensor(images, self.model.crop))

    def embed_texts(self, texts: Sequence[str]) -> "torch.Tensor":
        raise UserError("toyworld identity encoder has no text tower; use the 'clip' extractor for text embeddings")

    def patch_features(self, image: "Image.Image") -> "torch.Tensor":
        """[h, w, C]: the last conv feature map (stride 8) over the whole image resized so its
        longer side is `patch_image_size` px (aspect kept, sides multiples of 8), each
        position L2-normalised."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image as PILImage

        image = image.convert("RGB")
        size = whole_image_size(image.width, image.height, self.patch_image_size, 8)
        pixels = np.asarray(image.resize(size, PILImage.Resampling.BILINEAR), dtype=np.float32) / 255
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(self.device, self.dtype)
        with torch.no_grad():
            feats = self.model.features(x)[0].permute(1, 2, 0)
        return F.normalize(feats.float(), dim=-1).cpu()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a folder that `path=folder` loads back."""
        save_folder(folder, "identity", self.model, self.meta.get("config", {}), self.meta.get("labels", {}))


def toyworld_extractor(device="cpu", *, path: str | None = None, batch_size: int = 256,
                       patch_image_size: int = 64) -> ToyIdentityEncoder:
    """`path`: a weights folder; None loads the shipped psr/assets/toyworld/identity/."""
    model, meta = load_folder(IDENTITY_ASSETS if path is None else path, "identity", device)
    return ToyIdentityEncoder(model, meta, batch_size=batch_size, patch_image_size=patch_image_size)
