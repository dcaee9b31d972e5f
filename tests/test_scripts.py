"""scripts/: the experiment drivers build valid recipes and refuse bad arguments."""

import importlib.util
import math
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from psr.cli.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evidence():
    return _script("regularizer_evidence")


def test_every_evidence_row_is_a_valid_pretrain_recipe_with_its_regularizers(evidence):
    rows = evidence.variants(1200)
    assert list(rows) == ["none", "idar", "mosaic_align+sep", "all"]
    for name, regs in rows.items():
        value = evidence.toml_inline(regs)
        assert tomllib.loads(f"v = {value}")["v"] == regs           # --set carries the tables exactly
        recipe = load_recipe("pretrain", str(ROOT / "recipes" / "pretrain-embedded.toml"),
                             [f"regularizers={value}", "train.steps=1200", "train.seed=1"])
        assert [r.name for r in recipe.regularizers] == [r["name"] for r in regs], name
        assert recipe.train.steps == 1200 and recipe.train.seed == 1
    sep = rows["all"][2]
    assert (sep["warmup_start"], sep["warmup_end"]) == (300, 600)  # ramps in over the second quarter


def test_group_means_average_the_subsets_of_each_subject_count():
    from psr.eval.report import group_means, mean_spread

    subsets = {name: {"means": {"id_acc": i / 10, "leakage": -i / 10}}
               for i, name in enumerate(["Attribute", "Action", "Background", "Position", "Complex", "Three", "Four"])}
    subsets["Position"]["means"]["pos_exact"] = 0.9  # only some subsets have a metric: their mean
    groups = group_means({"subsets": subsets}, ["id_acc", "leakage", "pos_exact"])
    assert groups["2 subjects"] == {"id_acc": pytest.approx(0.2), "leakage": pytest.approx(-0.2),
                                    "pos_exact": pytest.approx(0.9)}
    assert groups["3 subjects"] == {"id_acc": pytest.approx(0.5), "leakage": pytest.approx(-0.5)}
    assert groups["4 subjects"]["id_acc"] == pytest.approx(0.6)
    assert "3 subjects" not in group_means({"subsets": {"Four": subsets["Four"]}}, ["id_acc"])
    assert mean_spread([0.5, 0.7]) == f"0.600 ± {statistics.stdev([0.5, 0.7]):.3f}"
    assert mean_spread([0.5]) == "0.500"


def test_unknown_variant_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "regularizer_evidence.py"), "--variants", "idr"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "regularizer_evidence: unknown variant 'idr'; choose from none, idar, mosaic_align+sep, all"]


@pytest.fixture(scope="module")
def before_after():
    return _script("rl_before_after")


def test_every_rl_row_is_a_valid_rl_recipe_with_the_seed(before_after):
    for name in before_after.RECIPES:
        recipe = load_recipe("rl", str(ROOT / "recipes" / f"{name}.toml"), ["train.seed=2", "train.steps=10"])
        assert recipe.train.seed == 2 and recipe.train.steps == 10
        assert recipe.model.preset == "embedded"  # every row starts where "before" is measured


def test_before_after_table_reports_the_gain_against_the_seed_spread(before_after):
    before = {"cons_hungarian": 0.50, "id_acc": 0.40, "pos_exact": 0.7, "scene_ok": 1.0, "attr_ok": 0.9}
    up = [dict(before, cons_hungarian=c) for c in (0.60, 0.62, 0.58)]     # +0.10 ± 0.02: a real gain
    noisy = [dict(before, cons_hungarian=c) for c in (0.40, 0.70, 0.55)]  # +0.05 ± 0.15: within the spread
    lines = before_after.table(before, {"gspo-toy": up, "grpo-toy": noisy}).splitlines()
    assert lines[2] == "| before | 0.500 | 0.400 | 0.700 | 1.000 | 0.900 | – | – |"
    assert lines[3].startswith("| gspo-toy | 0.600 ± 0.020 | 0.400 ± 0.000 |")
    assert lines[3].endswith(f"| {0.1:.3f} ± {statistics.stdev([0.1, 0.12, 0.08]):.3f} | yes |")
    assert lines[4].endswith(f"| {0.05:.3f} ± {statistics.stdev([-0.1, 0.2, 0.05]):.3f} | no |")
    assert before_after.table(before, {"focusdpo-toy": up[:1]}).splitlines()[3].endswith("| one seed |")


def test_unknown_rl_recipe_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "rl_before_after.py"), "--recipes", "gspo"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "rl_before_after: unknown recipe 'gspo'; choose from gspo-toy, grpo-toy, focusdpo-toy"]


def test_reference_gain_is_zero_exactly_when_every_row_has_the_same_references(tiny_model, tmp_path):
    from psr.train.data import TrainRows, open_dataset
    from psr.workflows.synth import run_synth

    gain = _script("reference_gain")
    recipe = load_recipe("synth", str(ROOT / "recipes" / "synth-toy.toml"), ["shard_size=16", "workers=1"])
    run_synth(recipe, str(tmp_path / "data"), 16, show_progress=False)
    dataset = TrainRows(open_dataset(str(tmp_path / "data")), tiny_model.token_stride, 64, 4)
    rows = [dataset[i] for i, row in enumerate(dataset.dataset.rows) if len(row["references"]) == 2][:3]
    assert len(rows) == 3
    table = gain.subject_errors(tiny_model, rows, [0.5, 1.0])
    assert [r["sigma"] for r in table] == [0.5, 1.0]
    for r in table:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("right", "other", "none", "background"))
        assert r["gain"] == r["other"] - r["right"] != 0  # the random model reads its references
    # Rotating identical references changes nothing: a model gains nothing from them.
    same = [{**row, "references": rows[0]["references"]} for row in rows]
    assert all(r["gain"] == 0 for r in gain.subject_errors(tiny_model, same, [0.5, 1.0]))
    with pytest.raises(ValueError, match="at least 2 rows"):
        gain.subject_errors(tiny_model, rows[:1], [0.5])


def test_reference_gain_bad_sigmas_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "reference_gain.py"), "--data", str(tmp_path),
                           "--sigmas", "0.5,2"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["reference_gain: --sigmas '0.5,2': comma-separated numbers in (0, 1]"]


def test_reference_gain_missing_data_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "reference_gain.py"), "--data",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("reference_gain: ")


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "text_probe: --model: model.path /no/such/model: not a FLUX folder"),
    (["--level", "hard"], "text_probe: --level 'hard': known levels are full, easy"),
    (["--rows", "3"], "text_probe: --rows 3: need at least 50 prompts"),
])
def test_text_probe_bad_input_is_one_line_and_exit_2(args, message):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "text_probe.py"), *args],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)


def test_text_probe_reads_a_linearly_coded_label_and_not_noise():
    import numpy as np

    sys.path.insert(0, str(ROOT / "scripts"))
    from text_probe import probe_accuracy

    rng = np.random.default_rng(0)
    labels = [["a", "b", "c"][i % 3] for i in range(300)]
    coded = np.eye(3)[[i % 3 for i in range(300)]] + 0.01 * rng.normal(size=(300, 3))
    noise = rng.normal(size=(300, 3))
    assert probe_accuracy(coded, labels, train=240) == 1.0
    assert probe_accuracy(noise, labels, train=240) < 0.6
