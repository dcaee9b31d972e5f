"""psr synth: the dataset format, ground truth, resume after a kill, PSRBench export."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from psr import toyworld as tw
from psr.cli import main
from psr.cli.recipes import load_recipe
from psr.synth.dataset import SynthDataset, rle_decode, rle_encode
from psr.workflows.synth import run_synth

ROOT = Path(__file__).parent.parent
TOY = str(ROOT / "recipes" / "synth-toy.toml")
BENCH = str(ROOT / "recipes" / "bench-toy.toml")


def _synth(out, n, *overrides):
    recipe = load_recipe("synth", TOY, ["shard_size=20", "workers=1", *overrides])
    return run_synth(recipe, str(out), n, show_progress=False)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mask, counts", [
    ([[0, 0], [0, 0]], [4]),
    ([[1, 1], [1, 1]], [0, 4]),
    ([[0, 1], [1, 0]], [1, 2, 1]),
    ([[1, 0, 0], [0, 1, 1]], [0, 1, 3, 2]),
])
def test_rle_known_answers(mask, counts):
    mask = np.array(mask, dtype=bool)
    assert rle_encode(mask) == {"size": list(mask.shape), "counts": counts}
    assert np.array_equal(rle_decode(rle_encode(mask)), mask)


def test_same_recipe_same_bytes_however_the_work_is_split(tmp_path):
    _synth(tmp_path / "a", 50)
    _synth(tmp_path / "b", 50, "workers=2")
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.pop("recipe.toml") != b.pop("recipe.toml")  # records the worker count, nothing else differs
    assert a.keys() == b.keys() and a == b
    rows = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(50))
    assert {len(r["subjects"]) for r in rows} == {1, 2, 3, 4}


def test_rows_carry_exact_ground_truth(tmp_path):
    _synth(tmp_path, 12)
    data = SynthDataset(tmp_path)
    assert len(data) == 12 and len(data.report) == 0
    for item in data:
        row = item["row"]
        example = tw.Example.from_dict(row["extra"]["example"])
        render = tw.render(example.target, 64)
        assert np.array_equal(item["target"], render.image)  # re-renders to the stored bytes
        assert item["masks"].shape == (len(row["subjects"]), 64, 64)
        for k, subject in enumerate(row["subjects"]):
            mask = item["masks"][k]
            assert np.array_equal(mask, render.masks[k])
            ys, xs = np.nonzero(mask)
            assert subject["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # box from mask
            assert subject["identity"] == example.target.subjects[k].identity
            ref = tw.render(example.references[k], 64)
            assert np.array_equal(item["references"][k], ref.image)
            # Correspondences land on the same subject in the reference (8x8 token grid).
            ref_tokens = ref.masks[0].reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()
            tgt_tokens = mask.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()
            for r, t in subject["correspondence"]["pairs"]:
                assert tgt_tokens[t] > 0.5 and ref_tokens[r] > 0
        if row["extra"]["relation"]:
            assert tw.relation_holds(row["subjects"][0]["box"], row["subjects"][1]["box"], row["extra"]["relation"])


def test_rerun_does_nothing_and_other_recipe_is_refused(tmp_path, capsys):
    _synth(tmp_path, 30)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    _synth(tmp_path, 30)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert {p for p in before if "shards" in str(p)} == {p for p in after if "shards" in str(p)}
    assert all(before[p] == after[p] for p in before if "shards" in str(p) or "manifest/" in str(p))
    capsys.readouterr()
    code = main(["synth", "--recipe", TOY, "--out", str(tmp_path), "-n", "30", "--set", "seed=5", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another recipe" in err[0]


def test_growing_num_samples_extends_without_duplicates(tmp_path):
    _synth(tmp_path / "grown", 25)
    _synth(tmp_path / "grown", 50)
    _synth(tmp_path / "clean", 50)
    assert (tmp_path / "grown" / "manifest.jsonl").read_bytes() == (tmp_path / "clean" / "manifest.jsonl").read_bytes()


def test_killed_run_resumes_to_exactly_the_clean_rows(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "psr", "synth", "--recipe", TOY, "--out", str(out), "-n", "400",
           "--set", "shard_size=20", "--set", "workers=1", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "manifest").glob("0*.jsonl"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "manifest").glob("0*.jsonl")))
    assert 3 <= finished < 20, "the kill should land mid-run"
    assert not (out / "manifest.jsonl").exists()
    assert subprocess.run(cmd, cwd=ROOT).returncode == 0
    _synth(tmp_path / "clean", 400)
    resumed = (out / "manifest.jsonl").read_text().splitlines()
    assert resumed == (tmp_path / "clean" / "manifest.jsonl").read_text().splitlines()
    assert len({json.loads(line)["id"] for line in resumed}) == 400
    assert not list((out / "shards").glob(".tmp-*"))
    assert _tree(out / "shards") == _tree(tmp_path / "clean" / "shards")


def test_corrupt_rows_are_skipped_and_reported(tmp_path):
    _synth(tmp_path, 6)
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    rows[1]["subjects"][0]["box"] = [0, 0, 99, 10]
    rows[2]["target"] = "shards/none.png"
    rows[3]["prompt"] = " "
    rows[4]["subjects"][0]["mask"]["size"] = [8, 8]
    text = "\n".join([json.dumps(rows[0]), json.dumps(rows[1]), json.dumps(rows[2]), json.dumps(rows[3]),
                      json.dumps(rows[4]), "{not json", json.dumps(rows[5])]) + "\n"
    (tmp_path / "manifest.jsonl").write_text(text)
    data = SynthDataset(tmp_path)
    assert len(data) == 2 and len(data.report) == 5
    reasons = " | ".join(r for _, r in data.report.skipped)
    for expected in ("outside the 64x64 image", "missing image file", "empty prompt", "mask size", "not JSON"):
        assert expected in reasons
    assert "5 rows skipped" in data.report.summary()
    # An image that breaks after validation is reported at read time; the next row is served.
    Path(tmp_path / rows[0]["target"]).write_bytes(b"garbage")
    item = data[0]
    assert item["row"]["id"] == rows[5]["id"] and len(data.report) == 6


def test_psrbench_export_schema_and_reader(tmp_path):
    recipe = load_recipe("synth", BENCH, ["bench.samples_per_subset=5"])
    run_synth(recipe, str(tmp_path), show_progress=False)
    subsets = ["Attribute", "Action", "Background", "Position", "Complex", "Three", "Four"]
    assert sorted(p.stem for p in tmp_path.glob("*.json") if p.stem != "bench") == sorted(subsets)
    lo, hi = tw.DEFAULT_ID_RANGES["eval"]
    for subset in subsets:
        items = json.loads((tmp_path / f"{subset}.json").read_text())
        assert len(items) == 5
        n = {"Three": 3, "Four": 4}.get(subset, 2)
        for k, item in enumerate(items):
            assert isinstance(item["instruction"], str) and item["instruction"]
            assert len(item["input_path"]) == n and all((tmp_path / p).is_file() for p in item["input_path"])
            assert [item[f"category{i + 1}"] for i in range(n)] == [s["category"] for s in item["gt"]["subjects"]]
            assert f"category{n + 1}" not in item
            assert all(lo <= s["identity"] < hi for s in item["gt"]["subjects"])  # held-out identities
            if subset in ("Position", "Complex"):
                assert item["position"] == tw.RELATIONS[k % 5] == item["gt"]["relation"]
                boxes = [s["box"] for s in item["gt"]["subjects"]]
                assert tw.relation_holds(boxes[0], boxes[1], item["position"])
            else:
                assert "position" not in item
            if subset == "Attribute":
                assert all(s["attributes"] for s in item["gt"]["subjects"])
            if subset == "Action":
                assert all(s["action"] in item["instruction"] for s in item["gt"]["subjects"])
    data = SynthDataset(tmp_path)
    assert len(data) == 35 and len(data.report) == 0
    assert data[0]["target"].shape == (64, 64, 3)


def test_bench_and_training_data_never_share_identities_or_seeds():
    train = load_recipe("synth", TOY)
    bench = load_recipe("synth", BENCH)
    assert train.toyworld.id_split == "train" and bench.toyworld.id_split == "eval"
    t_lo, t_hi = tw.DEFAULT_ID_RANGES["train"]
    e_lo, e_hi = tw.DEFAULT_ID_RANGES["eval"]
    assert t_hi <= e_lo
    assert train.seed + 10_000_000 < bench.seed  # seeds of any realistic training run stay below


def test_synth_bad_inputs_exit_2(tmp_path, capsys):
    cases = [
        (["--recipe", TOY, "--out", str(tmp_path), "-n", "0"], "--num-samples"),
        (["--recipe", TOY, "--out", str(tmp_path), "--set", "toyworld.size=100"], "toyworld.size: must be 64 or 128"),
        (["--recipe", TOY, "--out", str(tmp_path), "--set", "source=toyworl"], "did you mean 'toyworld'"),
        (["--recipe", BENCH, "--out", str(tmp_path), "--set", "bench.subsets=['Foo']"], "unknown subset 'Foo'"),
        (["--recipe", TOY, "--out", str(tmp_path / "f" / "x")], None),
    ]
    (tmp_path / "f").write_text("file")
    for argv, message in cases:
        code = main(["synth", *argv, "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("psr: error:"), (argv, err)
        if message:
            assert message in err[0]


def test_psr_pipeline_recipe_runs_end_to_end_with_tiny_models(tmp_path):
    recipe = load_recipe("synth", str(ROOT / "recipes" / "synth-psr-tiny.toml"), ["num_samples=2"])
    summary = run_synth(recipe, str(tmp_path), show_progress=False)
    assert summary["rows"] + summary["rejected"] == 2
    data = SynthDataset(tmp_path)
    assert len(data) == summary["rows"] and len(data.report) == 0
    for item in data:
        assert item["row"]["provenance"]["generator"]
        assert len(item["references"]) == 2 and item["target"].shape[:2] == (128, 128)
