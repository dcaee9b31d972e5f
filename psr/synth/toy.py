"""ToyWorld as a synthesis source: exact ground truth, no model in the loop."""

from __future__ import annotations

import numpy as np
from PIL import Image

from psr import toyworld as tw
from psr.synth.sample import Rejection, SynthSample, SynthSubject


def toy_subjects(target: "tw.Render", references: list["tw.Render"], token_stride: int) -> list[SynthSubject]:
    """One `SynthSubject` per target subject, with exact token correspondences."""
    grid = (target.size // token_stride,) * 2
    subjects = []
    for i, spec in enumerate(target.spec.subjects):
        identity = tw.Identity.from_id(spec.identity)
        ref = references[i]
        ref_grid = (ref.size // token_stride,) * 2
        token_map = tw.correspondence_grid(target, i, ref, 0, grid=grid, ref_grid=ref_grid).ravel()
        pairs = [(int(r), int(t)) for t, r in enumerate(token_map) if r >= 0]
        subjects.append(SynthSubject(
            name=identity.name,
            category=identity.category,
            box=tuple(float(v) for v in target.boxes[i]),
            mask=target.masks[i],
            reference=Image.fromarray(ref.image),
            identity=int(spec.identity),
            correspondence=pairs,
            extra={"pose": spec.pose.to_dict(),
                   "attributes": list(spec.attributes),
                   "reference_spec": ref.spec.to_dict()},
        ))
    return subjects


class ToyWorldSource:
    """Sample i: a k-subject ToyWorld example from seed `seed + i` (k drawn from the
    recipe's weights), its target and references rendered, ground truth attached."""

    def __init__(self, config, seed: int, token_stride: int):
        self.config = config
        self.seed = seed
        self.token_stride = token_stride
        weights = np.asarray(config.subject_weights, dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.id_range = tw.DEFAULT_ID_RANGES[config.id_split]

    def num_subjects(self, seed: int) -> int:
        u = np.random.default_rng([0x5EED, seed]).random()
        return int(np.searchsorted(self.cumulative, u, side="right")) + 1

    def __call__(self, index: int) -> SynthSample | Rejection:
        seed = self.seed + index
        k = min(self.num_subjects(seed), len(self.cumulative))
        example = tw.sample_example(seed, k, self.id_range, attribute_rate=self.config.attribute_rate,
                                    level=self.config.level)
        return render_example(example, self.config.size, self.config.reference_size, self.token_stride,
                              provenance={"generator": "toyworld", "seed": seed})


def render_example(example: "tw.Example", size: int, reference_size: int, token_stride: int,
                   provenance: dict) -> SynthSample | Rejection:
    target = tw.render(example.target, size)
    references = [tw.render(r, reference_size) for r in example.references]
    hidden = [i for i in range(len(example.target.subjects)) if not target.masks[i].any()]
    if hidden:  # a subject fully covered by others cannot be supervised or scored
        return Rejection(reason=f"subject {hidden[0]} not visible", provenance=provenance)
    truth = target.ground_truth()
    return SynthSample(
        prompt=example.prompt,
        target=Image.fromarray(target.image),
        subjects=toy_subjects(target, references, token_stride),
        provenance=provenance,
        extra={"scene": example.target.scene, "relation": truth["relation"],
               "relation_holds": truth["relation_holds"], "example": example.to_dict()},
    )
