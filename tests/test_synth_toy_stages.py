"""The ToyWorld stages: PSR's synthesis pipeline end to end, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from psr import toyworld as tw
from psr.core.detect import Detection
from psr.errors import UserError
from psr.synth import stages as S
from psr.synth.pipeline import SynthPipeline
from psr.synth.stages.toy import SUBJECT_KEY, WORLD_KEY, ToyDetector, parse_prompt


class GroundTruthLocalizer:
    """Test double: the boxes the target stage drew, labelled with their categories."""

    def detect(self, image, queries):
        data = json.loads(image.info[WORLD_KEY])
        found = [Detection(tuple(float(v) for v in box), 1.0, tw.Identity.from_id(s["identity"]).category)
                 for box, s in zip(data["boxes"], data["spec"]["subjects"])]
        return [d for d in found if d.label in queries]


@pytest.mark.parametrize("text, expected", [
    ("the red striped star creature, on grass",
     ([("star", "red", "stripes", ())], None, "grass")),
    ("the white dotted heart creature above the yellow striped drop creature, on grass",
     ([("heart", "white", "dots", ()), ("drop", "yellow", "stripes", ())], "above", "grass")),
    ("a picture of the green star creature wearing a hat and a scarf to the left of the blue ringed moon "
     "creature with a glow in a room",
     ([("star", "green", "plain", ("hat", "scarf")), ("moon", "blue", "rings", ("glow",))], "left of", "room")),
])
def test_parse_prompt_reads_names_attributes_relation_and_scene(text, expected):
    subjects, relation, scene = expected
    parsed = parse_prompt(text)
    assert [(s.shape, s.colour, s.pattern, s.attributes) for s in parsed.subjects] == subjects
    assert parsed.relation == relation
    assert parsed.scene == scene


def test_parse_prompt_without_a_toyworld_name_is_a_user_error():
    with pytest.raises(UserError, match="no ToyWorld subject"):
        parse_prompt("a photo of a cat and a dog on a wooden table")


@pytest.mark.parametrize("seed", range(6))
def test_target_draws_what_the_prompt_names(seed):
    plan = S.build_stage("prompt", "cpu", {"name": "toyworld"})(["star", "heart"], seed)
    image = S.build_stage("target", "cpu", {"name": "toyworld"})(plan.text, seed)
    data = json.loads(image.info[WORLD_KEY])
    spec = tw.SceneSpec.from_dict(data["spec"])
    parsed = parse_prompt(plan.text)
    for subject, wanted in zip(spec.subjects, parsed.subjects):
        ident = tw.Identity.from_id(subject.identity)
        assert (ident.shape, ident.colour, ident.pattern) == (wanted.shape, wanted.colour, wanted.pattern)
        assert subject.attributes == wanted.attributes
    assert spec.relation == parsed.relation
    render = tw.render(spec, image.width)
    assert np.array_equal(np.asarray(image), render.image)  # the metadata describes the pixels
    assert render.relation_holds() in (True, None)


def test_prompt_rejects_a_category_toyworld_does_not_have():
    with pytest.raises(UserError, match="not a ToyWorld category"):
        S.build_stage("prompt", "cpu", {"name": "toyworld"})(["cat", "star"], 0)


def _located(seed=0):
    plan = S.build_stage("prompt", "cpu", {"name": "toyworld", "attribute_rate": 0.0})(["star", "heart"], seed)
    target = S.build_stage("target", "cpu", {"name": "toyworld"})(plan.text, seed)
    detector = ToyDetector(GroundTruthLocalizer())
    found = detector(target, plan.categories)
    return plan, target, found, [detector.crop(target, d.box) for d in found]


def test_personalize_redraws_the_cropped_subject_alone_in_another_scene_and_pose():
    plan, target, found, crops = _located()
    spec = tw.SceneSpec.from_dict(json.loads(target.info[WORLD_KEY])["spec"])
    personalize = S.build_stage("personalize", "cpu", {"name": "toyworld"})
    for i, crop in enumerate(crops):
        reference, prompt = personalize(crop, plan.categories[i], plan.scene, 100 + i)
        ref = tw.SceneSpec.from_dict(json.loads(reference.info[WORLD_KEY])["spec"])
        assert len(ref.subjects) == 1
        assert ref.subjects[0].identity == spec.subjects[i].identity
        assert ref.scene != spec.scene
        assert ref.subjects[0].pose != spec.subjects[i].pose
        assert tw.Identity.from_id(ref.subjects[0].identity).name in prompt


def test_personalize_needs_a_crop_from_the_toy_detector():
    from PIL import Image

    with pytest.raises(UserError, match="no ToyWorld subject"):
        S.build_stage("personalize", "cpu", {"name": "toyworld"})(Image.new("RGB", (16, 16)), "star", "on grass", 0)


def test_matcher_pairs_land_on_the_subject_in_both_images():
    plan, target, found, crops = _located(3)
    reference, _ = S.build_stage("personalize", "cpu", {"name": "toyworld"})(crops[0], "star", plan.scene, 9)
    pairs = S.build_stage("matcher", "cpu", {"name": "toyworld"})(reference, target, None, None, 8)
    assert pairs
    target_render = tw.render(tw.SceneSpec.from_dict(json.loads(target.info[WORLD_KEY])["spec"]), 64)
    ref_render = tw.render(tw.SceneSpec.from_dict(json.loads(reference.info[WORLD_KEY])["spec"]), 64)
    for ref_token, tgt_token in pairs:
        ty, tx = divmod(tgt_token, 8)
        ry, rx = divmod(ref_token, 8)
        assert target_render.masks[0][ty * 8:(ty + 1) * 8, tx * 8:(tx + 1) * 8].mean() > 0.5
        assert ref_render.masks[0][ry * 8:(ry + 1) * 8, rx * 8:(rx + 1) * 8].any()


def test_edit_changes_the_scene_or_an_attribute_and_rewrites_the_caption():
    plan, target, _, _ = _located(5)
    edit = S.build_stage("edit", "cpu", {"name": "toyworld", "rate": 1.0})
    kinds = set()
    for seed in range(12):
        result = edit(target, plan, seed)
        kinds.add(result.kind)
        before = tw.SceneSpec.from_dict(json.loads(target.info[WORLD_KEY])["spec"])
        after = tw.SceneSpec.from_dict(json.loads(result.image.info[WORLD_KEY])["spec"])
        assert result.plan.text == tw.build_prompt(after, result.plan.variant)
        if result.kind == "background":
            assert after.scene != before.scene and after.subjects == before.subjects
        else:
            added = [set(a.attributes) - set(b.attributes) for a, b in zip(after.subjects, before.subjects)]
            assert sorted(len(x) for x in added) == [0, 1]
    assert kinds == {"background", "attribute"}
    assert S.build_stage("edit", "cpu", {"name": "toyworld", "rate": 0.0})(target, plan, 0) is None


@pytest.mark.parametrize("options, message", [
    ({"name": "toyworld", "kinds": ["recolour"]}, "kinds"),
    ({"name": "toyworld", "rate": 2.0}, "rate"),
])
def test_edit_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        S.build_stage("edit", "cpu", options)


TOY_PIPELINE = {
    "prompt": {"name": "toyworld"},
    "target": {"name": "toyworld"},
    "detector": {"name": "toyworld"},
    "personalize": {"name": "toyworld"},
    "filter": {"name": "feature-cosine", "extractor": {"name": "toyworld"}, "threshold": 0.3,
               "distinct_threshold": 0.95},
    "matcher": {"name": "toyworld"},
    "edit": {"name": "toyworld", "rate": 0.5},
}


def test_the_whole_pipeline_runs_offline_with_the_trained_toyworld_models():
    pipeline = SynthPipeline(TOY_PIPELINE, device="cpu", token_stride=8)
    kept = []
    for i in range(8):
        result = pipeline.run(i, ["star", "heart"], 1000 + i)
        if hasattr(result, "subjects"):
            kept.append(result)
        else:
            assert result.reason  # a rejection always says why
    counts = pipeline.counts
    assert counts["candidates"] == 8 and counts["kept"] + counts["rejected"] == 8
    assert len(kept) >= 3, counts
    for sample in kept:
        spec = tw.SceneSpec.from_dict(json.loads(sample.target.info[WORLD_KEY])["spec"])
        for subject, truth in zip(sample.subjects, spec.subjects):
            ref_spec = tw.SceneSpec.from_dict(json.loads(subject.reference.info[WORLD_KEY])["spec"])
            assert ref_spec.subjects[0].identity == truth.identity
            assert subject.name in sample.prompt
    assert not any(SUBJECT_KEY in s.target.info for s in kept)
