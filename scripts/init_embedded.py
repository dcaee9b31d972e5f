"""Write the embedded base model: the ToyWorld-trained VAE + a random-init transformer + the
frozen random-init text encoders (psr.core.embedded), float16 safetensors, in diffusers'
FLUX layout with a `psr_model.json` card.

    .venv/bin/python scripts/init_embedded.py OUT [--seed 0] [--vae psr/assets/toyworld/vae]

OUT must not exist. The VAE defaults to the shipped psr/assets/toyworld/vae (rebuild it with
`psr fit --recipe recipes/fit-toy-vae.toml`), so the base is rebuilt without retraining.
`psr pretrain` trains the transformer of this folder; `--set model.path=OUT` with the
`embedded` preset loads it.
"""

import argparse
import sys

from psr.core.embedded import EMBEDDED_SIZES, TOY_VAE_DIR, write_embedded_base
from psr.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init transformer and text encoders")
    parser.add_argument("--vae", default=str(TOY_VAE_DIR), help="trained AutoencoderKL folder")
    args = parser.parse_args(argv)
    try:
        sizes = write_embedded_base(args.out, seed=args.seed, vae_path=args.vae)
    except UserError as err:
        print(f"init_embedded: error: {err}", file=sys.stderr)
        return 2
    for name, size in sizes.items():
        print(f"{name:16s} {size / 1e6:7.2f} MB")
    print(f"{'total':16s} {sum(sizes.values()) / 1e6:7.2f} MB  ({args.out}; sizes {EMBEDDED_SIZES})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
