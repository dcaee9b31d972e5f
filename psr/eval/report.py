"""Aggregating sample records into results.json and the Markdown summary.

Per subset, each metric is the mean over the samples it applies to (failed samples count
with the penalty value). The overall row is the mean of the subset means (PSRBench reports
per-subset numbers; a macro mean keeps a 4-subject subset from weighing more than a
2-subject one). `--compare OTHER/results.json` adds a table of this run minus the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from psr.errors import UserError
from psr.eval.scoring import IDENTITY_FAILURES

LABELS = {
    "cons_psrbench": "cons PSRBench", "cons_hungarian": "cons Hungarian", "leakage": "leakage",
    "pos_psrbench": "pos PSRBench", "pos_exact": "pos exact", "id_acc": "id acc", "count_ok": "count",
    "relation_ok": "relation", "scene_ok": "scene", "attr_ok": "attribute", "clip_t": "CLIP-T",
    "aesthetic": "aesthetic",
}
ANALYSIS_METRICS = ("scene_ok", "attr_ok")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(records: Sequence[dict], subsets: Sequence[str], metrics: Sequence[str]) -> dict:
    """{"subsets": {name: row}, "overall": row, "failures": [...]} where a row holds counts
    and `means`/`counts` per metric (metrics no sample had are left out)."""
    # scene/attribute checks need a localizer with analyze(); without one they are n/a for
    # every sample, failed ones included (their penalty would otherwise be the only value).
    analysed = any(r["details"].get("analysis") for r in records)
    rows = {}
    for name in subsets:
        mine = [r for r in records if r["subset"] == name]
        values: dict[str, list[float]] = {m: [] for m in metrics}
        for r in mine:
            for m, v in r["scores"].items():
                if v is not None and m in values and (analysed or m not in ANALYSIS_METRICS):
                    values[m].append(float(v))
        rows[name] = {
            "items": len({r["index"] for r in mine}),
            "samples": len(mine),
            "failed": sum(1 for r in mine if r["failures"]),
            "means": {m: _mean(v) for m, v in values.items() if v},
            "counts": {m: len(v) for m, v in values.items() if v},
        }
        if identity := identity_tally(mine):
            rows[name]["identity"] = identity
    overall_means = {}
    for m in metrics:
        per_subset = [row["means"][m] for row in rows.values() if m in row["means"]]
        if per_subset:
            overall_means[m] = _mean(per_subset)
    overall = {key: sum(row[key] for row in rows.values()) for key in ("items", "samples", "failed")}
    overall["means"] = overall_means
    overall["counts"] = {m: sum(row["counts"].get(m, 0) for row in rows.values()) for m in overall_means}
    tallies = [row["identity"] for row in rows.values() if "identity" in row]
    if tallies:
        overall["identity"] = {key: sum(t[key] for t in tallies) for key in tallies[0]}
    failures = [{"subset": r["subset"], "index": r["index"], "seed": r["seed"], "image": r["image"], **f}
                for r in records for f in r["failures"]]
    return {"subsets": rows, "overall": overall, "failures": failures}


def identity_tally(records: Sequence[dict]) -> dict[str, int] | None:
    """Subjects with an identity check in these samples: {"subjects", "ok", then one count
    per scoring.IDENTITY_FAILURES key}; None when no sample had one (no ground truth)."""
    checked = [s for r in records for s in r["details"].get("subjects", []) if s.get("identity_ok") is not None]
    if not checked:
        return None
    tally = {"subjects": len(checked), "ok": sum(1 for s in checked if s["identity_ok"])}
    for reason in IDENTITY_FAILURES:
        tally[reason] = sum(1 for s in checked if not s["identity_ok"] and s.get("identity_failure") == reason)
    return tally


def identity_table(results: dict) -> list[str]:
    """Markdown lines: per subset, the share of subjects whose identity check passed and
    failed for each reason (nothing when no subset had ground truth)."""
    named = [(name, row["identity"]) for name, row in
             [*results["subsets"].items(), ("**overall**", results["overall"])] if "identity" in row]
    if not named:
        return []
    head = ["subset", "subjects", "ok"] + list(IDENTITY_FAILURES.values())
    note = ("Shares of the subjects checked (pooled over subsets in the overall row; samples that failed "
            "before scoring are not in them): `ok` passed, every other subject failed for the first reason "
            "it meets, in the order of the columns.")
    lines = ["## Why identity checks failed", "", note, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, tally in named:
        shares = [tally[key] / tally["subjects"] for key in ("ok", *IDENTITY_FAILURES)]
        lines.append(f"| {name} | {tally['subjects']} | " + " | ".join(f"{v:.3f}" for v in shares) + " |")
    return lines + [""]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _columns(results: dict) -> list[str]:
    seen = {m for row in [*results["subsets"].values(), results["overall"]] for m in row["means"]}
    return [m for m in results["metrics"] if m in seen]


PROTOCOL_NOTES = {
    "psrbench": "cons PSRBench, pos PSRBench: protocol `psrbench` (as PSRBench's scripts compute them). "
                "cons Hungarian, pos exact: psr's.",
    "psr": "cons PSRBench, pos PSRBench: protocol `psr` (psr's corrected variant of PSRBench's rules, "
           "docs/eval.md). cons Hungarian, pos exact: psr's.",
}


def markdown_table(results: dict) -> str:
    columns = _columns(results)
    head = ["subset", "items", "samples", "failed"] + [LABELS.get(m, m) for m in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in [*results["subsets"].items(), ("**overall**", results["overall"])]:
        cells = [name, str(row["items"]), str(row["samples"]), str(row["failed"])]
        cells += [_fmt(row["means"].get(m)) for m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_results(path: str | Path) -> dict:
    """Another run's results.json for `--compare` (checked before any work starts)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--compare {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--compare {path}: not a readable results.json ({err.__class__.__name__})") from None
    if not isinstance(data, dict) or not {"subsets", "overall", "metrics"} <= set(data):
        raise UserError(f"--compare {path}: not a psr eval results.json (needs subsets, overall, metrics)")
    data["path"] = str(path)
    return data


def compare(results: dict, other: dict) -> dict:
    """This run minus `other`, per subset both runs scored and over those subsets (the mean
    of their subset means, so both sides average the same subsets):
    {"other", "mode", "subsets": common names, "this_overall", "other_overall", "gap": {row: {metric: Δ}}}."""
    common = [n for n in results["subsets"] if n in other.get("subsets", {})]
    metrics = list(results["metrics"])

    def overall(rows: dict) -> dict:
        means = {}
        for m in metrics:
            values = [rows[n]["means"][m] for n in common if m in rows[n].get("means", {})]
            if values:
                means[m] = _mean(values)
        return means

    mine, theirs = overall(results["subsets"]), overall(other["subsets"])
    gap = {n: {m: results["subsets"][n]["means"][m] - other["subsets"][n]["means"][m] for m in metrics
               if m in results["subsets"][n]["means"] and m in other["subsets"][n].get("means", {})} for n in common}
    gap["overall"] = {m: mine[m] - theirs[m] for m in metrics if m in mine and m in theirs}
    return {"other": other["path"], "mode": other.get("mode"), "subsets": common, "this_overall": mine,
            "other_overall": theirs, "gap": gap}


def markdown(results: dict) -> str:
    """The whole summary: title, main table, comparison, failures."""
    mode = results["mode"]
    title = {"generate": "model outputs", "score-only": "existing result_path images",
             "oracle": "ground-truth targets (oracle)",
             "reconstruct": "VAE reconstructions of the ground-truth targets"}[mode]
    lines = [f"# psr eval: {title}", "", f"bench: `{results['bench']}`", ""]
    if protocol := results.get("protocol"):
        lines += [PROTOCOL_NOTES[protocol], ""]
    lines += [markdown_table(results), ""]
    lines += identity_table(results)
    if comparison := results.get("compare"):
        lines += [f"## Gap: this run − `{comparison['other']}` ({comparison['mode']})", ""]
        columns = [m for m in _columns(results) if m in comparison["gap"]["overall"]]
        if not comparison["subsets"]:
            lines += ["The two runs share no subset.", ""]
        else:
            lines += [f"Over the subsets both runs scored: {', '.join(comparison['subsets'])}.", ""]
            head = ["row"] + [LABELS.get(m, m) for m in columns]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for label, means in (("this run", comparison["this_overall"]),
                                 (f"other ({comparison['mode']})", comparison["other_overall"])):
                lines.append(f"| {label} | " + " | ".join(_fmt(means.get(m)) for m in columns) + " |")
            for name, row in comparison["gap"].items():
                label = "**Δ overall**" if name == "overall" else f"Δ {name}"
                lines.append(f"| {label} | " + " | ".join(
                    "–" if m not in row else f"{row[m]:+.3f}" for m in columns) + " |")
            lines.append("")
    failures = results["failures"]
    lines.append(f"Failed samples: {results['overall']['failed']} of {results['overall']['samples']} "
                 f"({len(failures)} failure entries; each scored with the penalty {results['penalty']}).")
    for f in failures[:20]:
        lines.append(f"- {f['subset']}[{f['index']}] seed {f['seed']} — {f['stage']}: {f['reason']}")
    if len(failures) > 20:
        lines.append(f"- … {len(failures) - 20} more in results.json")
    return "\n".join(lines) + "\n"


# ToyWorld's bench (recipes/bench-toy.toml) by subject count: experiment tables report these
# groups, each the mean of its subsets' means.
SUBJECT_GROUPS = {"2 subjects": ("Attribute", "Action", "Background", "Position", "Complex"),
                  "3 subjects": ("Three",), "4 subjects": ("Four",)}


def group_means(results: dict, metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """{group: {metric: mean over the group's subsets that have it}} from a results dict;
    a group none of whose subsets was scored is left out."""
    out = {}
    for group, names in SUBJECT_GROUPS.items():
        rows = [results["subsets"][n]["means"] for n in names if n in results["subsets"]]
        means = {}
        for metric in metrics:
            values = [r[metric] for r in rows if metric in r]
            if values:
                means[metric] = sum(values) / len(values)
        if means:
            out[group] = means
    return out


def mean_spread(values: Sequence[float]) -> str:
    """"mean ± sample std" over seeds (just the value for one seed)."""
    if len(values) < 2:
        return f"{values[0]:.3f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"
