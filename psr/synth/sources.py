"""The source table: where `psr synth` draws samples from.

A source is built once per process from the recipe and maps a sample index to a
`SynthSample` (or a `Rejection` with its reason); it must be a pure function of
(recipe, index), which is what makes resume and sharding across processes exact.
"""

from __future__ import annotations

from typing import Callable

from psr.core.registry import Registry
from psr.synth.pipeline import SynthPipeline, category_pairs
from psr.synth.sample import Rejection, SynthSample
from psr.synth.toy import ToyWorldSource

Source = Callable[[int], "SynthSample | Rejection"]


def _toyworld(recipe, device) -> Source:
    return ToyWorldSource(recipe.toyworld, seed=recipe.seed, token_stride=recipe.token_stride)


def _pipeline(recipe, device) -> Source:
    pipeline = SynthPipeline(recipe.pipeline, device=device, token_stride=recipe.token_stride)

    def draw(index: int):
        seed = recipe.seed + index
        categories = category_pairs(list(recipe.categories), recipe.subjects_per_sample, seed)
        return pipeline.run(index, categories, seed)

    return draw


SOURCES: Registry[Callable] = Registry("source", {
    "toyworld": _toyworld,
    "pipeline": _pipeline,
})
