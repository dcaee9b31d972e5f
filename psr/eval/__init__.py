"""`psr eval`: PSRBench-format benchmarks, generated and scored (see docs/eval.md).

    bench.py       reading bench folders, writing items back with result_path
    config.py      the eval recipe (EvalRecipe)
    generation.py  making the missing output images
    perception.py  scoring components behind the disk cache (cache.py)
    scoring.py     every metric of one sample
    report.py      aggregation, results.json, the Markdown summary, --compare
    sheets.py      contact sheets
"""

