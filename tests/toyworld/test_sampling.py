"""Seeded examples: targets, references and splits."""

import json

import pytest

from psr import toyworld as tw
from psr.toyworld.sampling import poses_differ

TRAIN, EVAL = tw.DEFAULT_ID_RANGES["train"], tw.DEFAULT_ID_RANGES["eval"]


def test_default_id_ranges_are_disjoint_and_within_the_identity_count():
    assert TRAIN[1] <= EVAL[0] and EVAL[1] <= tw.NUM_IDENTITIES


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_same_seed_same_example_different_seed_different_example(k):
    a, b = tw.sample_example(11, k, TRAIN), tw.sample_example(11, k, TRAIN)
    assert a.to_dict() == b.to_dict()
    assert tw.sample_example(12, k, TRAIN).to_dict() != a.to_dict()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_targets_respect_the_id_range_and_hold_distinct_subjects(k):
    for seed in range(15):
        ex = tw.sample_example(seed, k, EVAL)
        ids = [s.identity for s in ex.target.subjects]
        assert len(ids) == k and len(set(ids)) == k
        assert all(EVAL[0] <= i < EVAL[1] for i in ids)
        assert len({tw.Identity.from_id(i).category for i in ids}) == k
        assert (ex.target.relation in tw.RELATIONS) if k == 2 else ex.target.relation is None
        r = tw.render(ex.target, 64)
        assert (r.masks.sum(axis=(1, 2)) > 20).all()


def test_references_show_the_same_identity_alone_in_another_pose_and_scene():
    for seed in range(20):
        ex = tw.sample_example(seed, 1 + seed % 4, TRAIN, attribute_rate=0.5)
        assert len(ex.references) == len(ex.target.subjects)
        for subject, ref in zip(ex.target.subjects, ex.references):
            (lone,) = ref.subjects
            assert lone.identity == subject.identity and lone.attributes == ()
            assert ref.scene != ex.target.scene and ref.relation is None
            assert lone.pose != subject.pose and poses_differ(lone.pose, subject.pose)
            r = tw.render(ref, 64)
            assert r.masks[0].sum() > 200  # a reference shows its subject large


def test_example_dict_round_trip_re_renders_identical_bytes():
    for seed in range(4):
        ex = tw.sample_example(seed, 2, TRAIN, attribute_rate=0.5)
        back = tw.Example.from_dict(json.loads(json.dumps(ex.to_dict())))
        assert back == ex
        for a, b in zip((ex.target, *ex.references), (back.target, *back.references)):
            assert tw.render(a, 64).image.tobytes() == tw.render(b, 64).image.tobytes()


def test_options_are_honoured():
    ex = tw.sample_example(0, 2, TRAIN, relation="below", scenes=("snow",), attribute_rate=1.0)
    assert ex.target.relation == "below" and ex.target.scene == "snow"
    assert all(len(s.attributes) == 2 for s in ex.target.subjects)
    assert all(s.attributes == () for s in tw.sample_example(0, 3, TRAIN, attribute_rate=0.0).target.subjects)


def test_bad_requests_explain_themselves():
    with pytest.raises(ValueError, match="num_subjects"):
        tw.sample_example(0, 5, TRAIN)
    with pytest.raises(ValueError, match="2 subjects only"):
        tw.sample_example(0, 3, TRAIN, relation="above")
    with pytest.raises(ValueError, match="hold at least"):
        tw.sample_example(0, 3, (10, 12))


# ---------------------------------------------------------------------------- levels
def test_the_full_level_is_the_default_and_draws_what_it_always_drew():
    for seed in range(5):
        assert tw.sample_example(seed, 2, TRAIN).to_dict() == tw.sample_example(seed, 2, TRAIN, level="full").to_dict()
    # pinned: the first example of the default level, so old datasets and benches stay reproducible
    ex = tw.sample_example(5, 2, TRAIN)
    assert ex.prompt == ("a picture of the blue checkered heart creature wearing a scarf above the green zigzag "
                         "hexagon creature wearing a scarf and with a dark outline in the sky")


@pytest.mark.parametrize("name", ["easy", "easy-aligned"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_easy_level_keeps_the_floor_position_and_scale_change_and_held_out_identities(k, name):
    from psr.toyworld.layout import predicted_box

    level = tw.sampling.LEVELS[name]
    for seed in range(20):
        ex = tw.sample_example(seed, k, EVAL, level=name)
        for subject, ref in zip(ex.target.subjects, ex.references):
            identity = tw.Identity.from_id(subject.identity)
            assert EVAL[0] <= subject.identity < EVAL[1]
            assert (identity.eyes, identity.top) == ("two eyes", "none")
            lone = ref.subjects[0]
            assert lone.pose == subject.pose and lone.identity == subject.identity
            # pixel size of the reference subject over the target's: 32 px reference, 64 px target
            ratio = lone.size * 32 / (subject.size * 64)
            assert ratio < 0.91 and ratio > 0.5  # never the same scale (shrunk only to fit the frame)
            target_box, ref_box = predicted_box(subject), predicted_box(lone)
            centre = lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)  # noqa: E731
            if k > 1:  # a lone target subject is centred like its reference (the bench has none)
                assert centre(target_box) != pytest.approx(centre(ref_box), abs=0.02)
        if k == 2:
            from psr.toyworld.layout import relation_holds

            a, b = (predicted_box(s) for s in ex.target.subjects)
            assert relation_holds(a, b, ex.target.relation)
    assert level.subject_sizes[2][0] > tw.sampling.SUBJECT_SIZES[2][0]


def test_easy_level_puts_subjects_at_their_slots():
    from psr.toyworld.layout import SLOTS, predicted_box

    for seed in range(10):
        ex = tw.sample_example(seed, 4, TRAIN, level="easy")
        for subject, (x, y) in zip(ex.target.subjects, SLOTS[4]):
            box = predicted_box(subject)
            assert ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) == pytest.approx((x, y), abs=0.06)
        left = tw.sample_example(seed, 2, TRAIN, level="easy", relation="left of").target.subjects
        assert left[0].x < left[1].x


@pytest.mark.parametrize("k", [2, 3, 4])
def test_the_aligned_level_is_the_easy_example_without_its_jitter(k):
    from psr.toyworld.layout import SLOTS, predicted_box

    def centre(b):
        return ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)

    for seed in range(10):
        easy = tw.sample_example(seed, k, TRAIN, level="easy")
        aligned = tw.sample_example(seed, k, TRAIN, level="easy-aligned")
        assert aligned.prompt == easy.prompt and aligned.target.relation == easy.target.relation
        slots = SLOTS[(easy.target.relation,)] if k == 2 and easy.target.relation != "next to" else SLOTS.get(k)
        for i, (a, e) in enumerate(zip(aligned.target.subjects, easy.target.subjects)):
            assert (a.identity, a.pose, a.size) == (e.identity, e.pose, e.size)
            if slots is not None:
                assert centre(predicted_box(a)) == pytest.approx(slots[i], abs=1e-3)
            lone = aligned.references[i].subjects[0]
            assert centre(predicted_box(lone)) == pytest.approx((0.5, 0.5), abs=1e-3)
            assert lone.size * 32 / (a.size * 64) == pytest.approx(0.849, abs=1e-3)
    # while the easy level's own subjects sit off their slots, up to its jitter
    shifted = [centre(predicted_box(s)) != pytest.approx(slot, abs=1e-3) for seed in range(10)
               for s, slot in zip(tw.sample_example(seed, 4, TRAIN, level="easy").target.subjects, SLOTS[4])]
    assert any(shifted)


def test_unknown_level_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown ToyWorld level 'eazy'; known: \\['full', 'easy', 'easy-aligned'\\]"):
        tw.sample_example(0, 2, TRAIN, level="eazy")


def test_synth_recipe_checks_the_level_and_its_reference_size():
    from psr.cli.recipes import load_recipe
    from psr.errors import RecipeError

    assert load_recipe("synth", overrides=["toyworld.level='easy'", "toyworld.reference_size=32"]).toyworld.level == "easy"
    with pytest.raises(RecipeError, match="toyworld.reference_size: level 'easy' renders references at 1/2"):
        load_recipe("synth", overrides=["toyworld.level='easy'"])
    with pytest.raises(RecipeError, match="toyworld.level: unknown level 'hard'"):
        load_recipe("synth", overrides=["toyworld.level='hard'"])
