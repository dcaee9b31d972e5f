"""protocol = "psrbench": PSRBench's scripts, point by point, on hand-computed cases
(psr.eval.psrbench; docs/eval.md, "How psr differs from PSRBench's scripts")."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from psr.core.detect import GroundingDinoLocalizer, build_tiny_grounding_dino, crop_box
from psr.eval import psrbench
from psr.eval.cache import DiskCache
from psr.eval.perception import Perception, Picture, open_picture
from psr.rewards.position import position_psrbench


# ---------------------------------------------------------------------------- crop
def _ramp(width=10, height=10) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
    y = np.arange(height, dtype=np.uint8)[:, None, None].repeat(width, 1)
    return Image.fromarray(np.concatenate([x[..., :2], y], axis=2).astype(np.uint8))


def test_crop_truncates_every_coordinate_where_psr_floors_and_ceils():
    image = _ramp()
    piece = psrbench.crop(image, (1.7, 2.9, 5.2, 6.99))      # int(): x 1..5, y 2..6
    assert piece.size == (4, 4)
    pixels = np.asarray(piece)
    assert pixels[0, 0].tolist() == [1, 1, 2] and pixels[-1, -1].tolist() == [4, 4, 5]
    assert crop_box(image, (1.7, 2.9, 5.2, 6.99)).size == (5, 5)  # protocol "psr": floor start, ceil end


def test_crop_follows_numpy_slicing_past_the_edges():
    image = _ramp(64, 10)
    # A negative start counts from the far edge: [-3:64] is the last three columns.
    assert np.asarray(psrbench.crop(image, (-3.7, 0, 64, 10)))[0, :, 0].tolist() == [61, 62, 63]
    assert psrbench.crop(image, (-3.7, 0, 60, 10)) is None                     # [-3:60] is empty
    assert psrbench.crop(image, (-0.9, -0.5, 70.0, 12.0)).size == (64, 10)    # int(-0.9) = 0; ends clamp
    assert psrbench.crop(image, (5.0, 5.0, 5.9, 9.0)) is None                 # int(5.9) = 5: width 0
    assert psrbench.crop(image, None) is None


# ---------------------------------------------------------------------------- box choice
@pytest.mark.parametrize("categories, expected", [
    (["cat", "dog"], [0, 0]),
    (["cat", "cat"], [0, 1]),               # the 2-subject script's same-category rule
    (["cat", "cat", "dog"], [0, 0, 0]),     # the 3- and 4-subject scripts: box 0 for everyone
    (["cat", "dog", "cat", "owl"], [0, 0, 0, 0]),
    (["cat"], [0]),
])
def test_box_indices(categories, expected):
    assert psrbench.box_indices(categories) == expected


def test_subject_boxes_take_the_detectors_order_and_none_when_too_few():
    found = {"cat": [{"box": [5, 5, 9, 9], "score": 0.4}, {"box": [0, 0, 4, 4], "score": 0.9}], "dog": []}
    assert psrbench.subject_boxes(["cat", "dog"], found) == [[5, 5, 9, 9], None]
    assert psrbench.subject_boxes(["cat", "cat"], found) == [[5, 5, 9, 9], [0, 0, 4, 4]]
    assert psrbench.subject_boxes(["cat", "cat", "cat"], found) == [[5, 5, 9, 9]] * 3


# ---------------------------------------------------------------------------- position
def test_relation_is_the_first_phrase_of_the_list_found_in_the_instruction():
    assert psrbench.relation_from_instruction("a cat to the left of a dog") == "to the left of"
    # List order, not order in the text: "above" comes before "under" in the list.
    assert psrbench.relation_from_instruction("a cat under a table, above the floor") == "above"
    assert psrbench.relation_from_instruction("a cat next to a dog") is None          # not in the list
    assert psrbench.relation_from_instruction("A cat Above a dog") is None           # case-sensitive


def test_relation_on_top_of_is_found_when_above_is_absent():
    assert psrbench.relation_from_instruction("the cup on top of the book") == "on top of"


# Boxes as (x_min, y_min, x_max, y_max); subject 1's box first.
LEFT, RIGHT = (0, 40, 20, 60), (50, 40, 70, 60)
HIGH_RIGHT = (25, 0, 35, 10)        # dx = 10, dy = -45 from LEFT: mostly above, a bit right


@pytest.mark.parametrize("locality, a, b, expected", [
    ("to the left of", LEFT, RIGHT, 1.0),
    ("on the left of", LEFT, RIGHT, 1.0),
    ("to the right of", LEFT, RIGHT, 0.0),
    ("to the right of", RIGHT, LEFT, 1.0),
    ("to the left of", LEFT, HIGH_RIGHT, 0.0),    # right direction but |dx| <= |dy|: 0 (psr's variant: 1)
    ("below", LEFT, HIGH_RIGHT, 1.0),             # above/below need the direction only
    ("under", LEFT, HIGH_RIGHT, 1.0),
    ("above", HIGH_RIGHT, LEFT, 1.0),
    ("on top of", HIGH_RIGHT, LEFT, 1.0),
    ("above", LEFT, HIGH_RIGHT, 0.0),
    ("to the left of", (0, 0, 20, 20), (10, 0, 30, 20), 0.1 / (200 / 600)),   # IoU 1/3: 0.1 / IoU
    ("to the left of", LEFT, LEFT, 0.0),          # one box for both subjects (same category): dx = 0
    ("above", LEFT, LEFT, 0.0),
    ("beside", LEFT, RIGHT, 0.0),                 # a locality the function does not know
    ("to the left of", LEFT, None, 0.0),          # a missing box: the script's except
    ("to the left of", (5, 5, 5, 9), (5, 5, 5, 9), 0.0),   # union 0: ZeroDivisionError → 0
    (None, LEFT, RIGHT, 0.0),
])
def test_position_score_known_answers(locality, a, b, expected):
    assert psrbench.position_score(locality, a, b) == pytest.approx(expected)


def test_position_score_truncates_box_coordinates():
    # As floats the centres are 9.7 and 10.4 (dx > 0: credit 0.1 / IoU); int() makes both
    # boxes (0, 0, 19, 10), so dx = 0 and the score is 0.
    assert psrbench.position_score("to the left of", (0.2, 0, 19.2, 10), (0.9, 0, 19.9, 10)) == 0.0
    assert psrbench.position_score("to the left of", (0.2, 0, 19.2, 10), (1.9, 0, 20.9, 10)) > 0.0


def test_next_to_rule_exists_but_the_phrase_list_never_reaches_it():
    assert psrbench.position_score("next to", (0, 0, 10, 10), (300, 0, 310, 10)) == 1.0   # |dy| = 0 < 150
    assert psrbench.position_score("near", (0, 0, 10, 10), (300, 300, 310, 310)) == pytest.approx(150 / 300)
    assert psrbench.position_score("on side of", (0, 0, 10, 10), (100, 400, 110, 410)) == 1.0  # |dx| < 150
    assert all(psrbench.relation_from_instruction(f"a cat {p} a dog") is None for p in ("next to", "near"))


def test_psr_variant_differs_where_the_issue_says():
    # Direction only for left/right in psr's rule; PSRBench's needs |dx| > |dy| too.
    assert position_psrbench("left of", LEFT, HIGH_RIGHT) == 1.0
    assert psrbench.position_score("to the left of", LEFT, HIGH_RIGHT) == 0.0


# ---------------------------------------------------------------------------- detector
@pytest.fixture(scope="module")
def tiny_detector():
    model, processor = build_tiny_grounding_dino(seed=3, words=["cat", "dog"])
    return GroundingDinoLocalizer(model, processor, threshold=0.0)


def test_detect_psrbench_keeps_query_order_scores_over_all_tokens_and_does_not_clip(tiny_detector):
    image = Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8))
    found = tiny_detector.detect_psrbench(image, "  Cat ")
    inputs = tiny_detector.processor(images=image, text="cat.", return_tensors="pt")
    with torch.no_grad():
        out = tiny_detector.model(**inputs)
    probs = out.logits[0].sigmoid()
    tokens = inputs["input_ids"].shape[1]     # [CLS] cat . [SEP]
    expected = probs[:, :tokens].max(dim=1).values
    assert len(found) == probs.shape[0]       # threshold 0: every query, none merged (no NMS)
    assert [d.score for d in found] == pytest.approx(expected.tolist(), abs=1e-6)   # query order, no sort
    assert all(d.label == "cat." for d in found)
    cx, cy, w, h = out.pred_boxes[0].unbind(-1)
    assert [d.box[0] for d in found] == pytest.approx(((cx - w / 2) * 96).tolist(), abs=1e-4)
    assert [d.box[3] for d in found] == pytest.approx(((cy + h / 2) * 80).tolist(), abs=1e-4)
    # The special tokens and the period count: the score is at least the category's own.
    own = probs[:, 1]
    assert all(d.score >= float(s) - 1e-6 for d, s in zip(found, own))


def test_detect_psrbench_threshold_is_strict(tiny_detector):
    image = Image.new("RGB", (64, 64), (120, 30, 200))
    every = tiny_detector.detect_psrbench(image, "dog")
    cut = sorted(d.score for d in every)[len(every) // 2]
    strict = GroundingDinoLocalizer(tiny_detector.model, tiny_detector.processor, threshold=cut)
    kept = strict.detect_psrbench(image, "dog")
    assert [d.score for d in kept] == [d.score for d in every if d.score > cut]


# ---------------------------------------------------------------------------- stored pixels
class _MeanColour:
    """A stand-in extractor: the image's mean RGB after PSR's preprocessing, normalised."""

    def embed_images(self, images):
        from psr.core.features import psr_preprocess

        rows = [psr_preprocess(im).mean(dim=(1, 2)) for im in images]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


class _NoBoxes:
    def detect(self, image, queries):
        return []


def _perception(tmp_path, localizer=None):
    from types import SimpleNamespace

    recipe = SimpleNamespace(extractor={"name": "dino"}, localizer={"name": "toyworld"},
                             clip_t=SimpleNamespace(options={}))
    perc = Perception(recipe, DiskCache(tmp_path / "cache"), "cpu")
    perc._components["extractor"] = _MeanColour()
    perc._components["localizer"] = localizer or _NoBoxes()
    return perc


def test_non_rgb_images_get_no_detection_and_embed_whole_as_stored(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255                       # top half opaque red, bottom half transparent red
    path = tmp_path / "ref.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pic = open_picture(path, "reference")
    assert pic.raw.mode == "RGBA" and pic.image.mode == "RGB"

    class Everywhere:
        def detect(self, image, queries):
            raise AssertionError("PSRBench's detector never runs on a non-RGB image")

    perc = _perception(tmp_path, Everywhere())
    assert perc.detect_psrbench(pic, "cat") == []
    # The whole stored image: alpha dropped after the resize (the scripts' order), so the
    # transparent half still reads red; psr's reader composites it onto white instead.
    whole = perc.embed_psrbench(pic, None)
    assert whole == pytest.approx(_MeanColour().embed_images([pic.raw])[0].numpy(), abs=1e-6)
    assert not np.allclose(whole, _MeanColour().embed_images([pic.image])[0].numpy(), atol=1e-3)


def test_exif_rotation_is_not_applied(tmp_path):
    image = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6                            # "rotate 90° clockwise to view"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    pic = open_picture(path)
    assert pic.raw.size == (20, 10) and pic.image.size == (10, 20)


def test_missing_detection_or_empty_crop_embeds_the_whole_image(tmp_path):
    array = np.zeros((40, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    path = tmp_path / "out.png"
    Image.fromarray(array).save(path)
    pic = open_picture(path)
    perc = _perception(tmp_path)
    whole = perc.embed_psrbench(pic, None)
    assert perc.embed_psrbench(pic, (30.2, 5, 30.9, 20)) == pytest.approx(whole)     # empty after int()
    left = perc.embed_psrbench(pic, (0, 0, 20, 40))
    assert left == pytest.approx(_MeanColour().embed_images([Image.new("RGB", (20, 40), (255, 0, 0))])[0].numpy(),
                                 abs=1e-6)
    assert not np.allclose(left, whole)
    assert math.isclose(float(np.linalg.norm(whole)), 1.0, rel_tol=1e-5)


def test_picture_raw_is_the_stored_file(tmp_path):
    path = tmp_path / "p.png"
    Image.new("L", (8, 6), 77).save(path)
    pic = Picture(path, "x", Image.new("RGB", (8, 6)))
    assert pic.raw.mode == "L" and pic.raw.getpixel((0, 0)) == 77
