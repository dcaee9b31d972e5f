"""Rewards: known-answer tables for the matching and penalty rules, the position rules,
the mix and its validation, and failures that are recorded instead of skipped.

Most tests isolate the math with two deterministic doubles: `MeanColour` embeds a crop
as its mean colour (centred on grey, L2-normalised), so two crops of one solid colour
have cosine exactly 1; `Blobs` finds solid-colour squares and names them by a colour →
category table. The real tiny (random-init) DINO and CLIP run end to end at the end.
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from psr.core.detect import LOCALIZERS, Detection
from psr.errors import RecipeError, UserError
from psr.rewards import (POSITION_RULES, RELATION_PHRASES, REWARDS, ComponentCache, RewardBatch, RewardSpec,
                         alignment_reward, build_rewards, canonical_relation, check_reward_specs, hungarian_match,
                         leakage_margins, margins_by_subset, position_correct, position_psrbench,
                         reward_specs_from_toml, sample_margin)

pytestmark = pytest.mark.usefixtures("one_thread")

GREY = (128, 128, 128)
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
CATEGORY = {"red": "cat", "blue": "cat", "green": "dog", "yellow": "dog"}


# ---------------------------------------------------------------------------- test doubles
class MeanColour:
    """Extractor double: mean RGB of the image minus grey, L2-normalised."""

    name = "mean-colour"

    def __init__(self, fail_below: int = 0):
        self.fail_below = fail_below  # raise ValueError for images narrower than this
        self.calls = 0

    def embed_images(self, images):
        self.calls += 1
        rows = []
        for im in images:
            if im.width < self.fail_below:
                raise ValueError(f"image {im.width}px wide is too small")
            rows.append(np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3).mean(0) - 128.0)
        return torch.nn.functional.normalize(torch.tensor(np.stack(rows), dtype=torch.float32), dim=-1)

    def embed_texts(self, texts):
        raise NotImplementedError


def colour_cos(a: str, b: str) -> float:
    va, vb = np.array(COLOURS[a]) - 128.0, np.array(COLOURS[b]) - 128.0
    return float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))


class Blobs:
    """Localizer double: every solid square of a known colour, labelled by CATEGORY;
    scores fall from left to right, so 'the first box' is the leftmost. `extra` boxes are
    added in generated images (96 px), `fail_on_size` makes it raise on images that wide."""

    def __init__(self, fail_on_size: int | None = None, extra: list[Detection] | None = None):
        self.fail_on_size = fail_on_size
        self.extra = extra or []
        self.calls = 0

    def detect(self, image, queries):
        from scipy import ndimage

        self.calls += 1
        if self.fail_on_size is not None and image.width == self.fail_on_size:
            raise RuntimeError("detector exploded")
        array = np.asarray(image.convert("RGB"))
        boxes = []
        for colour, rgb in COLOURS.items():
            if CATEGORY[colour] not in queries:
                continue
            labels, _ = ndimage.label((array == rgb).all(-1))
            for rows, cols in ndimage.find_objects(labels):
                boxes.append(((cols.start, rows.start, cols.stop, rows.stop), CATEGORY[colour]))
        boxes.sort(key=lambda b: (b[0][0], b[0][1]))
        found = [Detection(tuple(float(v) for v in box), 0.9 - 0.05 * k, label) for k, (box, label) in enumerate(boxes)]
        if image.width == 96:
            found += [d for d in self.extra if d.label in queries]
        return sorted(found, key=lambda d: -d.score)


def scene(*blobs, size=96):
    """A grey image with solid squares: blobs are (colour, x, y) of 20-px squares."""
    array = np.full((size, size, 3), GREY, np.uint8)
    for colour, x, y in blobs:
        array[y:y + 20, x:x + 20] = COLOURS[colour]
    return Image.fromarray(array)


def reference(colour, size=48):
    return scene((colour, 14, 14), size=size)


def batch_of(image, colours, prompt="two pets", boxes=None):
    return RewardBatch(images=[image], prompts=[prompt], references=[[reference(c) for c in colours]],
                       categories=[[CATEGORY[c] for c in colours]], reference_boxes=boxes)


def psr(**options):
    return REWARDS["psr"](extractor=options.pop("extractor", MeanColour()),
                          localizer=options.pop("localizer", Blobs()), **options)


def hungarian(**options):
    return REWARDS["hungarian"](extractor=options.pop("extractor", MeanColour()),
                                localizer=options.pop("localizer", Blobs()), **options)


# ---------------------------------------------------------------------------- matching
@pytest.mark.parametrize("similarity, allowed, rows, cols", [
    ([[0.1, 0.9], [0.8, 0.2]], None, [1, 0], [0, 1]),
    ([[0.9, 0.1], [0.2, 0.8], [0.85, 0.7]], None, [0, 1], [0, 1]),           # extra instance left over
    ([[0.9, 0.8], [0.85, 0.1]], None, [1, 0], [0, 1]),                       # 1.65 beats 1.0
    ([[0.9, 0.8], [0.85, 0.1]], [[True, False], [True, True]], [0, 1], [0, 1]),  # forbidden pair avoided
    ([[0.9, 0.8]], [[False, True]], [0], [1]),
    ([[0.5, 0.4]], [[False, False]], [], []),
    (np.zeros((0, 2)), None, [], []),
])
def test_hungarian_match_table(similarity, allowed, rows, cols):
    r, c = hungarian_match(np.array(similarity, float), None if allowed is None else np.array(allowed))
    assert r.tolist() == rows and c.tolist() == cols


def test_hungarian_match_prefers_more_allowed_pairs_over_a_higher_sum():
    # Pairing instance 0 with reference 0 (0.99) would leave reference 1 without an allowed instance.
    sim = np.array([[0.99, 0.2], [0.3, 0.0]])
    allowed = np.array([[True, True], [True, False]])
    r, c = hungarian_match(sim, allowed)
    assert r.tolist() == [1, 0] and c.tolist() == [0, 1]


@pytest.mark.parametrize("similarity, allowed, options, total, missing, duplicates", [
    ([[1.0, 0.2], [0.1, 0.8]], None, {}, 0.9, 0, 0),
    ([[1.0, 0.2]], None, {}, 0.5, 1, 0),                                       # missing → 0
    ([[1.0, 0.2]], None, {"missing_penalty": 0.5}, 0.25, 1, 0),                # missing → −0.5
    ([[1.0, 0.0], [0.0, 1.0], [0.9, 0.0]], None, {}, 0.75, 0, 1),             # duplicate: −0.25
    ([[1.0, 0.0], [0.0, 1.0], [0.9, 0.0]], None, {"duplicate_penalty": 0.4}, 0.6, 0, 1),
    ([[1.0, 0.0], [0.0, 1.0], [0.3, 0.1]], None, {}, 1.0, 0, 0),              # background box: below threshold
    ([[1.0, 0.0], [0.0, 1.0], [0.3, 0.1]], None, {"duplicate_threshold": 0.25}, 0.75, 0, 1),
    ([[1.0, 0.0], [0.9, 0.0]], [[True, False], [True, False]], {"missing_penalty": 1.0}, 0.0 - 0.25, 1, 1),
    (np.zeros((0, 3)), None, {"missing_penalty": 0.2}, -0.2, 3, 0),
])
def test_alignment_reward_table(similarity, allowed, options, total, missing, duplicates):
    result = alignment_reward(np.array(similarity, float), None if allowed is None else np.array(allowed), **options)
    assert result.total == pytest.approx(total)
    assert result.missing == missing and len(result.duplicates) == duplicates


# ---------------------------------------------------------------------------- leakage
@pytest.mark.parametrize("similarity, assignment, margins", [
    ([[0.9, 0.3], [0.4, 0.8]], ([0, 1], [0, 1]), [0.6, 0.4]),
    ([[0.9, 0.3], [0.4, 0.8]], ([1, 0], [0, 1]), [-0.4, -0.6]),               # a swap leaks both ways
    ([[0.9, 0.2, 0.7]], ([0], [0]), [0.2, math.nan, math.nan]),               # unmatched → NaN
    ([[0.9]], ([0], [0]), [math.nan]),                                        # one reference: undefined
    ([[0.9, math.nan, 0.5]], ([0], [0]), [0.4, math.nan, math.nan]),          # failed reference left out
])
def test_leakage_margins_table(similarity, assignment, margins):
    got = leakage_margins(np.array(similarity, float), assignment)
    np.testing.assert_allclose(got, margins, equal_nan=True)


def test_sample_margin_and_subset_aggregation():
    assert sample_margin([0.6, 0.4]) == pytest.approx(0.5)
    assert sample_margin([0.2, math.nan]) == pytest.approx(0.2)
    assert math.isnan(sample_margin([math.nan]))
    summary = margins_by_subset([0.5, 0.1, math.nan, 0.3], ["Three", "Three", "Four", "Four"])
    assert summary["Three"] == {"mean": pytest.approx(0.3), "samples": 2, "undefined": 0}
    assert summary["Four"] == {"mean": pytest.approx(0.3), "samples": 2, "undefined": 1}
    assert summary["all"]["mean"] == pytest.approx(0.3) and summary["all"]["samples"] == 4
    with pytest.raises(ValueError):
        margins_by_subset([0.1], ["Three", "Four"])


# ---------------------------------------------------------------------------- psr / hungarian
def test_identical_crops_score_one_and_details_are_json():
    image = scene(("red", 10, 10), ("green", 60, 60))
    for reward in (psr(), hungarian()):
        result = reward(batch_of(image, ["red", "green"]))
        assert result.total.tolist() == [pytest.approx(1.0)]
        json.dumps(result.details, allow_nan=False)
    result = hungarian()(batch_of(image, ["red", "green"]))
    assert result.terms["missing"].tolist() == [0] and result.terms["duplicates"].tolist() == [0]
    assert result.terms["leakage_margin"].item() == pytest.approx(1 - colour_cos("red", "green"))


def test_swapped_subjects_hungarian_and_match_recover_the_swap_where_order_does_not():
    # Layout: red cat left, blue cat right; references listed blue first.
    image = scene(("red", 10, 30), ("blue", 60, 30))
    batch = batch_of(image, ["blue", "red"])
    cross = colour_cos("red", "blue")
    assert cross < 0
    assert hungarian()(batch).total.item() == pytest.approx(1.0)
    matched = psr()(batch)
    assert matched.total.item() == pytest.approx(1.0)
    assert [s["box"][0] for s in matched.details[0]["subjects"]] == [60, 10]   # blue ↔ right box
    first_boxes = psr(assignment="order")(batch)   # PSRBench: subjects take boxes 0 and 1
    assert first_boxes.total.item() == pytest.approx(cross)


def test_a_missing_subject_costs_exactly_the_documented_amount():
    image = scene(("red", 10, 10))
    batch = batch_of(image, ["red", "green"])
    for penalty in (0.0, 0.5):
        result = hungarian(missing_penalty=penalty)(batch)
        assert result.total.item() == pytest.approx((1.0 - penalty) / 2)
        assert result.terms["missing"].item() == 1
        assert result.details[0]["references"][1]["failure"] == "no usable 'dog' instance"
    result = psr()(batch)
    assert result.total.item() == pytest.approx(0.5)           # R_dog = missing_value = 0
    assert result.details[0]["failures"] == 1 and result.terms["found"].item() == 0.5
    assert result.details[0]["subjects"][1]["failure"] == "no 'dog' detected"
    assert psr(missing_value=-1.0)(batch).total.item() == pytest.approx(0.0)


def test_a_duplicated_identity_is_penalized():
    image = scene(("red", 5, 5), ("red", 60, 5), ("green", 30, 60))
    batch = batch_of(image, ["red", "green"])
    result = hungarian()(batch)
    assert result.total.item() == pytest.approx(1.0 - 0.25)
    assert result.terms["duplicates"].item() == 1
    assert result.details[0]["duplicates"] == [{"instance": 1, "of_reference": 0}]
    assert hungarian(duplicate_penalty=0.0)(batch).total.item() == pytest.approx(1.0)
    # A second cat that looks like no reference (blue vs red: cosine < 0.5) is no duplicate.
    other = batch_of(scene(("red", 5, 5), ("blue", 60, 5), ("green", 30, 60)), ["red", "green"])
    assert hungarian()(other).total.item() == pytest.approx(1.0)


def test_same_category_rule_keeps_instances_with_their_own_category():
    # The only 'dog' box is yellow; the green dog reference must not take the red cat box.
    image = scene(("red", 5, 5), ("yellow", 60, 60))
    batch = batch_of(image, ["red", "green"])
    result = hungarian()(batch)
    assert result.details[0]["references"][1]["instance"] == 1
    assert result.total.item() == pytest.approx((1.0 + colour_cos("yellow", "green")) / 2)


def test_psr_candidates_top_uses_the_best_scoring_box_only():
    # One red cat reference; the image has blue (left, best score) and red (right) cats.
    image = scene(("blue", 5, 30), ("red", 60, 30))
    batch = batch_of(image, ["red"])
    assert psr()(batch).total.item() == pytest.approx(colour_cos("blue", "red"))   # PSR: top box
    assert psr(candidates="all")(batch).total.item() == pytest.approx(1.0)        # best of all boxes


@pytest.mark.parametrize("boxes, source, expected", [
    (None, "detected", 1.0),
    ([[(14, 14, 34, 34)]], "given", 1.0),
    ([[(0, 0, 10, 10)]], "given", 0.0),   # a grey corner: MeanColour gives it the zero vector
])
def test_reference_crop_sources(boxes, source, expected):
    result = psr()(batch_of(scene(("red", 10, 10)), ["red"], boxes=boxes))
    assert result.details[0]["subjects"][0]["reference"]["source"] == source
    assert result.total.item() == pytest.approx(expected)


def test_reference_without_detection_falls_back_to_the_whole_reference():
    plain = Image.new("RGB", (32, 32), COLOURS["red"])   # a 32-px red square fills it: Blobs finds it
    empty = RewardBatch([scene(("red", 10, 10))], ["p"], [[Image.new("RGB", (32, 32), (200, 40, 40))]], [["cat"]])
    result = psr()(empty)
    assert result.details[0]["subjects"][0]["reference"] == {"source": "whole", "box": [0.0, 0.0, 32.0, 32.0]}
    whole, red = np.array([200, 40, 40]) - 128.0, np.array(COLOURS["red"]) - 128.0
    assert result.total.item() == pytest.approx(whole @ red / np.linalg.norm(whole) / np.linalg.norm(red))
    batch = RewardBatch([scene(("red", 10, 10))], ["p"], [[plain]], [["cat"]])
    assert psr()(batch).total.item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------- failures
def test_a_detector_exception_is_recorded_and_penalized():
    batch = batch_of(scene(("red", 10, 10), size=96), ["red", "green"])
    result = psr(localizer=Blobs(fail_on_size=96))(batch)
    assert result.total.item() == 0.0
    assert [s["failure"] for s in result.details[0]["subjects"]] == ["detector: RuntimeError: detector exploded"] * 2
    result = hungarian(localizer=Blobs(fail_on_size=96), missing_penalty=1.0)(batch)
    assert result.total.item() == -1.0 and result.terms["missing"].item() == 2
    assert result.details[0]["references"][0]["failure"].startswith("detector: RuntimeError")
    # The same detector failing on the reference (48 px) only.
    result = psr(localizer=Blobs(fail_on_size=48))(batch)
    assert result.details[0]["subjects"][0]["failure"] == "reference detector: RuntimeError: detector exploded"


def test_an_uncroppable_box_and_a_failing_crop_embedding_are_recorded():
    bad = Detection((50.0, 50.0, 40.0, 60.0), 0.99, "cat")             # x1 < x0
    result = psr(localizer=Blobs(extra=[bad]))(batch_of(scene(("red", 10, 10)), ["red"]))
    assert result.total.item() == 0.0
    assert "crop: box" in result.details[0]["subjects"][0]["failure"]
    # A 4-px detection that the extractor rejects: only that crop fails, the other subject scores.
    tiny = Detection((80.0, 80.0, 84.0, 84.0), 0.99, "dog")
    result = psr(localizer=Blobs(extra=[tiny]), extractor=MeanColour(fail_below=8))(
        batch_of(scene(("red", 10, 10)), ["red", "green"]))
    assert result.total.item() == pytest.approx(0.5)
    assert result.details[0]["subjects"][1]["failure"].startswith("0 usable 'dog' boxes for 1 subjects (extractor: ValueError")


def test_out_of_memory_and_user_errors_propagate():
    class OutOfMemory(MeanColour):
        def embed_images(self, images):
            raise torch.OutOfMemoryError("CUDA out of memory")

    class Misconfigured(Blobs):
        def detect(self, image, queries):
            raise UserError("detector: too many queries")

    batch = batch_of(scene(("red", 10, 10)), ["red"])
    with pytest.raises(torch.OutOfMemoryError):
        psr(extractor=OutOfMemory())(batch)
    with pytest.raises(UserError, match="too many queries"):
        hungarian(localizer=Misconfigured())(batch)
    with pytest.raises(UserError, match="clip_t: the extractor cannot embed text"):
        REWARDS["clip_t"](extractor=MeanColour())(batch)   # a setup fault, not 0 for every sample


@pytest.mark.parametrize("make, message", [
    (lambda: RewardBatch([scene()], [], [[]], [[]]), "0 prompts for 1 images"),
    (lambda: RewardBatch([scene()], ["p"], [[reference("red")]], [[]]), "1 references but 0 categories"),
    (lambda: RewardBatch([scene()], ["p"], [[reference("red")]], [[""]]), "non-empty string"),
    (lambda: RewardBatch([scene()], ["p"], [[reference("red")]], [["cat"]], [[(1, 2, 3)]]), "not (x0, y0, x1, y1)"),
])
def test_bad_batches_fail_with_one_line(make, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_subject_rewards_need_references():
    batch = RewardBatch([scene()], ["p"], [[]], [[]])
    with pytest.raises(UserError, match="no references"):
        psr()(batch)


# ---------------------------------------------------------------------------- position
BOX_A = (100, 40, 120, 60)
POSITION_TABLE = [
    # relation, box_b, PSRBench score, exact rule; box_a = BOX_A, a 20-px square, image 300 x 200
    ("left of", (160, 40, 180, 60), 1.0, True),
    ("left of", (110, 40, 130, 60), 0.1 / (200 / 600), False),      # right direction, IoU 1/3
    ("left of", (60, 40, 80, 60), 0.0, False),
    ("left of", (122, 40, 142, 60), 1.0, True),                     # gap 2 px; centre offset 22 > 5
    ("left of", (103, 40, 123, 60), 0.1 / (340 / 460), False),      # overlapping
    ("left of", (104, 0, 124, 20), 1.0, False),                     # b is above, 4 px to the right
    ("right of", (40, 40, 60, 60), 1.0, True),
    ("right of", (160, 40, 180, 60), 0.0, False),
    ("above", (100, 80, 120, 100), 1.0, True),
    ("above", (100, 0, 120, 20), 0.0, False),
    ("below", (100, 0, 120, 20), 1.0, True),
    ("below", (170, 30, 190, 50), 1.0, False),                      # mostly beside: exact says left of
    ("next to", (125, 42, 145, 62), 1.0, True),                     # gap 5 <= 0.5 * 20
    ("next to", (100, 65, 120, 85), 1.0, True),                     # stacked, gap 5
    ("next to", (150, 40, 170, 60), 0.0, False),                    # gap 30 > 10
    ("next to", (125, 70, 145, 90), 1.0, False),                    # diagonal: no shared rows or columns
    ("next to", (105, 40, 125, 60), 0.1 / (300 / 500), False),      # overlapping
]


@pytest.mark.parametrize("relation, box_b, soft, exact", POSITION_TABLE)
def test_position_rules_table(relation, box_b, soft, exact):
    assert position_psrbench(relation, BOX_A, box_b) == pytest.approx(soft)
    assert position_correct(relation, BOX_A, box_b, (300, 200)) is exact
    assert POSITION_RULES["psrbench"](relation, BOX_A, box_b, (300, 200)) == pytest.approx(soft)
    assert POSITION_RULES["exact"](relation, BOX_A, box_b, (300, 200)) == float(exact)


def test_every_relation_has_a_table_row_and_phrases_map_to_canonical_relations():
    from psr.rewards.position import CANONICAL
    from psr.toyworld import RELATIONS

    assert CANONICAL == RELATIONS
    assert {row[0] for row in POSITION_TABLE} == set(RELATIONS)
    expected = {"on the left of": "left of", "left of": "left of", "to the left of": "left of",
                "right": "right of", "above": "above", "on top of": "above", "below": "below",
                "under": "below", "next to": "next to", "near": "next to", "beside": "next to",
                "  To the LEFT of ": "left of"}
    for phrase, canonical in expected.items():
        assert canonical_relation(phrase) == canonical
    assert set(RELATION_PHRASES.values()) == set(RELATIONS)
    for phrase in RELATION_PHRASES:
        assert position_psrbench(phrase, BOX_A, (160, 40, 180, 60)) in (0.0, 1.0)


def test_an_unknown_relation_phrase_is_an_error_not_a_vanishing_sample():
    with pytest.raises(UserError, match="unknown phrase.*did you mean 'next to'"):
        position_psrbench("nexto", BOX_A, BOX_A)
    with pytest.raises(UserError, match="behind"):
        position_correct("behind", BOX_A, BOX_A, 64)


def test_missing_boxes_score_zero():
    assert position_psrbench("left of", None, BOX_A) == 0.0
    assert position_correct("left of", BOX_A, None, 64) is False
    assert position_correct("left of", BOX_A, (5, 5, 5, 9), 64) is False


def test_exact_rule_agrees_with_toyworld_ground_truth():
    from psr import toyworld as tw

    agree = holds = 0
    for seed in range(200):
        relation = tw.RELATIONS[seed % len(tw.RELATIONS)]
        example = tw.sample_example(seed=seed, num_subjects=2, id_range=tw.DEFAULT_ID_RANGES["eval"],
                                    relation=relation)
        truth = tw.render(example.target, 64).ground_truth()
        a, b = (s["box"] for s in truth["subjects"])
        assert position_correct(relation, a, b, truth["size"]) == truth["relation_holds"]
        holds += truth["relation_holds"]
        for other in tw.RELATIONS:
            agree += position_correct(other, a, b, truth["size"]) == tw.relation_holds(a, b, other)
        if relation != "next to" and truth["relation_holds"]:
            assert position_psrbench(relation, a, b) == 1.0
    assert agree == 200 * len(tw.RELATIONS) and holds >= 190
    # Random boxes inside the image: the same verdicts for every relation.
    rng = np.random.default_rng(0)
    for _ in range(500):
        a, b = (np.sort(rng.uniform(0, 64, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]] for _ in range(2))
        for relation in tw.RELATIONS:
            assert position_correct(relation, a, b, 64) == tw.relation_holds(a, b, relation)


# ---------------------------------------------------------------------------- mix and specs
def test_equal_weights_mix_is_the_sum_and_keeps_every_term():
    extractor, localizer = MeanColour(), Blobs()
    image = scene(("red", 5, 5), ("red", 60, 5))
    batch = RewardBatch([image, image], ["a", "b"], [[reference("red"), reference("green")]] * 2,
                        [["cat", "dog"]] * 2)
    specs = [RewardSpec("psr", 1.0, options={"extractor": extractor, "localizer": localizer}),
             RewardSpec("hungarian", 1.0, options={"extractor": extractor, "localizer": localizer})]
    mix = build_rewards(specs)
    result = mix(batch)
    alone = [REWARDS[s.name](**s.options)(batch) for s in specs]
    torch.testing.assert_close(result.total, alone[0].total + alone[1].total)
    assert set(result.terms) == {"psr", "psr/found", "psr/min_subject", "hungarian", "hungarian/matched_similarity",
                                 "hungarian/missing", "hungarian/duplicates", "hungarian/leakage_margin"}
    assert set(result.details[1]) == {"psr", "hungarian"}
    weighted = build_rewards([RewardSpec("psr", 0.5, options=specs[0].options),
                              RewardSpec("hungarian", -2.0, options=specs[1].options)])(batch)
    torch.testing.assert_close(weighted.total, 0.5 * alone[0].total - 2.0 * alone[1].total)


@pytest.mark.parametrize("tables, message", [
    ([{"name": "psrr"}], r"rewards\[0\]\.name: unknown reward 'psrr' \(did you mean 'psr'\?\)"),
    ([{"name": "hungarian", "duplicate_penalt": 0.1}],
     r"rewards\[0\]\.duplicate_penalt: unknown key for reward 'hungarian' \(did you mean 'duplicate_penalty'\?\)"),
    ([{"name": "psr", "wieght": 2}], r"did you mean 'weight'"),
    ([{"name": "psr", "options": {"asignment": "match"}}], r"rewards\[0\]\.asignment: unknown key.*'assignment'"),
    ([{"name": "psr", "assignment": "hungarian"}], r"rewards\[0\]\.assignment: must be one of 'match', 'order'"),
    ([{"name": "psr", "extractor": {"name": "dinov3"}}], r"extractor\.name: unknown feature extractor 'dinov3'"),
    ([{"name": "psr", "localizer": {"path": "x"}}], r"localizer: missing 'name'"),
    ([{"name": "clip_t", "weight": "high"}], r"rewards\[0\]\.weight: expected a finite number"),
    ([{"name": "aesthetic", "head": "head.onnx"}], r"rewards\[0\]\.head: head\.onnx: expected a \.safetensors"),
    ([{"name": "psr"}, {"name": "psr", "pad": 0.1}], r"rewards\[1\]\.label: 'psr' is already used"),
    ([], r"no rewards"),
    ([{"weight": 1.0}], r"rewards\[0\]\.name: required key is missing"),
])
def test_bad_reward_tables_fail_validation_with_a_hint(tables, message):
    with pytest.raises(UserError, match=message):
        check_reward_specs(tables)


def test_reward_specs_from_toml_and_recipe_build_read_both_layouts():
    import tomllib
    from dataclasses import dataclass

    from psr.core.recipe import build, to_toml

    flat = tomllib.loads('[[rewards]]\nname = "psr"\nweight = 2\npad = 0.1\n'
                        '[[rewards]]\nname = "psr"\nlabel = "psr_order"\nassignment = "order"\n')
    specs = reward_specs_from_toml(flat["rewards"])
    assert specs == (RewardSpec("psr", 2.0, options={"pad": 0.1}),
                     RewardSpec("psr", 1.0, "psr_order", {"assignment": "order"}))

    @dataclass(frozen=True)
    class Recipe:
        rewards: tuple[RewardSpec, ...] = ()

    nested = tomllib.loads('[[rewards]]\nname = "hungarian"\n[rewards.options]\nmissing_penalty = 0.5\n')
    assert build(Recipe, nested).rewards == (RewardSpec("hungarian", options={"missing_penalty": 0.5}),)
    recipe = Recipe(rewards=specs + (RewardSpec("clip_t", 0.5, options={"extractor": {"name": "clip", "tiny": True}}),))
    assert build(Recipe, tomllib.loads(to_toml(recipe))) == recipe   # written back, read back
    with pytest.raises(RecipeError, match=r"rewards\[0\]\.options\.missing_penalty: must be >= 0"):
        build(Recipe, {"rewards": [{"name": "hungarian", "options": {"missing_penalty": -1}}]})
    with pytest.raises(RecipeError, match=r"rewards\[0\]\.options\.pdd: unknown key \(did you mean 'pad'\?\)"):
        build(Recipe, {"rewards": [{"name": "psr", "options": {"pdd": 0}}]})


def test_component_cache_builds_each_component_once(monkeypatch):
    built = []

    def blobs(device="cpu"):
        built.append(device)
        return Blobs()

    monkeypatch.setitem(LOCALIZERS, "blobs", blobs)
    options = {"extractor": {"name": "dino", "tiny": True}, "localizer": {"name": "blobs"}}
    cache = ComponentCache()
    mix = build_rewards([{"name": "psr", **options}, {"name": "hungarian", **options}], cache=cache)
    (_, first), (_, second) = mix.entries
    assert first.finder.extractor is second.finder.extractor and first.finder.localizer is second.finder.localizer
    assert len(cache) == 2 and built == ["cpu"]
    other = cache.get_extractor({"name": "dino", "tiny": True, "seed": 1})
    assert other is not first.finder.extractor and len(cache) == 3


# ---------------------------------------------------------------------------- real tiny models
def test_tiny_dino_end_to_end():
    cache = ComponentCache()
    dino = {"name": "dino", "tiny": True}
    image = scene(("red", 10, 30), ("blue", 60, 30))
    batch = RewardBatch([image, scene(("red", 10, 30))], ["x", "y"], [[reference("blue"), reference("red")]] * 2,
                        [["cat", "cat"]] * 2)
    swapped = REWARDS["hungarian"](cache=cache, extractor=dino, localizer=Blobs())(batch)
    ordered = REWARDS["psr"](cache=cache, extractor=dino, localizer=Blobs(), assignment="order")(batch)
    matched = REWARDS["psr"](cache=cache, extractor=dino, localizer=Blobs())(batch)
    assert len(cache) == 1
    assert swapped.total[0].item() == pytest.approx(1.0, abs=1e-5)
    assert matched.total[0].item() == pytest.approx(1.0, abs=1e-5)
    # Sample 1 lacks the blue cat: half the subjects score 1, the other is the penalty 0.
    assert matched.total[1].item() == pytest.approx(0.5, abs=1e-5)
    assert swapped.terms["missing"].tolist() == [0, 1]
    extractor = cache.get_extractor(dino)
    crops = [reference("red").crop((14, 14, 34, 34)), reference("blue").crop((14, 14, 34, 34))]
    direct = extractor.embed_images(crops)
    cross = float(direct[1] @ direct[0])
    assert swapped.details[0]["similarity"][0][0] == pytest.approx(cross, abs=1e-5)
    assert cross < 0.99 and ordered.total[0].item() == pytest.approx(cross, abs=1e-5)   # first boxes: both crossed
    json.dumps([swapped.details, matched.details], allow_nan=False)


def test_clip_t_with_tiny_clip_matches_a_direct_computation():
    cache = ComponentCache()
    clip = {"name": "clip", "tiny": True}
    images = [scene(("red", 10, 10)), scene(("green", 40, 40), ("blue", 5, 60))]
    prompts = ["a red cat", "a green dog and a blue cat"]
    result = REWARDS["clip_t"](cache=cache, extractor=clip)(RewardBatch(images, prompts, [[], []], [[], []]))
    extractor = cache.get_extractor(clip)
    expected = torch.nn.functional.cosine_similarity(extractor.embed_images(images), extractor.embed_texts(prompts))
    torch.testing.assert_close(result.total, expected)
    assert ((result.total >= -1) & (result.total <= 1)).all() and result.total.dtype == torch.float32


def test_aesthetic_head_files_and_the_missing_head_error(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="give head = PATH"):
        REWARDS["aesthetic"](extractor=MeanColour())
    images = [scene(("red", 10, 10)), Image.new("RGB", (32, 32), COLOURS["green"])]
    batch = RewardBatch(images, ["a", "b"], [[], []], [[], []])
    embeddings = MeanColour().embed_images(images)
    weight, bias = torch.tensor([1.0, -2.0, 0.5]), torch.tensor(0.25)
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "head.safetensors"))
    linear = torch.nn.Linear(3, 1)
    torch.save(linear.state_dict(), str(tmp_path / "head.pt"))
    for path, (w, b) in ((tmp_path / "head.safetensors", (weight, bias)),
                         (tmp_path / "head.pt", (linear.weight.detach()[0], linear.bias.detach()[0]))):
        result = REWARDS["aesthetic"](extractor=MeanColour(), head=str(path))(batch)
        raw = embeddings @ w + b
        torch.testing.assert_close(result.terms["raw"], raw)
        torch.testing.assert_close(result.total, torch.sigmoid(raw))
    plain = REWARDS["aesthetic"](extractor=MeanColour(), head=str(tmp_path / "head.pt"), squash="none")(batch)
    torch.testing.assert_close(plain.total, plain.terms["raw"])
    random = [REWARDS["aesthetic"](extractor=MeanColour(), allow_random_head=True, seed=3)(batch).total
              for _ in range(2)]
    torch.testing.assert_close(random[0], random[1])
    assert ((random[0] > 0) & (random[0] < 1)).all()
    save_file({"weight": torch.ones(5), "bias": torch.zeros(1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(UserError, match="weight has 5 entries but the extractor's embeddings have 3"):
        REWARDS["aesthetic"](extractor=MeanColour(), head=str(tmp_path / "wide.safetensors"))(batch)
    save_file({"w": torch.ones(3)}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(UserError, match="needs tensors 'weight'"):
        REWARDS["aesthetic"](extractor=MeanColour(), head=str(tmp_path / "keys.safetensors"))
    with pytest.raises(UserError, match="no such file"):
        REWARDS["aesthetic"](extractor=MeanColour(), head=str(tmp_path / "none.pt"))


def test_flat_rewards_tables_in_a_recipe_carry_their_options_beside_name_and_weight():
    import tomllib
    from dataclasses import dataclass

    from psr.core.recipe import build

    @dataclass(frozen=True)
    class Recipe:
        rewards: tuple[RewardSpec, ...] = ()

    text = ('[[rewards]]\nname = "psr"\nextractor = {name = "dino", tiny = true}\n'
            '[[rewards]]\nname = "hungarian"\nweight = 0.5\nmissing_penalty = 0.5\n')
    recipe = build(Recipe, tomllib.loads(text))
    assert recipe.rewards[0].options == {"extractor": {"name": "dino", "tiny": True}}
    assert (recipe.rewards[1].weight, recipe.rewards[1].options) == (0.5, {"missing_penalty": 0.5})
    with pytest.raises(RecipeError, match=r"rewards\[0\]\.options\.extractr: unknown key \(did you mean 'extractor'"):
        build(Recipe, tomllib.loads('[[rewards]]\nname = "psr"\nextractr = {name = "dino"}\n'))
