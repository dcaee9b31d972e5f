"""psr eval: generation + scoring of a PSRBench-format bench, resumability, the cache,
the PSRBench schema round trip, failures that are listed (never skipped), bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psr.cli import main
from psr.errors import UserError

SUBSETS = ["Attribute", "Position", "Three"]


def _have_toyworld() -> bool:
    from psr.core.detect import LOCALIZERS
    from psr.core.features import FEATURE_EXTRACTORS

    if "toyworld" not in FEATURE_EXTRACTORS or "toyworld" not in LOCALIZERS:
        return False
    from psr.toyworld.perception import IDENTITY_ASSETS, LOCALIZER_ASSETS

    return (IDENTITY_ASSETS / "config.json").is_file() and (LOCALIZER_ASSETS / "config.json").is_file()


def _components() -> tuple[str, str]:
    """TOML inline tables of the scoring components: ToyWorld's trained ones when shipped,
    else random-init tiny DINO and Grounding DINO."""
    if _have_toyworld():
        return '{name = "toyworld"}', '{name = "toyworld"}'
    return '{name = "dino", tiny = true}', '{name = "grounding-dino", tiny = true, max_detections = 6}'


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    assert main(["synth", "--recipe", "recipes/bench-toy.toml", "--out", str(folder), "-q",
                 "--set", "bench.samples_per_subset=2", "--set", f"bench.subsets={json.dumps(SUBSETS)}"]) == 0
    return folder


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "eval.toml"
    path.write_text('command = "eval"\ndevice = "cpu"\nextractor = %s\nlocalizer = %s\n'
                    '[model]\npreset = "tiny"\ndevice = "cpu"\n[sample]\nsteps = 2\nheight = 32\nwidth = 32\n'
                    % _components())
    return str(path)


def _eval(recipe, bench, out, *extra):
    return main(["eval", "--recipe", recipe, "--bench", str(bench), "--out", str(out), "-q", "--device", "cpu",
                 *extra])


def _results(out):
    return json.loads((out / "results.json").read_text())


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*.png"))}


def test_eval_end_to_end_then_rerun_makes_and_computes_nothing(bench, recipe, tmp_path, one_thread, capsys):
    out = tmp_path / "out"
    assert _eval(recipe, bench, out) == 0
    printed = capsys.readouterr().out
    assert "| Position | 2 | 2 |" in printed and "**overall**" in printed
    images = _snapshot(out / "images")
    assert sorted(images) == [f"{s}/{i:04d}.png" for s in SUBSETS for i in range(2)]
    for subset in SUBSETS:
        written = json.loads((out / f"{subset}.json").read_text())
        original = json.loads((bench / f"{subset}.json").read_text())
        assert [{k: v for k, v in item.items() if k != "result_path"} for item in written] == original
        assert [item["result_path"] for item in written] == [f"images/{subset}/{i:04d}.png" for i in range(2)]
        assert (out / "sheets" / f"{subset}.png").is_file()
    results = _results(out)
    assert results["generated"] == 6 and results["cache"]["misses"] > 0
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert sorted((r["subset"], r["index"]) for r in samples) == sorted((s, i) for s in SUBSETS for i in range(2))
    for subset in SUBSETS:
        row = results["subsets"][subset]
        assert (row["items"], row["samples"]) == (2, 2)
        assert row["counts"]["cons_psrbench"] == row["counts"]["cons_hungarian"] == 2
    assert "pos_exact" in results["subsets"]["Position"]["means"]
    assert "pos_exact" not in results["subsets"]["Three"]["means"]
    assert results["subsets"]["Three"]["counts"]["id_acc"] == 2
    assert (out / "results.md").read_text().startswith("# psr eval: model outputs")

    assert _eval(recipe, bench, out) == 0
    assert _snapshot(out / "images") == images  # same files, same bytes, untouched
    again = _results(out)
    assert again["generated"] == 0
    assert again["cache"]["misses"] == 0 and again["cache"]["hits"] > 0
    assert again["components_built"] == []
    assert again["subsets"] == results["subsets"]

    # A killed run resumes: only the missing image is made; it has the same seed, hence the
    # same bytes, so its scores still come from the content-keyed cache.
    (out / "images" / "Three" / "0001.png").unlink()
    assert _eval(recipe, bench, out) == 0
    resumed = _results(out)
    assert resumed["generated"] == 1 and resumed["cache"]["misses"] == 0
    after = _snapshot(out / "images")
    assert {k: v for k, v in after.items() if k != "Three/0001.png"} == {
        k: v for k, v in images.items() if k != "Three/0001.png"}
    assert after["Three/0001.png"][1] == images["Three/0001.png"][1]  # same seed, same pixels


def _psrbench_schema_bench(source, folder, result_for):
    """A bench in PSRBench's public schema only (no ground truth), each item with a
    result_path chosen by `result_for(k, item)`, plus a key psr does not know."""
    folder.mkdir()
    items = json.loads((source / "Position.json").read_text())
    shutil.copytree(source / "images", folder / "images")
    plain = []
    for k, item in enumerate(items):
        entry = {"instruction": item["instruction"], "input_path": item["input_path"],
                 "category1": item["category1"], "category2": item["category2"],
                 "position": item["position"], "result_path": result_for(k, item),
                 "note": {"judge": 7.5, "tags": ["ü", None]}}
        plain.append(entry)
    (folder / "Position.json").write_text(json.dumps(plain, ensure_ascii=False))
    return plain


def test_score_only_keeps_the_psrbench_schema_and_lists_unreadable_results(bench, recipe, tmp_path, one_thread):
    folder = tmp_path / "plain"
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    paths = [None, str(tmp_path / "broken.png")]
    plain = _psrbench_schema_bench(bench, folder, lambda k, item: paths[k] or item["gt_target_path"])
    out = tmp_path / "out"
    assert _eval(recipe, folder, out, "--score-only") == 0
    assert json.loads((out / "Position.json").read_text()) == plain
    results = _results(out)
    row = results["subsets"]["Position"]
    assert (row["items"], row["samples"], row["failed"]) == (2, 2, 1)
    assert "id_acc" not in row["means"] and "pos_psrbench" in row["means"]  # no ground truth: n/a
    [failure] = results["failures"]
    assert (failure["index"], failure["stage"]) == (1, "image") and "not an image" in failure["reason"]
    samples = json.loads((out / "samples.json").read_text())["samples"]
    broken = next(r for r in samples if r["index"] == 1)
    assert broken["scores"]["cons_psrbench"] == 0.0 and broken["scores"]["pos_exact"] == 0.0
    assert "not an image" in (out / "results.md").read_text()


def test_missing_result_and_unknown_relation_are_listed(bench, recipe, tmp_path, one_thread):
    folder = tmp_path / "plain"
    plain = _psrbench_schema_bench(bench, folder, lambda k, item: "nowhere/0.png" if k == 0 else item["gt_target_path"])
    plain[1]["position"] = "diagonally across from"
    (folder / "Position.json").write_text(json.dumps(plain))
    out = tmp_path / "out"
    assert _eval(recipe, folder, out, "--score-only") == 0
    failures = {(f["index"], f["stage"]): f["reason"] for f in _results(out)["failures"]}
    assert "no such file" in failures[(0, "image")]
    assert "diagonally across from" in failures[(1, "position")]
    assert _results(out)["subsets"]["Position"]["samples"] == 2


def test_oracle_scores_higher_than_noise_and_compare_reports_the_gap(bench, recipe, tmp_path, one_thread, capsys):
    if not _have_toyworld():
        pytest.skip("needs the ToyWorld identity encoder and localizer (random-init DINO ranks nothing)")
    oracle = tmp_path / "oracle"
    assert _eval(recipe, bench, oracle, "--oracle") == 0
    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()

    def noise(k, item):
        path = noise_dir / f"{k}.png"
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        return str(path)

    _psrbench_schema_bench(bench, tmp_path / "plain", noise)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _eval(recipe, tmp_path / "plain", out, "--score-only", "--compare", str(oracle / "results.json")) == 0
    assert "## Gap: this run" in capsys.readouterr().out
    top = _results(oracle)["subsets"]["Position"]["means"]
    bottom = _results(out)["subsets"]["Position"]["means"]
    assert top["cons_hungarian"] > bottom["cons_hungarian"] + 0.2
    assert top["cons_psrbench"] > bottom["cons_psrbench"] + 0.2
    assert _results(out)["compare"]["gap"]["Position"]["cons_hungarian"] < -0.2
    oracle_three = _results(oracle)["subsets"]["Three"]["means"]
    assert oracle_three["id_acc"] >= 0.5 and oracle_three["count_ok"] >= 0.5 and oracle_three["scene_ok"] >= 0.5
    assert "id_acc" not in bottom  # the PSRBench-schema copy has no ground truth


def test_reconstruct_scores_the_vae_round_trip_of_the_targets_and_resumes(bench, recipe, tmp_path, one_thread,
                                                                          capsys):
    # The embedded preset's ToyWorld-trained VAE, at the bench's own 64 px: its reconstructions
    # are close to the targets (a random VAE would give noise, so this pins encode → decode).
    out = tmp_path / "rt"
    extra = ("--set", 'model.preset="embedded"', "--set", "sample.height=64", "--set", "sample.width=64")
    assert _eval(recipe, bench, out, "--reconstruct", *extra) == 0
    assert capsys.readouterr().out.startswith("# psr eval: VAE reconstructions of the ground-truth targets")
    results = _results(out)
    assert results["mode"] == "reconstruct" and results["generated"] == 2 * len(SUBSETS)
    for subset in SUBSETS:
        for item in json.loads((out / f"{subset}.json").read_text()):
            made = np.asarray(Image.open(out / item["result_path"]).convert("RGB"), np.float32)
            target = np.asarray(Image.open(bench / item["gt_target_path"]).convert("RGB"), np.float32)
            assert made.shape == target.shape and np.abs(made - target).mean() < 20
    assert "id_acc" in results["subsets"]["Three"]["means"]
    images = _snapshot(out / "images")
    assert _eval(recipe, bench, out, "--reconstruct", *extra) == 0
    assert _results(out)["generated"] == 0 and _snapshot(out / "images") == images
    # Generating into the same folder would mix two kinds of image: refused.
    assert _eval(recipe, bench, out, *extra) == 2
    assert "holds images made with another model" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("empty", "holds no subset files"),
    ("subset", "subset 'Postion': not in bench"),
    ("categories", "2 input_path entries but 1 category keys"),
    ("limit", "--limit 0: must be >= 1"),
    ("compare", "--compare"),
    ("stamp", "holds images made with another model"),
    ("two modes", "--oracle and --reconstruct: choose one of them"),
    ("no targets", "--reconstruct: the bench has no gt_target_path"),
])
def test_bad_input_exits_2_with_one_line(case, message, bench, recipe, tmp_path, capsys):
    folder, extra = tmp_path / "b", []
    if case == "missing":
        folder = tmp_path / "nothing"
    elif case == "empty":
        folder.mkdir()
        (folder / "bench.json").write_text("{}")
    elif case == "categories":
        folder.mkdir()
        item = json.loads((bench / "Position.json").read_text())[0]
        del item["category2"]
        (folder / "Position.json").write_text(json.dumps([item]))
    elif case == "two modes":
        folder, extra = bench, ["--oracle", "--reconstruct"]
    elif case == "no targets":
        _psrbench_schema_bench(bench, folder, lambda k, item: item["gt_target_path"])
        extra = ["--reconstruct"]
    elif case == "stamp":
        folder = bench
        _made_by_another_generator(tmp_path / "out")
    else:
        folder = bench
        extra = {"subset": ["--subsets", "Postion"], "limit": ["--limit", "0"],
                 "compare": ["--compare", str(tmp_path / "none.json")]}[case]
    capsys.readouterr()
    assert _eval(recipe, folder, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("psr: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out" / "results.json").exists()


def _made_by_another_generator(out):
    """An output folder holding an image made with another model, with its recipe."""
    (out / "images" / "Position").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(out / "images" / "Position" / "0000.png")
    (out / "eval.json").write_text('{"generator": "0123456789abcdef"}')
    (out / "recipe.toml").write_text("# the recipe that made the images\n")


def test_a_refused_rerun_leaves_the_folder_and_its_recipe_as_they_were(bench, recipe, tmp_path, capsys):
    out = tmp_path / "out"
    _made_by_another_generator(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _eval(recipe, bench, out) == 2
    assert "holds images made with another model" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_mistyped_weights_path_writes_nothing_and_a_stamp_alone_does_not_block(bench, recipe, tmp_path, capsys,
                                                                                 one_thread):
    out = tmp_path / "out"
    assert _eval(recipe, bench, out, "--weights", str(tmp_path / "rnu" / "final")) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not out.exists()
    # A folder holding only the metadata of a run that failed at start (another setup's
    # stamp and recipe, no image, no results) takes the corrected command.
    out.mkdir()
    (out / "eval.json").write_text('{"generator": "0123456789abcdef"}')
    (out / "recipe.toml").write_text("# a run that failed to load its weights\n")
    assert _eval(recipe, bench, out, "--subsets", "Position", "--limit", "1") == 0
    assert _results(out)["generated"] == 1
    assert json.loads((out / "eval.json").read_text())["generator"] != "0123456789abcdef"


def test_subset_files_with_a_byte_order_mark_are_read_and_other_files_are_refused(bench, tmp_path):
    from psr.eval.bench import load_bench

    folder = tmp_path / "b"
    shutil.copytree(bench, folder)
    text = (folder / "Position.json").read_text(encoding="utf-8")
    (folder / "Position.json").write_text(text, encoding="utf-8-sig")  # as some editors save it
    assert list(load_bench(folder).subsets) == SUBSETS  # bench.json, a table, is passed over
    assert [it.instruction for it in load_bench(folder).subsets["Position"]] == \
        [it["instruction"] for it in json.loads(text)]
    for name, content, message in [
        ("Three.json", '{"items": []}', "holds a JSON object, not a list of items"),  # a subset's name
        ("Extra.json", "[{\"instruction\": 1", "invalid JSON"),
        ("notes.json", '"not a table"', "holds a string, not a list of items"),
    ]:
        bad = folder / name
        saved = bad.read_bytes() if bad.exists() else None
        bad.write_text(content)
        with pytest.raises(UserError) as err:
            load_bench(folder)
        assert str(bad) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)
        if saved is None:
            bad.unlink()
        else:
            bad.write_bytes(saved)
    (folder / "Mine.json").write_text('{"a": 1}')
    with pytest.raises(UserError, match="Mine.json: holds a JSON object"):  # asked for by name
        load_bench(folder, ["Mine"])


def test_eval_write_failures_are_one_line(bench, recipe, tmp_path, monkeypatch, capsys, one_thread):
    # The disk fills up while scoring: the results cannot be written. One line names the
    # file and the reason; the file is not left half-written.
    import errno
    import os

    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("results.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _eval(recipe, bench, out, "--oracle", "--subsets", "Position", "--limit", "1") == 2
    err = capsys.readouterr().err
    assert err == f"psr: error: cannot write {out / 'results.json'}: No space left on device\n"
    assert not (out / "results.json").exists() and not list(out.glob(".tmp-*"))


def test_a_failing_component_is_listed_and_penalised(bench, tmp_path, monkeypatch, one_thread):
    from psr.core.detect import LOCALIZERS

    class Broken:
        def detect(self, image, queries):
            raise RuntimeError("detector crashed\nsecond line")

    monkeypatch.setitem(LOCALIZERS, "broken", lambda device="cpu", **options: Broken())
    recipe = tmp_path / "r.toml"
    recipe.write_text('command = "eval"\n[extractor]\nname = "dino"\ntiny = true\n[localizer]\nname = "broken"\n')
    out = tmp_path / "out"
    assert _eval(str(recipe), bench, out, "--oracle", "--subsets", "Three") == 0
    results = _results(out)
    assert results["subsets"]["Three"]["failed"] == results["subsets"]["Three"]["samples"] == 2
    assert {(f["stage"], f["reason"]) for f in results["failures"]} == {("subjects", "RuntimeError: detector crashed")}
    assert results["subsets"]["Three"]["means"]["cons_hungarian"] == 0.0


def test_psrbench_box_rule_and_instances():
    from psr.eval.scoring import instances_from, psrbench_boxes

    def det(x, label, score):
        return {"box": [x, 0, x + 4, 4], "score": score, "label": label}

    found = {"cat": [det(0, "cat", 0.9), det(10, "cat", 0.8)], "dog": [det(20, "dog", 0.7)]}
    # The second cat takes the second-best cat box; a third would have none.
    assert psrbench_boxes(["cat", "dog", "cat", "cat"], found) == [[0, 0, 4, 4], [20, 0, 24, 4], [10, 0, 14, 4], None]
    assert [d["box"][0] for d in instances_from(found, 1)] == [0, 20]
    assert [d["box"][0] for d in instances_from(found, 8)] == [0, 10, 20]


def test_overall_is_the_mean_of_subset_means():
    from psr.eval.report import aggregate

    records = [{"subset": s, "index": i, "seed": 0, "image": None, "failures": [], "details": {},
                "scores": {"cons_hungarian": v}} for s, i, v in [("A", 0, 1.0), ("A", 1, 0.0), ("B", 0, 1.0)]]
    result = aggregate(records, ["A", "B"], ["cons_hungarian", "id_acc"])
    assert result["subsets"]["A"]["means"] == {"cons_hungarian": 0.5}
    assert result["overall"]["means"] == {"cons_hungarian": 0.75}
    assert result["overall"]["samples"] == 3 and result["overall"]["counts"] == {"cons_hungarian": 3}


def test_identity_failures_are_named_by_the_first_check_missed_and_tallied():
    from psr.eval.report import aggregate, markdown
    from psr.eval.scoring import identity_failure_reason

    sim = np.array([[0.9, 0.2], [0.6, 0.4]])  # [instances, references]
    assert identity_failure_reason(sim, 0, None, 0.5) == "no_instance"
    assert identity_failure_reason(sim, 1, 1, 0.5) == "other_reference"  # instance 1 looks more like reference 0
    assert identity_failure_reason(np.array([[0.3, 0.1]]), 0, 0, 0.5) == "below_threshold"
    assert identity_failure_reason(sim, 0, 0, 0.5) is None  # the check passes

    def subject(ok, why=None):
        return {"identity_ok": ok, "identity_failure": why}

    records = [
        {"subset": "A", "index": 0, "seed": 0, "image": None, "failures": [], "scores": {"id_acc": 0.5},
         "details": {"subjects": [subject(True), subject(False, "no_instance")]}},
        {"subset": "A", "index": 1, "seed": 0, "image": None, "failures": [], "scores": {"id_acc": 0.0},
         "details": {"subjects": [subject(False, "below_threshold"), subject(False, "no_instance")]}},
        {"subset": "B", "index": 0, "seed": 0, "image": None, "failures": [], "scores": {},
         "details": {"subjects": [subject(None), subject(None)]}},  # no ground truth: no check
    ]
    result = aggregate(records, ["A", "B"], ["id_acc"])
    assert result["subsets"]["A"]["identity"] == {"subjects": 4, "ok": 1, "no_instance": 2,
                                                  "other_reference": 0, "below_threshold": 1}
    assert "identity" not in result["subsets"]["B"]
    assert result["overall"]["identity"]["subjects"] == 4
    text = markdown({**result, "mode": "generate", "bench": "b", "metrics": ["id_acc"], "penalty": 0.0})
    assert "| A | 4 | 0.250 | 0.500 | 0.000 | 0.250 |" in text
    # Without ground truth there is no table.
    plain = aggregate(records[2:], ["B"], ["id_acc"])
    assert "Why identity" not in markdown({**plain, "mode": "generate", "bench": "b", "metrics": ["id_acc"],
                                           "penalty": 0.0})


def test_clip_t_and_aesthetic_columns_are_scored_and_cached(bench, recipe, tmp_path, one_thread):
    folder = tmp_path / "plain"
    _psrbench_schema_bench(bench, folder, lambda k, item: item["gt_target_path"])
    extra = ["--score-only", "--set", "clip_t.enabled=true", "--set", "clip_t.options={tiny=true}",
             "--set", "aesthetic.enabled=true",
             "--set", 'aesthetic.options={allow_random_head=true, extractor={name="clip", tiny=true}}']
    out = tmp_path / "out"
    assert _eval(recipe, folder, out, *extra) == 0
    means = _results(out)["subsets"]["Position"]["means"]
    assert -1.0 <= means["clip_t"] <= 1.0 and 0.0 < means["aesthetic"] < 1.0
    assert _eval(recipe, folder, out, *extra) == 0
    assert _results(out)["cache"]["misses"] == 0 and _results(out)["subsets"]["Position"]["means"] == means


def test_clip_t_without_weights_is_a_recipe_error(bench, recipe, tmp_path, capsys):
    assert _eval(recipe, bench, tmp_path / "out", "--set", "clip_t.enabled=true") == 2
    assert "clip_t.options: name the weights" in capsys.readouterr().err


def test_extra_rewards_are_reported_as_columns(bench, recipe, tmp_path, one_thread):
    folder = tmp_path / "plain"
    _psrbench_schema_bench(bench, folder, lambda k, item: item["gt_target_path"])
    extractor, localizer = _components()
    with_rewards = tmp_path / "rewards.toml"
    with_rewards.write_text(Path(recipe).read_text() + "".join(
        f'[[rewards]]\nname = "{name}"\nlabel = "{label}"\n'
        f'options = {{extractor = {extractor}, localizer = {localizer}}}\n'
        for name, label in (("hungarian", "mc"), ("psr", "psr"))))
    out = tmp_path / "out"
    assert _eval(str(with_rewards), folder, out, "--score-only", "--set", "protocol='psr'") == 0
    results = _results(out)
    means = results["subsets"]["Position"]["means"]
    assert {"reward:mc", "reward:psr"} <= set(means) and results["metrics"][-2:] == ["reward:mc", "reward:psr"]
    # REWARDS["psr"] on the same components is psr eval's consistency under protocol "psr"
    # (one box per category here), computed by the rewards package itself.
    assert means["reward:psr"] == pytest.approx(means["cons_psrbench"], abs=1e-5)


def test_the_psrbench_columns_follow_the_named_protocol_and_say_so(bench, recipe, tmp_path, one_thread):
    folder = tmp_path / "plain"
    _psrbench_schema_bench(bench, folder, lambda k, item: item["gt_target_path"])
    runs = {}
    for protocol in ("psrbench", "psr"):
        out = tmp_path / protocol
        assert _eval(recipe, folder, out, "--score-only", "--set", f"protocol='{protocol}'") == 0
        runs[protocol] = _results(out)
        assert runs[protocol]["protocol"] == protocol
        assert f"protocol `{protocol}`" in (out / "results.md").read_text()
    a, b = (runs[p]["subsets"]["Position"]["means"] for p in ("psrbench", "psr"))
    # psr's own columns do not depend on the protocol.
    assert a["cons_hungarian"] == b["cons_hungarian"] and a["pos_exact"] == b["pos_exact"]
    assert {"cons_psrbench", "pos_psrbench"} <= set(a) & set(b)


def test_psrbench_position_needs_a_phrase_of_its_list_in_the_instruction(bench, recipe, tmp_path, one_thread):
    folder = tmp_path / "plain"
    _psrbench_schema_bench(bench, folder, lambda k, item: item["gt_target_path"])
    items = json.loads((folder / "Position.json").read_text())
    for item in items:  # a relation PSRBench's list lacks: the item has no PSRBench position score
        item["instruction"] = "the two creatures next to each other"
    (folder / "Position.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    assert _eval(recipe, folder, out, "--score-only") == 0
    means = _results(out)["subsets"]["Position"]["means"]
    assert "pos_psrbench" not in means and "pos_exact" in means


def test_clip_t_takes_the_architecture_as_name_as_the_docs_write_it(bench, recipe, tmp_path, one_thread):
    folder = tmp_path / "plain"
    _psrbench_schema_bench(bench, folder, lambda k, item: item["gt_target_path"])
    out = tmp_path / "out"
    assert _eval(recipe, folder, out, "--score-only", "--set", "clip_t.enabled=true",
                 "--set", 'clip_t.options={name="ViT-B-32", tiny=true}') == 0
    assert "clip_t" in _results(out)["subsets"]["Position"]["means"]


def test_clip_t_with_name_and_arch_is_one_line(bench, recipe, tmp_path, capsys):
    assert _eval(recipe, bench, tmp_path / "out", "--set", "clip_t.enabled=true",
                 "--set", 'clip_t.options={name="ViT-B-32", arch="ViT-B-16", tiny=true}') == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "name or arch, not both" in err
