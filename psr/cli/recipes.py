"""The command → recipe table, at the top of the layers: each command's recipe class lives
in that command's package, and only the CLI needs all of them (`psr validate` reads a
recipe's `command` to pick its class). Classes are named by path, so a command imports
only its own recipe and `psr --help` imports none.
"""

from __future__ import annotations

from pathlib import Path

from psr.core import recipe as _recipe
from psr.core.registry import Registry

RECIPE_KINDS: Registry[type] = Registry("command", {
    "generate": "psr.core.schema:GenerateRecipe",
    "synth": "psr.synth.config:SynthRecipe",
    "eval": "psr.eval.config:EvalRecipe",
    "pretrain": "psr.train.config:PretrainRecipe",
    "fit": "psr.fit.recipe:FitRecipe",
    "rl": "psr.rl.config:RlRecipe",
})


def load_recipe(kind: str, path: str | Path | None = None, overrides: list[str] = ()):
    """`psr.core.recipe.load_recipe` for the command named `kind` (a key of RECIPE_KINDS)."""
    return _recipe.load_recipe(RECIPE_KINDS[kind], path, overrides)
