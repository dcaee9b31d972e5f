"""PSR's synthesis stages and pipeline, with tiny random-init models (no downloads).

Grounding DINO's tokenizer: `build_tiny_bert_tokenizer` (a WordPiece vocabulary written
in the test process with BERT's special-token ids, which Grounding DINO's code expects).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from psr.core.detect import (LOCALIZERS, Detection, assign_boxes, box_iou, box_mask, build_localizer,
                             build_tiny_bert_tokenizer, crop_box)
from psr.core.features import build_feature_extractor
from psr.errors import UserError
from psr.synth import stages as S
from psr.synth.stages import common, filters, matchers, prompts
from psr.synth.pipeline import SynthPipeline, category_pairs
from psr.synth.sample import Rejection, SynthSample


pytestmark = pytest.mark.usefixtures("one_thread")


def noise(width=64, height=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def localizer():
    return build_localizer("grounding-dino", "cpu", tiny=True, threshold=0.0, words=["cat", "dog", "owl"])


@pytest.fixture(scope="module")
def dino():
    return build_feature_extractor("dino", "cpu", tiny=True)


@pytest.fixture(scope="module")
def dinov2():
    return build_feature_extractor("dinov2", "cpu", tiny=True)


# ---------------------------------------------------------------------------- registry
def test_registry_table_lists_every_stage_kind_and_name():
    assert {kind: list(names) for kind, names in S.SYNTH_STAGES.items()} == {
        "prompt": ["template", "llm", "toyworld"], "target": ["flux", "toyworld"],
        "detector": ["grounding-dino", "toyworld"], "personalize": ["kontext", "toyworld"],
        "filter": ["feature-cosine"], "matcher": ["dinov2-mnn", "toyworld"], "edit": ["kontext-edit", "toyworld"]}
    assert list(LOCALIZERS) == ["grounding-dino", "toyworld"]


@pytest.mark.parametrize("kind, options, message", [
    ("filter", {"name": "feature-cosine", "treshold": 0.5}, "pipeline.filter.treshold.*did you mean 'threshold'"),
    ("target", {"name": "flx"}, "did you mean 'flux'"),
    ("prompts", {"name": "template"}, "did you mean 'prompt'"),
    ("prompt", {}, "pipeline.prompt.name: missing"),
])
def test_bad_stage_options_are_one_line_user_errors(kind, options, message):
    with pytest.raises(UserError, match=message):
        S.build_stage(kind, "cpu", options)


def test_importing_the_stage_table_loads_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, psr.synth.stages, psr.synth.pipeline; "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'diffusers', 'open_clip')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ---------------------------------------------------------------------------- localizer
def test_tiny_bert_tokenizer_has_berts_special_ids_and_spells_any_word():
    tok = build_tiny_bert_tokenizer(["cat"])
    ids = tok("cat. zebra.")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and ids.count(1012) == 2
    assert tok.convert_tokens_to_ids("?") == 1029 and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[1]) == "cat"  # a listed word is one token


def test_grounding_dino_detections_are_well_formed(localizer):
    image = noise(96, 64)
    found = localizer.detect(image, ["cat", "dog"])
    assert found and all(isinstance(d, Detection) for d in found)
    scores = [d.score for d in found]
    assert scores == sorted(scores, reverse=True) and all(0.0 < s <= 1.0 for s in scores)
    for d in found:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= 96 and 0 <= y0 <= y1 <= 64
        assert d.label in ("cat", "dog")
    localizer.threshold, saved = 0.999, localizer.threshold
    try:
        assert all(d.score > 0.999 for d in localizer.detect(image, ["cat", "dog"]))
    finally:
        localizer.threshold = saved


def test_grounding_dino_loads_back_from_a_saved_folder(localizer, tmp_path):
    localizer.save_pretrained(tmp_path)
    loaded = build_localizer("grounding-dino", "cpu", path=str(tmp_path), threshold=0.0)
    image = noise(seed=5)
    assert loaded.detect(image, ["owl", "cat"]) == localizer.detect(image, ["owl", "cat"])


def test_localizer_needs_a_path_or_tiny():
    with pytest.raises(UserError, match="give path"):
        build_localizer("grounding-dino", "cpu")
    with pytest.raises(UserError, match="did you mean 'grounding-dino'"):
        build_localizer("groundingdino", "cpu")


def d(box, score, label):
    return Detection(box=box, score=score, label=label)


@pytest.mark.parametrize("detections, labels, expected", [
    # best box per label
    ([d((0, 0, 10, 10), 0.9, "cat"), d((20, 20, 30, 30), 0.8, "dog"), d((40, 0, 50, 10), 0.7, "cat")],
     ["dog", "cat"], [1, 0]),
    # two subjects of one category take two different boxes; an overlapping duplicate is skipped
    ([d((0, 0, 10, 10), 0.9, "cat"), d((1, 1, 11, 11), 0.85, "cat"), d((40, 0, 50, 10), 0.7, "cat")],
     ["cat", "cat"], [0, 2]),
    # a label with no box → None
    ([d((0, 0, 10, 10), 0.9, "cat")], ["cat", "owl"], [0, None]),
])
def test_assign_boxes_known_answers(detections, labels, expected):
    got = assign_boxes(detections, labels)
    assert [None if g is None else detections.index(g) for g in got] == expected


def test_box_helpers_known_answers():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    mask = box_mask((1.5, 0.0, 4.0, 2.0), 4, 6)
    expected = np.zeros((4, 6), bool)
    expected[0:2, 1:4] = True  # pixel centres 1.5, 2.5 and 3.5 lie in [1.5, 4)
    assert np.array_equal(mask, expected)
    image = noise(64, 32)
    assert crop_box(image, (10.2, 5.0, 20.0, 15.5)).size == (10, 11)
    assert crop_box(image, (10, 10, 20, 20), pad=0.5).size == (20, 20)
    assert crop_box(image, (60, 0, 64, 32), pad=1.0).size == (8, 32)  # clipped to the image
    assert crop_box(image, (64, 32, 64, 32)).size == (1, 1)  # never empty


def test_detector_stage_gives_one_box_per_category(localizer):
    stage = S.build_stage("detector", "cpu", {"name": "grounding-dino", "localizer": localizer, "pad": 0.1})
    found = stage(noise(seed=1), ["cat", "dog", "cat"])
    assert [f.label for f in found] == ["cat", "dog", "cat"]
    assert box_iou(found[0].box, found[2].box) <= 0.5
    crop = stage.crop(noise(seed=1), found[1].box)
    assert 1 <= crop.width <= 64 and 1 <= crop.height <= 64


# ---------------------------------------------------------------------------- prompt
def test_template_prompt_names_every_category_and_is_seeded():
    stage = S.build_stage("prompt", "cpu", {"name": "template"})
    plan = stage(["owl", "cat"], seed=3)
    assert plan == stage(["owl", "cat"], seed=3)
    assert "an owl" in plan.text and "a cat" in plan.text and plan.scene in plan.text
    assert plan.source == "template" and plan.subject_name(0) == "the owl"
    assert len({stage(["owl", "cat"], seed=s).text for s in range(20)}) > 3
    assert "a dog, a cat and an owl" in prompts.template_plan(["dog", "cat", "owl"], 0).render() or \
        "a dog, a cat and an owl" in prompts.template_plan(["dog", "cat", "owl"], 1).render()


@pytest.mark.parametrize("raw, categories, expected", [
    ("A cat sits next to a dog.\nAnd then", ["cat", "dog"], "A cat sits next to a dog."),
    ('  "Two cats   and a Dog play."  ', ["cat", "dog"], "Two cats and a Dog play."),
    ("\n\nthe teddy bear hugs a cat", ["teddy bear", "cat"], "the teddy bear hugs a cat"),
    ("A cat alone.", ["cat", "dog"], None),  # misses a category
    ("A catalog of dogs", ["cat", "dog"], None),  # 'catalog' is not 'cat'
    ("", ["cat"], None),
    ("cat " * 200, ["cat"], ("cat " * 75).strip()),  # cut at a word boundary, 300 chars max
])
def test_sanitize_llm_text_known_answers(raw, categories, expected):
    assert prompts.sanitize_llm_text(raw, categories) == expected


@pytest.fixture(scope="module")
def llm_stage():
    return S.build_stage("prompt", "cpu", {"name": "llm", "tiny": True, "max_new_tokens": 6})


def test_llm_prompt_falls_back_to_the_template_and_counts_it(llm_stage):
    before = (llm_stage.calls, llm_stage.fallbacks)
    plan = llm_stage(["cat", "dog"], seed=11)
    # An untrained model does not name both categories: the template's text is used.
    assert plan.source == "llm-fallback"
    assert plan.text == prompts.template_plan(["cat", "dog"], 11).text
    assert (llm_stage.calls, llm_stage.fallbacks) == (before[0] + 1, before[1] + 1)
    assert llm_stage.generate_text("Sentence:", 5) == llm_stage.generate_text("Sentence:", 5)


def test_llm_prompt_keeps_usable_text(llm_stage, monkeypatch):
    monkeypatch.setattr(llm_stage, "generate_text", lambda instruction, seed: " A cat naps beside a dog.\nJunk")
    fallbacks = llm_stage.fallbacks
    plan = llm_stage(["cat", "dog"], seed=2)
    assert (plan.source, plan.text, llm_stage.fallbacks) == ("llm", "A cat naps beside a dog.", fallbacks)


# ---------------------------------------------------------------------------- FLUX stages
def test_flux_target_generates_the_configured_size(tiny_model):
    stage = S.build_stage("target", "cpu", {"name": "flux", "preset": "tiny", "model": tiny_model,
                                            "steps": 1, "height": 48, "width": 64})
    image = stage("a cat and a dog", seed=0)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(stage("a cat and a dog", seed=0)))


def test_flux_target_loads_the_tiny_preset():
    stage = S.build_stage("target", "cpu", {"name": "flux", "preset": "tiny", "steps": 1})
    assert (stage.height, stage.width, stage.guidance) == (64, 64, 3.5)
    assert stage.model.token_stride == 8
    with pytest.raises(UserError, match="multiple of 8"):
        S.build_stage("target", "cpu", {"name": "flux", "preset": "tiny", "model": stage.model, "height": 60})


def test_kontext_personalize_renders_the_crop_in_another_scene(tiny_model):
    stage = S.build_stage("personalize", "cpu", {"name": "kontext", "preset": "tiny", "model": tiny_model,
                                                 "steps": 1, "size": 32})
    image, prompt = stage(noise(24, 40), "owl", avoid_scene="on a wooden table", seed=4)
    assert image.size == (32, 32)
    assert prompt.startswith("the owl ") and "wooden table" not in prompt


def test_edit_rewrites_the_prompt_to_match_the_instruction(tiny_model):
    stage = S.build_stage("edit", "cpu", {"name": "kontext-edit", "preset": "tiny", "model": tiny_model,
                                          "steps": 1, "kinds": ["background"]})
    plan = prompts.template_plan(["cat", "dog"], 0)
    kind, instruction, new = stage.choose(plan, seed=1)
    place = instruction.removeprefix("change the background to ")
    assert kind == "background" and new.scene == prompts.SCENES[place] != plan.scene
    assert new.text == new.render() and new.scene in new.text and plan.scene not in new.text

    stage.kinds = ("attribute",)
    kind, instruction, new = stage.choose(plan, seed=1)
    i = next(k for k, c in enumerate(plan.categories) if c in instruction)
    assert new.details[i] and new.details[i] in new.text and new.subject_name(i).endswith(new.details[i])

    result = stage(noise(), plan, seed=1)
    assert result.image.size == (64, 64) and result.plan.text != plan.text
    stage.rate = 0.0
    assert stage(noise(), plan, seed=1) is None


# ---------------------------------------------------------------------------- filter
E = torch.eye(3)
TILT = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 0.0]]), dim=-1)


@pytest.mark.parametrize("references, crops, keep, reason", [
    (E[:2], E[:2], True, None),  # each reference equals its crop, references orthogonal
    (E[:2], torch.cat([E[:1], TILT]), True, None),  # cosine 0.707 >= 0.7
    (E[:2], torch.cat([E[:1], E[2:3]]), False, "subject 1 (dog) reference vs target crop cosine 0.000 < 0.7"),
    (torch.cat([E[:1], E[:1]]), torch.cat([E[:1], E[:1]]), False, "references 0 (cat) and 1 (dog) are not distinct"),
    (torch.cat([E[:1], TILT]), torch.cat([E[:1], TILT]), True, None),  # pairwise 0.707 < 0.9
])
def test_cosine_verdict_known_answers(references, crops, keep, reason):
    verdict = filters.cosine_verdict(references, crops, threshold=0.7, distinct_threshold=0.9, labels=["cat", "dog"])
    assert verdict.keep is keep
    assert (verdict.reason is None) if reason is None else (reason in verdict.reason)


def test_feature_cosine_filter_with_a_real_extractor(dino):
    stage = S.build_stage("filter", "cpu", {"name": "feature-cosine", "extractor": dino,
                                            "threshold": 0.99, "distinct_threshold": 0.9999})
    a, b = noise(seed=1), noise(seed=2)
    kept = stage([a, b], [a.copy(), b.copy()])
    assert kept.keep and kept.similarity == pytest.approx([1.0, 1.0], abs=1e-5)
    # (A random-init ViT maps any two noise images to nearly the same class token, so only
    # exact copies are told apart from distinct images here.)
    assert stage([a, a.copy()], [a, a]).reason.startswith("filter: references 0 and 1 are not distinct")
    with pytest.raises(UserError, match="set extractor"):
        S.build_stage("filter", "cpu", {"name": "feature-cosine"})


# ---------------------------------------------------------------------------- matcher
class PixelPatches:
    """A stand-in extractor whose patch features are the mean-removed pixels of each
    8 x 8 patch: an exact copy of a patch matches it with cosine 1."""

    name = "pixels"

    def patch_features(self, image):
        a = torch.from_numpy(np.asarray(image, dtype=np.float32))
        h, w = a.shape[0] // 8, a.shape[1] // 8
        p = a.reshape(h, 8, w, 8, 3).permute(0, 2, 1, 3, 4).reshape(h, w, -1)
        return torch.nn.functional.normalize(p - p.mean(-1, keepdim=True), dim=-1)


def shifted_pair(shift_px=16):
    """(reference, target): the reference is the target moved left by `shift_px`, with
    fresh noise filling the uncovered right strip."""
    target = np.asarray(noise(seed=10))
    ref = np.asarray(noise(seed=11)).copy()
    ref[:, : 64 - shift_px] = target[:, shift_px:]
    return Image.fromarray(ref), Image.fromarray(target)


def test_mutual_nearest_neighbours_known_answer():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # a0↔b1 and a1↔b0 are mutual; a2's nearest is b1, whose nearest is a0, so a2 is out.
    assert matchers.mutual_nearest_neighbours(a, b) == [(0, 1), (1, 0)]
    assert matchers.mutual_nearest_neighbours(a, b, min_similarity=1.5) == []


def test_patch_tokens_map_patch_centres_to_the_token_grid():
    # 4 x 4 patches over a 32 x 32 image, tokens of 16 px: 2 x 2 patches per token.
    assert matchers.patch_tokens((4, 4), (32, 32), 16) == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    mask = np.zeros((32, 32), bool)
    mask[:, 16:] = True
    assert matchers.patch_tokens((2, 2), (32, 32), 16, mask) == [None, 1, None, 3]


def test_mnn_on_a_shifted_copy_maps_tokens_by_the_shift():
    matcher = matchers.MnnMatcher(PixelPatches(), min_similarity=0.99)
    reference, target = shifted_pair(16)  # 2 tokens of 8 px
    pairs = matcher(reference, target, None, None, token_stride=8)
    assert pairs == sorted((r * 8 + c, r * 8 + c + 2) for r in range(8) for c in range(6))
    # Restricted to the subject's box (target columns 24..47 px → token columns 3..5).
    mask = box_mask((24, 0, 48, 64), 64, 64)
    pairs = matcher(reference, target, None, mask, token_stride=8)
    assert pairs == sorted((r * 8 + c - 2, r * 8 + c) for r in range(8) for c in (3, 4, 5))
    # At a coarser dataset grid (16 px tokens) the same matches land one token over.
    pairs = matcher(reference, target, None, None, token_stride=16)
    assert pairs and all(t - r == 1 for r, t in pairs)


@pytest.mark.parametrize("pairs, other, radius, expected", [
    ([(0, 5), (1, 6)], [(0, 5), (1, 9)], 0, [(0, 5)]),
    ([(0, 5), (1, 6)], [(0, 5), (1, 7)], 1, [(0, 5), (1, 6)]),  # 6 and 7 are neighbours
    ([(0, 5)], [(0, 13)], 1, []),  # on a 4-wide grid 5 = (1, 1) and 13 = (3, 1): two rows apart
    ([(2, 5)], [(0, 5)], 3, []),  # the other matcher matched another reference token
])
def test_agreement_known_answers(pairs, other, radius, expected):
    assert matchers.agree(pairs, other, grid_w=4, radius=radius) == expected


def test_dinov2_matcher_with_agreement_returns_tokens_inside_the_masks(dinov2, dino):
    stage = S.build_stage("matcher", "cpu", {"name": "dinov2-mnn", "extractor": dinov2, "agreement": dino,
                                             "agreement_radius": 1})
    reference, target = shifted_pair(16)
    mask = box_mask((16, 16, 48, 48), 64, 64)
    pairs = stage(reference, target, None, mask, token_stride=8)
    allowed = {r * 8 + c for r in range(2, 6) for c in range(2, 6)}
    assert all(0 <= r < 64 and t in allowed for r, t in pairs)
    assert pairs == sorted(set(pairs))


# ---------------------------------------------------------------------------- pipeline
def pipeline_spec(tiny_model, localizer, dino, dinov2, **overrides):
    spec = {
        "prompt": {"name": "llm", "tiny": True, "max_new_tokens": 4},
        "target": {"name": "flux", "preset": "tiny", "model": tiny_model, "steps": 1},
        "detector": {"name": "grounding-dino", "localizer": localizer},
        "personalize": {"name": "kontext", "preset": "tiny", "model": "target", "steps": 1},
        "filter": {"name": "feature-cosine", "extractor": dino, "threshold": -1.0, "distinct_threshold": 2.0},
        "matcher": {"name": "dinov2-mnn", "extractor": dinov2, "agreement": "filter", "agreement_radius": 1},
        "edit": {"name": "kontext-edit", "preset": "tiny", "model": "personalize", "steps": 1},
    }
    spec.update(overrides)
    return spec


def test_pipeline_end_to_end_returns_a_complete_sample_deterministically(tiny_model, localizer, dino, dinov2):
    pipeline = SynthPipeline(pipeline_spec(tiny_model, localizer, dino, dinov2), device="cpu", token_stride=8)
    assert pipeline.stages["edit"].model is pipeline.stages["personalize"].model is tiny_model
    assert pipeline.stages["matcher"].agreement is dino
    categories = category_pairs(["cat", "dog", "owl"], 2, seed=5)
    sample = pipeline.run(7, categories, seed=5)
    assert isinstance(sample, SynthSample)
    assert sample.target.size == (64, 64) and len(sample.subjects) == 2
    for subject, category in zip(sample.subjects, categories):
        assert subject.category == category and category in subject.name
        x0, y0, x1, y1 = subject.box
        assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 64
        assert subject.mask.shape == (64, 64) and subject.mask.dtype == bool
        assert np.array_equal(subject.mask, box_mask(subject.box, 64, 64))
        assert subject.reference.size == (64, 64)
        assert all(0 <= r < 64 and 0 <= t < 64 and subject.mask.reshape(8, 8, 8, 8).any(axis=(1, 3)).ravel()[t]
                   for r, t in subject.correspondence)
        assert subject.extra["filter_cosine"] <= 1.0
    assert sample.provenance["seed"] == 5 and sample.provenance["index"] == 7
    assert sample.provenance["stages"]["target"] == "flux" and sample.provenance["prompt_source"] == "llm-fallback"
    assert sample.extra["edit"]["instruction"] == sample.provenance["edit"]["instruction"]
    assert sample.prompt != sample.extra["prompt_before_edit"]
    assert pipeline.counts["prompt_fallback"] == 1 and pipeline.counts["kept"] == 1

    again = pipeline.run(7, categories, seed=5)
    assert again.prompt == sample.prompt
    assert np.array_equal(np.asarray(again.target), np.asarray(sample.target))
    for a, b in zip(again.subjects, sample.subjects):
        assert a.box == b.box and a.correspondence == b.correspondence
        assert np.array_equal(np.asarray(a.reference), np.asarray(b.reference))


def test_pipeline_rejects_with_a_reason_and_counts_it(tiny_model, localizer, dino, dinov2):
    spec = pipeline_spec(tiny_model, localizer, dino, dinov2,
                         prompt={"name": "template"},
                         filter={"name": "feature-cosine", "extractor": dino, "threshold": 1.0})
    del spec["edit"], spec["matcher"]
    pipeline = SynthPipeline(spec, device="cpu")
    result = pipeline.run(0, ["cat", "dog"], seed=1)
    assert isinstance(result, Rejection)
    assert result.reason.startswith("filter: subject 0 (cat)") and result.provenance["rejected_at"] == "filter"
    assert pipeline.counts["rejected:filter"] == 1 and pipeline.counts["kept"] == 0

    localizer.threshold, saved = 1.0, localizer.threshold  # nothing can score above 1
    try:
        result = pipeline.run(1, ["cat", "dog"], seed=1)
    finally:
        localizer.threshold = saved
    assert isinstance(result, Rejection) and result.reason == "detector: no 'cat' found in the target"


def test_pipeline_spec_errors(tiny_model, localizer, dino, dinov2):
    spec = pipeline_spec(tiny_model, localizer, dino, dinov2)
    del spec["personalize"]
    with pytest.raises(UserError, match="missing stage.*personalize"):
        SynthPipeline(spec, device="cpu")
    spec = pipeline_spec(tiny_model, localizer, dino, dinov2,
                         personalize={"name": "kontext", "preset": "tiny", "model": "edit"})
    with pytest.raises(UserError, match="pipeline.personalize.model = 'edit'"):
        SynthPipeline(spec, device="cpu")


def test_category_pairs_are_distinct_and_seeded():
    cats = ["cat", "dog", "owl", "cup"]
    assert category_pairs(cats, 2, 3) == category_pairs(cats, 2, 3)
    drawn = [tuple(category_pairs(cats, 2, s)) for s in range(30)]
    assert all(len(set(p)) == 2 and set(p) <= set(cats) for p in drawn) and len(set(drawn)) > 4
    with pytest.raises(UserError, match="only 2 distinct"):
        category_pairs(["cat", "cat", "dog"], 3, 0)


def test_derive_seed_is_stable_and_separates_steps():
    assert common.derive_seed(5, "target") == common.derive_seed(5, "target")
    assert len({common.derive_seed(5, "personalize", i) for i in range(10)}) == 10
    assert 0 <= common.derive_seed(2**40, "x") < 2**31
