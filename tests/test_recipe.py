"""Recipes: TOML → frozen dataclasses, with errors that name the key path."""

import re
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from psr.cli.recipes import RECIPE_KINDS, load_recipe
from psr.core.recipe import apply_overrides, build, parse_override, read_toml, to_toml
from psr.core.schema import GenerateRecipe, resolve_generate
from psr.errors import RecipeError, UserError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


@dataclass(frozen=True)
class Lora:
    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = ("to_q",)


@dataclass(frozen=True)
class Model:
    lora: Lora = field(default_factory=Lora)
    kind: Literal["a", "b"] = "a"
    name: str | None = None


@dataclass(frozen=True)
class Item:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class Root:
    model: Model = field(default_factory=Model)
    items: tuple[Item, ...] = ()
    flags: dict[str, bool] = field(default_factory=dict)


@pytest.mark.parametrize("data, message", [
    ({"model": {"lora": {"rnak": 8}}}, "model.lora.rnak: unknown key (did you mean 'rank'?)"),
    ({"modle": {}}, "modle: unknown key (did you mean 'model'?)"),
    ({"model": {"lora": {"rank": "8"}}}, "model.lora.rank: expected an integer, got a string ('8')"),
    ({"model": {"lora": {"rank": 8.5}}}, "model.lora.rank: expected an integer, got a float (8.5)"),
    ({"model": {"lora": {"rank": True}}}, "model.lora.rank: expected an integer, got a boolean (True)"),
    ({"model": {"lora": {"alpha": "x"}}}, "model.lora.alpha: expected a number, got a string ('x')"),
    ({"model": {"lora": {"targets": "to_q"}}}, "model.lora.targets: expected an array, got a string ('to_q')"),
    ({"model": {"lora": {"targets": ["to_q", 3]}}}, "model.lora.targets[1]: expected a string, got an integer (3)"),
    ({"model": {"kind": "c"}}, "model.kind: must be one of 'a', 'b', got 'c'"),
    ({"model": {"lora": 3}}, "model.lora: expected a table, got an integer (3)"),
    ({"items": [{"weight": 2.0}]}, "items[0].name: required key is missing"),
    ({"items": [{"name": "x", "wieght": 2.0}]}, "items[0].wieght: unknown key (did you mean 'weight'?)"),
    ({"flags": {"on": 1}}, "flags.on: expected a boolean, got an integer (1)"),
])
def test_build_errors_name_the_full_key_path(data, message):
    with pytest.raises(RecipeError) as err:
        build(Root, data)
    assert str(err.value) == message


def test_build_converts_and_freezes():
    root = build(Root, {"model": {"lora": {"rank": 8, "alpha": 16, "targets": ["a", "b"]}, "name": "n"},
                        "items": [{"name": "psr", "weight": 2}], "flags": {"x": True}})
    assert root.model.lora == Lora(rank=8, alpha=16.0, targets=("a", "b"))
    assert isinstance(root.model.lora.alpha, float)
    assert root.items == (Item("psr", 2.0),)
    assert root.flags == {"x": True}
    with pytest.raises(FrozenInstanceError):
        root.model.lora.rank = 3


def test_to_toml_round_trips():
    root = build(Root, {"model": {"lora": {"rank": 8}, "name": 'quote " and \\ back'},
                        "items": [{"name": "a"}, {"name": "b", "weight": 0.5}]})
    import tomllib

    assert build(Root, tomllib.loads(to_toml(root, header="h"))) == root
    recipe = resolve_generate(GenerateRecipe())
    assert build(GenerateRecipe, tomllib.loads(to_toml(recipe))) == recipe


@pytest.mark.parametrize("text, keys, value", [
    ("sample.steps=8", ["sample", "steps"], 8),
    ("sample.guidance=2.5", ["sample", "guidance"], 2.5),
    ("model.preset=tiny", ["model", "preset"], "tiny"),  # bare word → string
    ('model.preset="tiny"', ["model", "preset"], "tiny"),
    ("model.cpu_offload=true", ["model", "cpu_offload"], True),
    ("a.b=[1, 2]", ["a", "b"], [1, 2]),
    ("model.device=cuda:1", ["model", "device"], "cuda:1"),
])
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=3", ".a=1"])
def test_bad_override_is_a_user_error(text):
    with pytest.raises(UserError):
        parse_override(text)


def test_apply_overrides_creates_tables_and_leaves_input_alone():
    data = {"model": {"preset": "tiny"}}
    out = apply_overrides(data, ["model.lora.rank=4", "sample.steps=2"])
    assert out == {"model": {"preset": "tiny", "lora": {"rank": 4}}, "sample": {"steps": 2}}
    assert data == {"model": {"preset": "tiny"}}
    with pytest.raises(RecipeError, match="model.preset: is not a table"):
        apply_overrides(data, ["model.preset.x=1"])


def test_generate_recipe_invariants():
    with pytest.raises(RecipeError, match=r"^model.preset: unknown preset 'tinny' \(did you mean 'tiny'\?\)"):
        load_recipe("generate", overrides=["model.preset=tinny"])
    with pytest.raises(RecipeError, match="^sample.steps: must be >= 1"):
        load_recipe("generate", overrides=["sample.steps=0"])
    with pytest.raises(RecipeError, match="^model.position_scheme: must be one of 'frame', 'diagonal', 'layout'"):
        load_recipe("generate", overrides=["model.position_scheme=uno"])


def test_recipe_of_another_command_is_refused(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('command = "pretrain"\n')
    with pytest.raises(RecipeError, match="is a 'pretrain' recipe, not a 'generate' one"):
        load_recipe("generate", str(path))


def test_unreadable_or_invalid_toml(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [\n")
    with pytest.raises(UserError, match="invalid TOML"):
        read_toml(bad)


def test_resolve_fills_preset_defaults():
    recipe = resolve_generate(load_recipe("generate", overrides=["model.preset=flux-dev", "model.path=/x"]))
    assert (recipe.model.dtype, recipe.model.reference_size, recipe.sample.steps) == ("bfloat16", 512, 28)
    assert (recipe.sample.height, recipe.sample.width, recipe.sample.guidance) == (1024, 1024, 3.5)
    explicit = resolve_generate(load_recipe("generate", overrides=["sample.guidance=0.0"]))
    assert explicit.sample.guidance == 0.0  # a falsy explicit value is kept, not replaced


@pytest.mark.parametrize("preset, rule", [
    ("flux-kontext", "kontext"), ("flux-dev", "longest"), ("tiny", "longest"), ("embedded", "longest")])
def test_reference_resize_defaults_to_the_presets_rule(preset, rule):
    recipe = load_recipe("generate", overrides=[f"model.preset={preset}", "model.path='/x'"])
    assert recipe.model.reference_resize is None and recipe.model.resize_rule == rule
    assert resolve_generate(recipe).model.reference_resize == rule  # written out resolved
    other = {"kontext": "longest", "longest": "kontext"}[rule]
    given = load_recipe("generate", overrides=[f"model.preset={preset}", f"model.reference_resize={other}"])
    assert given.model.resize_rule == resolve_generate(given).model.reference_resize == other


def test_bad_reference_resize_is_one_line(tmp_path, capsys):
    from psr.cli import main
    from psr.core.schema import ModelConfig

    with pytest.raises(RecipeError) as err:
        load_recipe("generate", overrides=["model.reference_resize=nearest"])
    assert str(err.value).startswith("model.reference_resize: must be one of 'kontext', 'longest', got 'nearest'")
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match=r"^reference_resize: must be one of 'kontext', 'longest', got 'Kontext'$"):
        ModelConfig(reference_resize="Kontext")
    recipe = tmp_path / "r.toml"
    recipe.write_text('# psr generate --recipe r.toml "x"\ncommand = "generate"\n[model]\npreset = "flux-kontext"\n'
                      'path = "/models/FLUX.1-Kontext-dev"\n')  # validate refuses the preset without one
    assert main(["validate", str(recipe), "--set", "model.reference_resize=longest"]) == 0
    capsys.readouterr()
    assert main(["validate", str(recipe), "--set", "model.reference_resize=1024"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["psr: error: model.reference_resize: must be one of 'kontext', 'longest', got 1024"]


def test_a_reference_size_the_kontext_rule_would_ignore_is_refused():
    import tomllib

    with pytest.raises(RecipeError) as err:
        load_recipe("generate", overrides=["model.preset=flux-kontext", "model.reference_size=320"])
    assert str(err.value).startswith("model.reference_size: preset 'flux-kontext' sizes references as "
                                     "FluxKontextPipeline does") and "\n" not in str(err.value)
    named = load_recipe("generate", overrides=["model.preset=flux-kontext", "model.reference_size=320",
                                               "model.reference_resize=longest"])
    assert resolve_generate(named).model.reference_size == 320
    # Resolved (as written beside every output) the rule is named, so the recipe loads back.
    resolved = resolve_generate(load_recipe("generate", overrides=["model.preset=flux-kontext", "model.path='/x'"]))
    assert (resolved.model.reference_resize, resolved.model.reference_size) == ("kontext", 512)
    assert build(GenerateRecipe, tomllib.loads(to_toml(resolved))) == resolved


def test_every_shipped_recipe_validates_and_starts_with_its_launch_command():
    assert RECIPES, "recipes/ is empty"
    for path in RECIPES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# psr ") or first.startswith("# accelerate launch"), f"{path.name}: {first!r}"
        kind = read_toml(path)["command"]
        assert kind in RECIPE_KINDS
        load_recipe(kind, str(path))
        assert f"psr {kind}" in first, f"{path.name} launch line does not run `psr {kind}`"


@pytest.mark.parametrize("kind, override, key", [
    ("pretrain", "train.eps=inf", "train.eps"),
    ("pretrain", "train.timestep_std=inf", "train.timestep_std"),
    ("pretrain", "train.lr=nan", "train.lr"),
    ("synth", "toyworld.subject_weights=[inf, 1.0]", "toyworld.subject_weights[0]"),
    ("fit", "lr=-inf", "lr"),
    ("generate", "sample.guidance=inf", "sample.guidance"),
])
def test_non_finite_numbers_are_refused_at_validation(kind, override, key):
    # TOML can write inf and nan; they used to train NaN weights or nothing at all, with exit 0.
    with pytest.raises(RecipeError, match=rf"^{re.escape(key)}: expected a finite number"):
        load_recipe(kind, overrides=[override])
