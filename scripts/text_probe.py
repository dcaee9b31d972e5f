"""Does the prompt survive the embedded model's frozen random-init text encoders?

    .venv/bin/python scripts/text_probe.py [--model psr/assets/embedded] [--level easy] [--rows 5000]

Linear probes (ridge regression, one-vs-rest, fitted on 80 % of the prompts and scored on
the rest) read from the text features what a 2-subject ToyWorld prompt says: each
subject's shape, colour and pattern, the relation and the scene. Two feature sets: the
per-token T5 features the transformer attends to (flattened, so a probe sees which token
says what) and CLIP's pooled vector (the timestep-embedding path). A probe far above chance
means the information is there for the transformer to read; near chance means it is lost
before the transformer sees it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def labels_of(example) -> dict[str, str]:
    from psr.toyworld import Identity

    a, b = (Identity.from_id(s.identity) for s in example.target.subjects)
    return {"subject 1 shape": a.shape, "subject 1 colour": a.colour, "subject 1 pattern": a.pattern,
            "subject 2 shape": b.shape, "subject 2 colour": b.colour, "subject 2 pattern": b.pattern,
            "relation": example.target.relation, "scene": example.target.scene}


def probe_accuracy(features, labels: list[str], train: int, ridge: float = 1.0) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier on standardised features."""
    import numpy as np

    x = np.asarray(features, np.float64)
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    classes = sorted(set(labels))
    y = np.array([[1.0 if label == c else -1.0 for c in classes] for label in labels])
    gram = x[:train].T @ x[:train] + ridge * np.eye(x.shape[1])
    w = np.linalg.solve(gram, x[:train].T @ y[:train])
    predicted = (x[train:] @ w).argmax(1)
    truth = np.array([classes.index(label) for label in labels[train:]])
    return float((predicted == truth).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "psr" / "assets" / "embedded"))
    parser.add_argument("--level", default="easy")
    parser.add_argument("--rows", type=int, default=5000)
    args = parser.parse_args(argv)

    import torch

    from psr import toyworld as tw
    from psr.core.components import load_components
    from psr.core.model import MultiRefFlux
    from psr.errors import UserError

    if args.level not in tw.sampling.LEVELS:
        print(f"text_probe: --level {args.level!r}: known levels are {', '.join(tw.sampling.LEVELS)}", file=sys.stderr)
        return 2
    if args.rows < 50:
        print(f"text_probe: --rows {args.rows}: need at least 50 prompts to fit and score a probe", file=sys.stderr)
        return 2
    try:
        components = load_components(args.model, dtype="float32")
    except UserError as err:
        print(f"text_probe: --model: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = MultiRefFlux(components, max_sequence_length=64)
    examples = [tw.sample_example(3_000_000 + i, 2, tw.DEFAULT_ID_RANGES["train"], level=args.level)
                for i in range(args.rows)]
    tokens, pooled = [], []
    for start in range(0, len(examples), 250):
        e = model.encode_prompt([ex.prompt for ex in examples[start:start + 250]])
        tokens.append(e.embeds.flatten(1))
        pooled.append(e.pooled)
    tokens, pooled = torch.cat(tokens).numpy(), torch.cat(pooled).numpy()
    table = [labels_of(ex) for ex in examples]
    train = int(0.8 * len(examples))
    print(f"| what the prompt says | classes | chance | T5 tokens ({tokens.shape[1]} dims) | "
          f"CLIP pooled ({pooled.shape[1]} dims) |")
    print("|---|---|---|---|---|")
    for key in table[0]:
        labels = [row[key] for row in table]
        counts = {c: labels[train:].count(c) for c in set(labels)}
        chance = max(counts.values()) / (len(labels) - train)
        print(f"| {key} | {len(counts)} | {chance:.2f} | {probe_accuracy(tokens, labels, train):.3f} | "
              f"{probe_accuracy(pooled, labels, train):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
