"""Feature extractors: the PSR/DINO preprocessing, shapes and norms, save → load round trips.

Every model is random-init at tiny size (psr.core.features.TINY_*); nothing is downloaded.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from psr.core.features import (FEATURE_EXTRACTORS, IMAGENET_MEAN, IMAGENET_STD, as_feature_extractor,
                               build_feature_extractor, psr_preprocess, whole_image_size)
from psr.errors import UserError

KINDS = ("dino", "dinov2", "clip")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def extractors():
    torch.use_deterministic_algorithms(True)
    return {name: build_feature_extractor(name, "cpu", tiny=True) for name in KINDS}


def noise(width=64, height=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- preprocessing
def test_registry_lists_the_three_extractors():
    assert list(FEATURE_EXTRACTORS) == ["dino", "dinov2", "clip", "toyworld"]


def test_psr_preprocess_of_a_constant_image_is_the_imagenet_normalised_colour():
    colour = (255, 0, 128)
    out = psr_preprocess(Image.new("RGB", (300, 200), colour))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[c], torch.full((224, 224), expected), atol=1e-6)


def test_psr_preprocess_resizes_the_shorter_side_to_256_then_crops_the_centre():
    # 512 x 256, black left half: the shorter side is already 256, so the 224 crop spans
    # columns 144..367 — its first 112 columns are black, the rest white.
    array = np.full((256, 512, 3), 255, np.uint8)
    array[:, :256] = 0
    out = psr_preprocess(Image.fromarray(array))
    black = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    white = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.allclose(out[0, :, :100], torch.full((224, 100), black), atol=1e-5)
    assert torch.allclose(out[0, :, 124:], torch.full((224, 100), white), atol=1e-5)
    # A portrait image: shorter side (width) → 256, then the same 224 crop.
    assert psr_preprocess(noise(100, 300)).shape == (3, 224, 224)


@pytest.mark.parametrize("size, longest, multiple, expected", [
    ((64, 64), 224, 16, (224, 224)),
    ((128, 64), 224, 16, (224, 112)),
    ((64, 72), 224, 14, (196, 224)),
    ((1000, 10), 224, 14, (224, 14)),  # never below one patch
])
def test_whole_image_size(size, longest, multiple, expected):
    assert whole_image_size(*size, longest, multiple) == expected


# ---------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("name", KINDS)
def test_image_embeddings_are_unit_rows_and_identical_images_agree(extractors, name):
    fe = extractors[name]
    a, b = noise(seed=1), noise(80, 48, seed=2)
    emb = fe.embed_images([a, b, a.copy()])
    assert emb.shape == (3, 32) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(emb[0] @ emb[2]) == pytest.approx(1.0, abs=1e-5)
    assert float(emb[0] @ emb[1]) < 0.9999


@pytest.mark.parametrize("name", KINDS)
def test_batching_does_not_change_embeddings(extractors, name):
    fe = extractors[name]
    images = [noise(seed=s) for s in range(3)]
    together = fe.embed_images(images)
    fe.batch_size, saved = 1, fe.batch_size
    try:
        alone = fe.embed_images(images)
    finally:
        fe.batch_size = saved
    assert torch.allclose(together, alone, atol=1e-5)


def test_clip_text_embeddings_are_unit_rows(extractors):
    clip = extractors["clip"]
    emb = clip.embed_texts(["a photo of a cat", "a dog", "a photo of a cat"])
    assert emb.shape == (3, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(emb[0] @ emb[2]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_only_clip_embeds_text(extractors, name):
    with pytest.raises(NotImplementedError, match="clip"):
        extractors[name].embed_texts(["a cat"])


def test_clip_has_no_patch_features(extractors):
    with pytest.raises(NotImplementedError, match="dino"):
        extractors["clip"].patch_features(noise())


@pytest.mark.parametrize("name, size, grid", [
    ("dino", (64, 64), (14, 14)),  # patch 16 at 224
    ("dino", (128, 64), (7, 14)),  # aspect kept: 224 x 112
    ("dinov2", (64, 64), (16, 16)),  # patch 14 at 224
])
def test_patch_features_cover_the_whole_image_with_unit_patches(extractors, name, size, grid):
    feats = extractors[name].patch_features(noise(*size))
    assert feats.shape == (*grid, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(grid), atol=1e-5)


def test_reduced_precision_models_still_return_float32_unit_rows():
    fe = build_feature_extractor("dino", "cpu", tiny=True, dtype="bfloat16")
    emb = fe.embed_images([noise()])
    assert emb.dtype == torch.float32
    assert float(emb.norm()) == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", KINDS)
def test_save_then_load_from_the_folder_gives_identical_features(extractors, name, tmp_path):
    fe = extractors[name]
    fe.save_pretrained(tmp_path)
    loaded = build_feature_extractor(name, "cpu", path=str(tmp_path))
    images = [noise(seed=3), noise(96, 64, seed=4)]
    assert torch.equal(loaded.embed_images(images), fe.embed_images(images))
    if name == "clip":
        assert torch.equal(loaded.embed_texts(["a red cube"]), fe.embed_texts(["a red cube"]))
    else:
        assert torch.equal(loaded.patch_features(images[1]), fe.patch_features(images[1]))


def test_explicit_config_overrides_build_other_sizes():
    fe = build_feature_extractor("dino", "cpu", config={"hidden_size": 16, "num_hidden_layers": 1,
                                                         "num_attention_heads": 2, "intermediate_size": 32})
    assert fe.embed_images([noise()]).shape == (1, 16)


def test_seed_fixes_the_random_init():
    a = build_feature_extractor("dinov2", "cpu", tiny=True, seed=7).embed_images([noise()])
    b = build_feature_extractor("dinov2", "cpu", tiny=True, seed=7).embed_images([noise()])
    c = build_feature_extractor("dinov2", "cpu", tiny=True, seed=8).embed_images([noise()])
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name, options, message", [
    ("dino", {}, "give path"),
    ("clip", {}, "give path"),
    ("dinov2", {"path": "/no/such/folder"}, "cannot load"),
    ("dion", {"tiny": True}, "did you mean 'dino'"),
    ("dino", {"tiny": True, "dtype": "float8"}, "dtype"),
])
def test_bad_options_are_one_line_user_errors(name, options, message):
    with pytest.raises(UserError, match=message):
        build_feature_extractor(name, "cpu", **options)


def test_as_feature_extractor_builds_specs_and_passes_instances_through(extractors):
    assert as_feature_extractor(extractors["dino"]) is extractors["dino"]
    assert as_feature_extractor({"name": "dinov2", "tiny": True}).name == "dinov2"
    with pytest.raises(UserError, match="missing 'name'"):
        as_feature_extractor({"tiny": True})
