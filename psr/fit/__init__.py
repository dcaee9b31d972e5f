"""`psr fit`: train the small models psr ships (ToyWorld perception, ...).

`FITTERS` maps a recipe's `model` name to a fitter class. A fitter class has

* `Options`: a frozen dataclass for the recipe's `[options]` table;
* `asset`: the folder under psr/assets/ its weights ship in (the default `out`);
* `check(recipe)`: classmethod, extra recipe invariants (raise RecipeError), no weights;
* `__init__(recipe, options, device)`: builds the model and optimizer;
* `state_dict()` / `load_state_dict(state)`: everything a checkpoint must hold;
* `prepare(step, show_progress)`: builds the training data for steps `step..`;
* `train_step(step) -> dict[str, float]`: one optimisation step, its losses;
* `save(folder)`: the final weights (+ config.json);
* `evaluate(show_progress) -> dict`: the final metrics (JSON-able).

`psr.fit.loop.run_fit` drives any of them: progress bar, atomic checkpoints, resume.
The table (`psr.fit.fitters`) names each fitter by path, so reading a recipe imports only
the fitter it names.
"""

from psr.fit.fitters import FITTERS

__all__ = ["FITTERS"]
