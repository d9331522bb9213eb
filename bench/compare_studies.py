"""Two evaluated studies of the same cases compared model by model: paired tests across test cases.

For each model both studies evaluated (and the ensemble), the per-case weighted Dice (StructSeg
importance) and the small-organ Dice of study A against study B on the (fold, case) pairs both have,
decided by the report's paired test (``evaluation.significance.paired_test``: Wilcoxon signed-rank and a
bootstrap CI of the mean difference; "held" reads "A beats B"), plus each study's training seconds.
Use it for a change that must not cost Dice, e.g. CPU bf16 against float32 on the quickstart.

Run: ``.venv/bin/python bench/compare_studies.py STUDY_A STUDY_B [--min-effect 0.005]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(study: Path, tag: str):
    """(per-case rows with model names prefixed ``tag:``, training seconds by model)."""
    from dataclasses import replace

    from sepnet.jobs.config import load_config
    from sepnet.jobs.report import collect_results

    cfg = load_config(study / "study.yaml")
    folds = sorted(int(p.name[4:]) for p in (study / "eval").glob("fold*") if (p / "done.json").is_file())
    rows = [replace(r, model=f"{tag}:{r.model}") for r in collect_results(cfg, folds).per_case]
    seconds = {}
    for p in (study / "models").glob("fold*/*/done.json"):
        seconds.setdefault(p.parent.name, []).append(float(json.loads(p.read_text()).get("train_seconds") or 0))
    return rows, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--min-effect", type=float, default=0.005, help="smallest Dice difference that counts")
    args = p.parse_args()
    import numpy as np

    from sepnet.evaluation.results import CaseIndex
    from sepnet.evaluation.significance import paired_test

    (rows_a, sec_a), (rows_b, sec_b) = _load(args.a, "A"), _load(args.b, "B")
    index = CaseIndex(rows_a + rows_b)
    models = [m[2:] for m in index.by if m.startswith("A:") and "B:" + m[2:] in index.by]
    print(f"# {args.a.name} (A) vs {args.b.name} (B): per-case paired tests\n")
    out = ["| model | organs | n | mean A | mean B | A - B | outcome (A beats B) |", "|---|---|---|---|---|---|---|"]
    for model in models:
        for how in ("weighted", "small"):
            a, b = index.paired(f"A:{model}", f"B:{model}", how)
            if len(a):
                t = paired_test(a, b, min_effect=args.min_effect)
                out.append(f"| {model} | {how} | {len(a)} | {np.mean(a):.3f} | {np.mean(b):.3f} | "
                           f"{t.describe()} | {t.status} |")
    print("\n".join(out) + "\n")
    ta, tb = sum(map(sum, sec_a.values())), sum(map(sum, sec_b.values()))
    if ta:
        print(f"Training seconds, all models: A {ta:.0f}, B {tb:.0f} (B / A = {tb / ta:.2f})")


if __name__ == "__main__":
    main()
