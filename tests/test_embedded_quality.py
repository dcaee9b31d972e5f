"""The shipped embedded model draws its references' subjects: on a fixed 20-item slice of the
held-out bench (easy level, evaluation identities) it beats a random-init model of the same
architecture on identity accuracy, scored by `psr eval` as users score it."""

import json
from pathlib import Path

import pytest

from psr.cli import main

ROOT = Path(__file__).resolve().parent.parent
SUBSETS = ["Attribute", "Action", "Background", "Position", "Complex"]  # 2 subjects each


@pytest.fixture(scope="module")
def bench(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench") / "bench-toy"
    code = main(["synth", "--recipe", str(ROOT / "recipes" / "bench-toy.toml"), "--out", str(out), "-q",
                 "--set", "bench.samples_per_subset=4", "--set", f"bench.subsets={json.dumps(SUBSETS)}"])
    assert code == 0
    return out


def _identity_accuracy(bench, out, *extra) -> float:
    assert main(["eval", "--recipe", str(ROOT / "recipes" / "eval-toy.toml"), "--bench", str(bench),
                 "--out", str(out), "-q", *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    return results["overall"]["means"]["id_acc"]


def test_shipped_model_beats_random_init_on_identity_accuracy(bench, tmp_path):
    from psr.core.embedded import write_embedded_base

    base = tmp_path / "random-init"
    write_embedded_base(base, seed=0)  # same architecture, VAE and text encoders; untrained transformer
    shipped = _identity_accuracy(bench, tmp_path / "shipped")
    untrained = _identity_accuracy(bench, tmp_path / "untrained", "--set", f"model.path={str(base)!r}")
    assert untrained <= 0.05
    assert shipped >= SHIPPED_FLOOR and shipped > untrained, (shipped, untrained)


# Measured on this slice with the shipped weights and recipes/eval-toy.toml's guidance (text 3,
# image 4): 0.525 (21 of 40 subjects; random init 0 of 40; the model before it, stage 2 on the
# jittered easy data, 0.325; the `frame` model 0.175). The floor leaves room for float rounding
# that flips a few subjects on another CPU.
SHIPPED_FLOOR = 0.3
