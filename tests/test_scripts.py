"""scripts/: the experiment drivers build valid recipes and refuse bad arguments."""

import importlib.util
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from psr.core.schema import load_recipe

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


def test_group_means_average_the_subsets_of_each_subject_count(evidence):
    subsets = {name: {"means": {"id_acc": i / 10, "leakage": -i / 10}}
               for i, name in enumerate(["Attribute", "Action", "Background", "Position", "Complex", "Three", "Four"])}
    groups = evidence.group_means({"subsets": subsets})
    assert groups["2 subjects"] == {"id_acc": pytest.approx(0.2), "leakage": pytest.approx(-0.2)}
    assert groups["3 subjects"]["id_acc"] == pytest.approx(0.5) and groups["4 subjects"]["id_acc"] == pytest.approx(0.6)
    assert evidence.spread([0.5, 0.7]) == f"0.600 ± {statistics.stdev([0.5, 0.7]):.3f}"
    assert evidence.spread([0.5]) == "0.500"


def test_unknown_variant_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "regularizer_evidence.py"), "--variants", "idr"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "regularizer_evidence: unknown variant 'idr'; choose from none, idar, mosaic_align+sep, all"]
