"""The shipped ToyWorld perception models, their weight folders and `psr fit`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from psr import toyworld as tw
from psr.core.detect import LOCALIZERS, Detection, box_iou, build_localizer, crop_box
from psr.core.features import FEATURE_EXTRACTORS, build_feature_extractor
from psr.errors import UserError
from psr.toyworld.perception.data import localizer_scene, sibling
from psr.toyworld.perception.metrics import match_detections, retrieval_sets, topk

EVAL = tw.DEFAULT_ID_RANGES["eval"]


@pytest.fixture(scope="module")
def encoder(one_thread):
    return FEATURE_EXTRACTORS["toyworld"]("cpu")


@pytest.fixture(scope="module")
def localizer(one_thread):
    return LOCALIZERS["toyworld"]("cpu")


def _crop(r, index=-1, pad=0.1):
    return crop_box(Image.fromarray(r.image), r.boxes[index].tolist(), pad)


# ---------------------------------------------------------------------------- identity
def test_identity_ranks_same_held_out_identity_above_another(encoder):
    gallery, queries, _ = retrieval_sets(20, seed=7)
    anchors = encoder.embed_images([_crop(r) for r in gallery])
    positives = encoder.embed_images([_crop(r) for r in queries])
    negatives = positives.roll(1, dims=0)  # another held-out identity, also in a new pose and scene
    correct = ((anchors * positives).sum(1) > (anchors * negatives).sum(1)).sum()
    assert correct >= 19


def test_identity_separates_identities_one_factor_apart(encoder):
    rng = np.random.default_rng(3)
    wins = 0
    for _ in range(20):
        a = EVAL[0] + int(rng.integers(EVAL[1] - EVAL[0]))
        b = sibling(rng, a, EVAL)
        renders = [tw.render(_lone(rng, i), 64) for i in (a, a, b)]
        e = encoder.embed_images([_crop(r) for r in renders])
        wins += float(e[0] @ e[1]) > float(e[0] @ e[2])
    assert wins >= 17


def _lone(rng, identity):
    from psr.toyworld.perception.data import reference_view

    return reference_view(rng, identity)


def test_identity_embeddings_are_normalized_deterministic_and_take_any_crop_size(encoder, rgb_image):
    crops = [rgb_image(17, 40, seed=1), rgb_image(200, 150, seed=2), rgb_image(32, 32, seed=3).convert("L")]
    first = encoder.embed_images(crops)
    assert first.shape == (3, encoder.dim) and first.dtype == torch.float32
    torch.testing.assert_close(first.norm(dim=1), torch.ones(3))
    assert torch.equal(first, encoder.embed_images(crops))
    torch.testing.assert_close(first[1:2], encoder.embed_images(crops[1:2]))  # batch-independent (eval-mode BN)
    assert encoder.embed_images([]).shape == (0, encoder.dim)


def test_identity_patch_features_and_no_text_tower(encoder, rgb_image):
    grid = encoder.patch_features(rgb_image(96, 72))
    assert grid.shape[:2] == (6, 8)  # longer side 64 px at stride 8, aspect kept
    torch.testing.assert_close(grid.norm(dim=-1), torch.ones(6, 8))
    with pytest.raises(UserError, match="no text tower"):
        encoder.embed_texts(["a star"])


def test_topk_counts_ties_and_nan_as_misses():
    sim = np.array([[0.9, 0.1, 0.2], [0.5, 0.4, 0.3], [0.2, 0.8, 0.8]])
    assert topk(sim, ks=(1, 2)) == {"top1": round(1 / 3, 4), "top2": 1.0}   # row 2 ties: not a top-1 hit
    # An encoder whose weights went NaN, or one that maps everything to one point, finds nothing.
    assert topk(np.full((4, 4), np.nan)) == {"top1": 0.0, "top5": 0.0}
    assert topk(np.ones((4, 4)), ks=(1, 2)) == {"top1": 0.0, "top2": 0.0}
    assert topk(np.eye(3)) == {"top1": 1.0, "top5": 1.0}


# ---------------------------------------------------------------------------- localizer
def _held_out_renders(count, seed=11):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        r = tw.render(tw.sample_target(rng, int(rng.integers(1, 3)), EVAL, attribute_rate=0.0), 64)
        out.append(r)
    return out


def test_localizer_finds_held_out_subjects_and_nothing_absent(localizer):
    found_right = total = 0
    for r in _held_out_renders(24):
        cats = [tw.Identity.from_id(s.identity).category for s in r.spec.subjects]
        image = Image.fromarray(r.image)
        found = localizer.detect(image, cats)
        assert all(isinstance(d, Detection) and 0.0 <= d.score <= 1.0 for d in found)
        assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
        for box, cat in zip(r.boxes.tolist(), cats):
            found_right += any(d.label == cat and box_iou(d.box, box) >= 0.5 for d in found)
            total += 1
        absent = next(c for c in tw.SHAPES if c not in cats)
        assert localizer.detect(image, [absent]) == []
    assert found_right >= 0.9 * total  # measured recall on held-out renders: ~0.96


def test_localizer_separates_two_instances_of_one_category(localizer):
    rng = np.random.default_rng(5)
    found_both = 0
    for _ in range(6):
        r = tw.render(tw.sample_target(rng, 2, EVAL, distinct_categories=False, attribute_rate=0.0), 64)
        cats = [tw.Identity.from_id(s.identity).category for s in r.spec.subjects]
        while cats[0] != cats[1]:
            r = tw.render(tw.sample_target(rng, 2, EVAL, distinct_categories=False, attribute_rate=0.0), 64)
            cats = [tw.Identity.from_id(s.identity).category for s in r.spec.subjects]
        analysis = localizer.analyze(Image.fromarray(r.image))
        found_both += len(match_detections(analysis.detections, r.boxes.tolist(), cats)) == 2
    assert found_both >= 5


def test_localizer_analysis_reads_scene_and_attributes(localizer):
    rng = np.random.default_rng(8)
    scenes = attrs = total = 0
    for _ in range(8):
        spec = tw.sample_target(rng, 1, EVAL, attribute_rate=0.5)
        r = tw.render(spec, 64)
        analysis = localizer.analyze(Image.fromarray(r.image))
        assert set(analysis.scene_scores) == set(tw.SCENES)
        assert abs(sum(analysis.scene_scores.values()) - 1.0) < 1e-4
        scenes += analysis.scene == spec.scene
        if analysis.detections:
            said = {k for k, v in analysis.detections[0].attributes.items() if v >= 0.5}
            attrs += said == set(spec.subjects[0].attributes)
            total += 1
    assert scenes >= 7 and total >= 7 and attrs >= total - 2


def test_localizer_maps_boxes_back_to_any_input_size_and_reads_query_words(localizer):
    r = _held_out_renders(1, seed=2)[0]
    cat = tw.Identity.from_id(r.spec.subjects[0].identity).category
    image = Image.fromarray(r.image)
    small = localizer.detect(image, [cat])
    big = localizer.detect(image.resize((128, 96), Image.Resampling.BICUBIC), [f"the red {cat} creature"])
    assert small and big and big[0].label == f"the red {cat} creature"
    x0, y0, x1, y1 = small[0].box
    assert box_iou(big[0].box, (x0 * 2, y0 * 1.5, x1 * 2, y1 * 1.5)) >= 0.6
    assert localizer.detect(image, []) == [] and localizer.detect(image, ["cat"]) == []


def test_match_detections_is_greedy_by_score_and_category():
    from psr.toyworld.perception.localizer import ToyDetection

    dets = [ToyDetection((0, 0, 10, 10), 0.6, "star"), ToyDetection((1, 1, 10, 10), 0.9, "star"),
            ToyDetection((20, 20, 30, 30), 0.8, "heart")]
    assert match_detections(dets, [(0, 0, 10, 10), (20, 20, 30, 30)], ["star", "cross"]) == [(1, 0)]


# ---------------------------------------------------------------------------- weight folders
def test_weight_folders_round_trip(encoder, localizer, tmp_path, rgb_image):
    encoder.save_pretrained(tmp_path / "id")
    localizer.save_pretrained(tmp_path / "loc")
    again = build_feature_extractor("toyworld", path=str(tmp_path / "id"))
    crops = [rgb_image(30, 30, seed=4)]
    assert torch.equal(encoder.embed_images(crops), again.embed_images(crops))
    image = Image.fromarray(_held_out_renders(1)[0].image)
    assert build_localizer("toyworld", path=str(tmp_path / "loc")).analyze(image) == localizer.analyze(image)
    assert json.loads((tmp_path / "id" / "config.json").read_text())["kind"] == "identity"


@pytest.mark.parametrize("build, kind", [(build_feature_extractor, "identity"), (build_localizer, "localizer")])
def test_bad_weight_folders_are_one_line_user_errors(build, kind, tmp_path, encoder):
    with pytest.raises(UserError, match="no such folder") as err:
        build("toyworld", path=str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json is missing"):
        build("toyworld", path=str(tmp_path / "empty"))
    other = "localizer" if kind == "identity" else "identity"
    encoder.save_pretrained(tmp_path / "w")
    if kind == "localizer":
        with pytest.raises(UserError, match=f"holds '{other}' weights"):
            build("toyworld", path=str(tmp_path / "w"))
    (tmp_path / "w" / "config.json").write_text(json.dumps({"kind": kind, "format": 1, "config": {"stem": 8}}))
    with pytest.raises(UserError, match="do not fit"):
        build("toyworld", path=str(tmp_path / "w"))


# ---------------------------------------------------------------------------- psr fit
TINY = {
    "toy-identity": ["batch_size=8", "options.pool=4", "options.refresh=1", "options.eval_identities=8",
                     "options.widths=[8, 8, 16]", "options.stem=8", "options.embed_dim=8", "checkpoint_every=2"],
    "toy-localizer": ["batch_size=4", "options.pool=6", "options.refresh=1", "options.eval_images=3",
                      "options.widths=[8, 8, 8, 8]", "options.head=8", "options.classifier_widths=[8, 8, 8]",
                      "checkpoint_every=2"],
}


def _fit_args(model, out, steps):
    args = ["fit", "--recipe", f"recipes/fit-{model}.toml", "--out", str(out), "--steps", str(steps), "-q"]
    for item in TINY[model]:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("model", ["toy-identity", "toy-localizer"])
def test_fit_runs_writes_weights_and_metrics(model, tmp_path, one_thread, capsys):
    from psr.cli import main

    assert main(_fit_args(model, tmp_path, 3)) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["model"] == model and record["steps"] == 3
    assert np.isfinite(list(record["final_losses"].values())).all()
    assert not (tmp_path / ".fit-checkpoint.pt").exists()
    built = (build_feature_extractor if model == "toy-identity" else build_localizer)("toyworld", path=str(tmp_path))
    assert built is not None
    assert capsys.readouterr().out.startswith(f"{model}: 3 steps")
    # A finished recipe is not retrained; another recipe does not overwrite its weights.
    weights = (tmp_path / "model.safetensors").read_bytes()
    assert main(_fit_args(model, tmp_path, 3)) == 0
    assert "already holds this recipe's weights" in capsys.readouterr().out
    assert main(_fit_args(model, tmp_path, 3) + ["--set", "lr=0.5"]) == 2
    assert "trained by another recipe" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == weights


def test_fit_resumes_from_its_checkpoint(tmp_path, one_thread, monkeypatch):
    from psr.cli import main
    from psr.cli.recipes import load_recipe
    from psr.fit.loop import run_fit
    from psr.fit.toy_identity import ToyIdentityFitter

    seen, original = [], ToyIdentityFitter.train_step

    def dies_at_3(self, step):
        if step == 3 and not seen.count("resumed"):
            raise KeyboardInterrupt
        seen.append(step)
        return original(self, step)

    monkeypatch.setattr(ToyIdentityFitter, "train_step", dies_at_3)
    overrides = TINY["toy-identity"] + [f"out='{tmp_path}'", "steps=5"]
    recipe = load_recipe("fit", "recipes/fit-toy-identity.toml", overrides)
    with pytest.raises(KeyboardInterrupt):  # a kill between checkpoints
        run_fit(recipe, show_progress=False)
    assert seen == [0, 1, 2] and (tmp_path / ".fit-checkpoint.pt").is_file()
    assert not (tmp_path / "metrics.json").exists()
    assert main(_fit_args("toy-identity", tmp_path, 5) + ["--set", "lr=0.1"]) == 2  # another recipe
    seen.append("resumed")
    assert main(_fit_args("toy-identity", tmp_path, 5)) == 0
    assert seen == [0, 1, 2, "resumed", 2, 3, 4]  # continued from the step-2 checkpoint
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 5


def test_fit_recipe_errors_name_the_key():
    from psr.cli.recipes import load_recipe
    from psr.errors import RecipeError

    with pytest.raises(RecipeError, match="options.crp: unknown key"):
        load_recipe("fit", "recipes/fit-toy-identity.toml", ["options.crp=3"])
    with pytest.raises(RecipeError, match="batch_size: must be an even number"):
        load_recipe("fit", "recipes/fit-toy-identity.toml", ["batch_size=13"])
    with pytest.raises(RecipeError, match="size: must be a multiple of 16"):
        load_recipe("fit", "recipes/fit-toy-localizer.toml", ["size=72"])
    with pytest.raises(UserError, match="did you mean 'toy-localizer'"):
        load_recipe("fit", "recipes/fit-toy-identity.toml", ["model=toy-localiser"])


def test_localizer_scene_sampler_repeats_categories_and_leaves_images_empty():
    rng = np.random.default_rng(0)
    specs = [localizer_scene(rng, EVAL, empty_rate=0.1) for _ in range(200)]
    assert any(not s.subjects for s in specs)
    repeated = [s for s in specs if len({tw.Identity.from_id(x.identity).shape for x in s.subjects}) < len(s.subjects)]
    assert repeated
