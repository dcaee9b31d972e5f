"""Accuracy of the shipped ToyWorld perception models on held-out renders, one core.

Run:  .venv/bin/python bench/bench_toy_perception.py [--identities 1000] [--images 400]
      [--identity-path DIR] [--localizer-path DIR] [--threshold 0.5]

Prints (see psr/toyworld/perception/metrics.py for the exact protocol):
  * identity retrieval: gallery of N held-out identities (one reference-like render each),
    queries = another render of each (new pose and scene), alone ("reference") or among
    other subjects with added attributes ("target"), clean / noise / blur; top-1, top-5;
  * localizer: precision and recall (IoU >= 0.5, category must match), scene accuracy and
    attribute F1 on held-out 1-4-subject renders, clean / noise / blur;
  * the time per call of each model on this machine.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=1000)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--identity-path", default=None)
    parser.add_argument("--localizer-path", default=None)
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()

    import torch
    from PIL import Image

    from psr.core.detect import build_localizer
    from psr.core.features import build_feature_extractor
    from psr.toyworld.perception.metrics import detection_renders, detection_table, retrieval_table

    torch.set_num_threads(1)
    encoder = build_feature_extractor("toyworld", path=args.identity_path)
    localizer = build_localizer("toyworld", path=args.localizer_path, threshold=args.threshold)

    start = time.perf_counter()
    table = retrieval_table(encoder, args.identities)
    seconds = time.perf_counter() - start
    print(f"identity retrieval, {args.identities} held-out identities ({seconds:.0f} s incl. rendering)")
    print(f"{'query':10s} {'condition':10s} {'top-1':>7s} {'top-5':>7s}")
    for kind, rows in table.items():
        for cond, row in rows.items():
            print(f"{kind:10s} {cond:10s} {row['top1']:7.3f} {row['top5']:7.3f}")

    renders = detection_renders(args.images)
    table = detection_table(localizer, renders)
    print(f"\nlocalizer, {args.images} held-out renders (1-4 subjects), threshold {args.threshold}")
    print(f"{'condition':10s} {'precision':>9s} {'recall':>7s} {'scene acc':>9s} {'attr F1':>7s}")
    for cond, row in table.items():
        print(f"{cond:10s} {row['precision']:9.3f} {row['recall']:7.3f} {row['scene_accuracy']:9.3f} "
              f"{row['attribute_f1']:7.3f}")

    image = Image.fromarray(renders[0].image)
    crops = [image.crop((0, 0, 24, 24))] * 32
    print()
    for name, fn in (("identity embed_images, 32 crops", lambda: encoder.embed_images(crops)),
                     ("localizer analyze, 1 image", lambda: localizer.analyze(image))):
        fn()
        best = min(_timed(fn) for _ in range(5))  # best of 5: other processes only slow a call down
        print(f"{name}: {best * 1000:.1f} ms")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
