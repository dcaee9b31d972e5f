"""Small trained perception models for ToyWorld images, so psr can measure generated
images offline (no downloads, CPU).

* identity encoder (`identity.py`): a subject crop → L2-normalised identity embedding;
  registered as `FEATURE_EXTRACTORS["toyworld"]`.
* localizer (`localizer.py`): CenterNet-style instances (category, box), per-instance
  added attributes and the background scene; registered as `LOCALIZERS["toyworld"]`.

Both ship trained weights in `psr/assets/toyworld/` and are retrained with
`psr fit --recipe recipes/fit-toy-identity.toml` / `fit-toy-localizer.toml`
(see docs/toyworld-perception.md). torch is imported lazily, inside the modules that need it.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toyworld"
IDENTITY_ASSETS = ASSETS / "identity"
LOCALIZER_ASSETS = ASSETS / "localizer"
