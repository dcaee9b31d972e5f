"""psr synth and the dataset reader under faults: damaged shards are redone to the same
bytes, one run per folder, a full disk, rows of the wrong types."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from doubles import fail_writes_after

from psr.cli import main
from psr.core.runlock import LOCK_NAME, RunLock
from psr.errors import UserError
from psr.synth import dataset as ds
from psr.synth.dataset import SynthDataset
from psr.train.data import TrainRows, open_dataset

ROOT = Path(__file__).parent.parent
TOY = str(ROOT / "recipes" / "synth-toy.toml")


def _argv(out, n):
    return ["synth", "--recipe", TOY, "--out", str(out), "-n", str(n), "--set", "shard_size=20",
            "--set", "workers=1", "-q"]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """An undamaged run of 60 samples in 3 shards: what every repaired run must equal."""
    out = tmp_path_factory.mktemp("clean") / "data"
    assert main(_argv(out, 60)) == 0
    return out


def _copy(clean, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(clean, out)
    return out


def _rerun(out, capsys) -> list[str]:
    capsys.readouterr()
    assert main(_argv(out, 60)) == 0
    return capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------------------- damaged shards
def test_a_damaged_manifest_part_is_redone_to_the_same_bytes(clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    part0, part1, part2 = (out / "manifest" / f"0000{k}.jsonl" for k in range(3))
    part0.write_bytes(b"")                                       # emptied
    part1.write_bytes(part1.read_bytes()[:150])                  # cut off mid-row
    part2.write_bytes(b"\xff\xfe\x00 not a manifest")            # garbage
    (out / "dataset.json").write_bytes(b'{"recipe_ha')           # and a cut-off summary
    err = _rerun(out, capsys)
    redone = [line for line in err if line.startswith("psr synth: shard")]
    assert [line.split()[3] for line in redone] == ["00000", "00001", "00002"], err
    assert all("damaged" in line and "redoing it" in line for line in redone)
    assert _tree(out) == _tree(clean)


def test_only_the_damaged_shard_is_redone(clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    part = out / "manifest" / "00001.jsonl"
    part.write_bytes(part.read_bytes()[:-40])
    kept = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.png") if "00001" not in p.parent.name}
    err = _rerun(out, capsys)
    assert len([line for line in err if line.startswith("psr synth: shard 00001 is damaged")]) == 1, err
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert _tree(out) == _tree(clean)


def test_a_missing_or_empty_image_of_a_finished_shard_is_redone(clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    gone = sorted((out / "shards" / "00000").glob("*-ref0.png"))[3]
    empty = sorted((out / "shards" / "00002").glob("*-target.png"))[5]
    gone.unlink()
    empty.write_bytes(b"")
    err = _rerun(out, capsys)
    redone = [line for line in err if line.startswith("psr synth: shard")]
    assert len(redone) == 2, err
    assert "shard 00000" in redone[0] and gone.name in redone[0] and "missing" in redone[0]
    assert "shard 00002" in redone[1] and empty.name in redone[1] and "empty" in redone[1]
    assert _tree(out) == _tree(clean)


def test_an_undamaged_rerun_redoes_nothing(clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    err = _rerun(out, capsys)
    assert len(err) == 1 and "nothing to do" in err[0]


# ---------------------------------------------------------------------------- one run per folder
def test_a_second_run_into_a_busy_folder_is_refused_and_leaves_its_staging(tmp_path, capsys):
    out = tmp_path / "data"
    (out / "shards" / ".tmp-00000-live").mkdir(parents=True)  # the running holder's staging
    with RunLock(out, "psr synth"):
        capsys.readouterr()
        assert main(_argv(out, 20)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {os.getpid()}" in err[0] and "one run per folder" in err[0], err
        assert (out / "shards" / ".tmp-00000-live").is_dir()
        assert not (out / "manifest.jsonl").exists()


def test_a_run_holds_the_folder_and_lets_go_when_interrupted(tmp_path, monkeypatch, capsys):
    from psr.workflows import synth

    out = tmp_path / "data"
    seen = []

    def interrupted(root, shard, results, token_stride):
        seen.append(json.loads((root / LOCK_NAME).read_text())["pid"])
        raise KeyboardInterrupt

    monkeypatch.setattr(synth.ds, "write_shard", interrupted)
    assert main(_argv(out, 20)) == 130
    assert seen == [os.getpid()] and not (out / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_note_and_released(clean, tmp_path, capsys):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "data"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "command": "psr synth", "started": "then"}) + "\n")
    err = _rerun(out, capsys)
    assert len(err) == 2 and f"PID {dead.pid}" in err[0] and "taking it over" in err[0], err
    assert not (out / LOCK_NAME).exists()
    assert _tree(out) == _tree(clean)


# ---------------------------------------------------------------------------- a full disk
def test_a_full_disk_mid_run_is_one_line_and_a_rerun_finishes_the_same_bytes(clean, tmp_path, monkeypatch,
                                                                               capsys):
    out = tmp_path / "data"
    capsys.readouterr()
    # 2 files at start (recipe_hash, recipe.toml), then shard 0's PNGs and manifest part:
    # the disk fills up inside shard 1.
    with fail_writes_after(monkeypatch, 100, under=tmp_path) as disk:
        assert main(_argv(out, 60)) == 2
    assert disk["opened"] > 100
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0], err
    assert "cannot write shards/00001/" in err[0] and "rerun" in err[0]
    # Nothing half-written is visible: no staging, no temporary file, and every manifest
    # part there is names a complete shard.
    assert not [p for p in out.rglob(".tmp-*")]
    parts = sorted((out / "manifest").glob("0*.jsonl"))
    assert [p.name for p in parts] == ["00000.jsonl"]
    assert ds.check_shard(out, 0, 20, 60) == (True, "")
    assert not (out / "manifest.jsonl").exists() and not (out / "dataset.json").exists()
    assert not (out / LOCK_NAME).exists()  # released on the error
    # Space is back: the same command finishes to exactly the bytes of a clean run.
    assert main(_argv(out, 60)) == 0
    assert _tree(out) == _tree(clean)


# ---------------------------------------------------------------------------- rows read for training
@pytest.fixture(scope="module")
def rows_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows") / "data"
    assert main(_argv(out, 8)) == 0
    return out


def _set(key_path):
    def change(row, value):
        target = row
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = value
    return change


# (what, change to row 1 of 8, reason reported)
BAD_ROWS = {
    "box of strings": (lambda row, root: _set(["subjects", 0, "box"])(row, ["0", "0", "9", "9"]), "bad 'box'"),
    "box of nulls": (lambda row, root: _set(["subjects", 0, "box"])(row, [None, 0, 9, 9]), "bad 'box'"),
    "mask counts a string": (lambda row, root: _set(["subjects", 0, "mask", "counts"])(row, "4096"),
                             "bad mask 'counts'"),
    "mask counts of strings": (lambda row, root: _set(["subjects", 0, "mask", "counts"])(row, ["4096"]),
                               "bad mask 'counts'"),
    "correspondence a string": (lambda row, root: _set(["subjects", 0, "correspondence"])(row, "x"),
                                "bad 'correspondence'"),
    "correspondence pairs of strings": (
        lambda row, root: _set(["subjects", 0, "correspondence", "pairs"])(row, [["a", 1]]), "pairs are not"),
    "correspondence grid of zeros": (
        lambda row, root: _set(["subjects", 0, "correspondence", "target_grid"])(row, [0, 0]), "target_grid"),
    "category a number": (lambda row, root: _set(["subjects", 0, "category"])(row, 5), "'category' is not text"),
    "prompt with a lone surrogate": (lambda row, root: _set(["prompt"])(row, "a cat \ud800"), "not valid Unicode"),
    "empty reference PNG": (lambda row, root: (root / row["references"][0]).write_bytes(b""), "empty image file"),
}


def _write_rows(root: Path, rows: list, raw: dict | None = None) -> None:
    lines = [json.dumps(r).encode() for r in rows]
    for k, data in (raw or {}).items():
        lines[k] = data
    (root / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def _train_on(root):
    """What `psr pretrain` does with a dataset before and during training, without a model."""
    dataset = open_dataset(str(root))
    rows = TrainRows(dataset, 8, 64, 4)
    keys = rows.layout_keys()
    items = [rows[i] for i in range(len(rows))]
    assert len(keys) == len(items) == len(dataset) and not any(it["substituted"] for it in items)
    return dataset


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_row_of_the_wrong_type_is_skipped_and_reported(rows_data, tmp_path, case):
    root = _copy(rows_data, tmp_path)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    change, reason = BAD_ROWS[case]
    change(rows[1], root)
    _write_rows(root, rows)
    dataset = _train_on(root)
    assert len(dataset) == 7 and [r["id"] for r in dataset.rows] == [r["id"] for r in rows if r is not rows[1]]
    assert dataset.report.skipped[0][0] == "manifest.jsonl:2" and reason in dataset.report.skipped[0][1]
    assert len(dataset.report) == 1


def test_a_line_that_is_not_utf8_is_one_skipped_row(rows_data, tmp_path):
    root = _copy(rows_data, tmp_path)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    line = json.dumps(rows[2]).encode().replace(rows[2]["prompt"].encode(), b"caf\xe9 \xff")
    _write_rows(root, rows, {2: line})
    dataset = _train_on(root)
    assert len(dataset) == 7 and dataset.report.skipped == [("manifest.jsonl:3", "not UTF-8 text")]


def test_a_repeated_id_is_skipped_naming_both_rows(rows_data, tmp_path):
    root = _copy(rows_data, tmp_path)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    rows.insert(6, dict(rows[3]))
    _write_rows(root, rows)
    dataset = _train_on(root)
    assert len(dataset) == 8 and len({r["id"] for r in dataset.rows}) == 8
    (where, reason), = dataset.report.skipped
    assert where == "manifest.jsonl:7" and repr(rows[3]["id"]) in reason and "manifest.jsonl:4" in reason


def test_a_dataset_of_bad_rows_only_is_one_line(rows_data, tmp_path):
    root = _copy(rows_data, tmp_path)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    for k, row in enumerate(rows):
        change, _ = BAD_ROWS[sorted(BAD_ROWS)[k % len(BAD_ROWS)]]
        change(row, root)
    _write_rows(root, rows)
    with pytest.raises(UserError) as err:
        open_dataset(str(root))
    assert "no usable rows" in str(err.value) and "8 rows skipped" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_damaged_bench_file_is_reported_not_raised(tmp_path):
    (tmp_path / "Position.json").write_bytes(b'[{"instruction": "caf\xe9"}]')
    (tmp_path / "Three.json").write_text(json.dumps([{"gt": [], "gt_target_path": "x.png", "instruction": "a",
                                                      "input_path": []}]))
    data = SynthDataset(tmp_path)
    assert len(data) == 0
    assert dict(data.report.skipped) == {"Position.json": "not UTF-8 text",
                                         "Three.json[0]": "a field of the wrong type"}


def test_a_reference_that_is_not_an_image_is_skipped_before_training(rows_data, tmp_path):
    root = _copy(rows_data, tmp_path)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    (root / rows[1]["references"][0]).write_bytes(b"not a PNG, but not empty either")
    dataset = _train_on(root)
    assert len(dataset) == 7 and rows[1]["id"] not in [r["id"] for r in dataset.rows]
    [(where, reason)] = dataset.report.skipped
    assert where == str(rows[1]["id"]) and "unreadable image" in reason
