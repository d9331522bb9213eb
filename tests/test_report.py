from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from sepnet.core.ensemble import vote_entropy
from sepnet.evaluation import figures
from sepnet.evaluation.report import (
    CaseMetricRow,
    ModelInfo,
    StudyResults,
    VVCRow,
    evaluate_claims,
    write_report,
)
from sepnet.evaluation.uncertainty import UncertaintyCounts, error_counts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORGANS = (1, 4, 8, 20)  # brain stem (w 100), lens L (50, small), chiasm (50, small), spinal cord (100)
W = {1: 100, 4: 50, 8: 50, 20: 100}
CASES = [(k // 4, f"c{k}") for k in range(8)]  # 8 cases in 2 folds: enough for a paired test (>= 6)
K = len(CASES)
# model -> organ -> base Dice; case k adds 0.01 * k
BASE = {
    "slf1_a05": {1: 0.85, 4: 0.70, 8: 0.50, 20: 0.80},
    "slf2_a1": {1: 0.84, 4: 0.72, 8: 0.52, 20: 0.79},
    "nlf1": {1: 0.80, 4: 0.65, 8: 0.45, 20: 0.78},  # worse than SLF1 -> claim 1 held
    "lexp": {1: 0.90, 4: 0.75, 8: 0.55, 20: 0.85},  # better than ATH -> claim 2 not held
    "unet": {1: 0.90, 4: 0.60, 8: 0.40, 20: 0.85},  # better on large, worse on small -> claim 3 held
    "ensemble": {1: 0.88, 4: 0.78, 8: 0.58, 20: 0.83},  # above both members -> claim 4 held
}
MODELS = {
    "slf1_a05": ModelInfo("slf1_a05", "member", "sepnet", "SLF1", "ath_exp_log", 0.5, 2505527, {0: 3600, 1: 3000}),
    "slf2_a1": ModelInfo("slf2_a1", "member", "sepnet", "SLF2", "ath_exp_log", 1.0, 2505527, {0: 3500, 1: 3100}),
    "nlf1": ModelInfo("nlf1", "baseline", "sepnet", "NLF1", "ath_exp_log", 0.5, 2505527, {0: 3400}),
    "lexp": ModelInfo("lexp", "baseline", "sepnet", "SLF1", "exp_log", None, 2505527),
    "unet": ModelInfo("unet", "baseline", "unet3d", "SLF1", "ath_exp_log", 0.5, 9179207, {0: 7200, 1: 7000}),
    "ensemble": ModelInfo("ensemble", "ensemble"),
}


def dice_of(model, k, organ):
    return BASE[model][organ] + 0.01 * k


def hd_of(model, k, organ):
    return 5.0 - 3.0 * dice_of(model, k, organ)


def _rows():
    rows = []
    for model in BASE:
        for k, (fold, case) in enumerate(CASES):
            for organ in ORGANS:
                hd = hd_of(model, k, organ)
                if model == "unet" and k == 3 and organ == 8:
                    hd = float("inf")  # an empty prediction: left out of HD95 means
                rows.append(CaseMetricRow(fold, model, case, organ, dice_of(model, k, organ), hd, hd / 3, ""))
    return rows


def _uncertainty():
    # level counts whose error rate rises with entropy (3 voters: levels 0, 0.6365, 1.0986)
    return UncertaintyCounts(
        3,
        {"whole": [1000, 100, 10], "background": [900, 60, 5], "organs": [100, 40, 5]},
        {"whole": [10, 30, 6], "background": [5, 15, 2], "organs": [5, 15, 4]},
    )


def _vvc_rows():
    # VVC rises with Dice across organs -> claim 6 "not held" (paper: negative)
    return [VVCRow(f, c, o, 0.1 * i + 0.01 * k, 0.6 + 0.05 * i) for i, o in enumerate(ORGANS)
            for k, (f, c) in enumerate(CASES)]


def _results(**kw):
    args = dict(study="unit", folds=[0, 1], models=dict(MODELS), per_case=_rows(), uncertainty=_uncertainty(),
                vvc=_vvc_rows(), meta={"dataset": "synthetic"})
    args.update(kw)
    return StudyResults(**args)


def test_claims_as_constructed():
    claims = {c.id: c for c in evaluate_claims(_results())}
    assert [claims[i].status for i in range(1, 7)] == ["held", "not held", "held", "held", "held", "not held"]
    # claim 1 numbers: mean over cases of the unweighted organ mean
    n1 = claims[1].numbers[0]
    assert n1["model"] == "slf1_a05" and n1["other"] == "nlf1" and n1["cases"] == K
    expected = np.mean([np.mean([dice_of("slf1_a05", k, o) for o in ORGANS]) for k in range(K)])
    assert n1["dice"] == pytest.approx(expected)
    # claim 3 on small organs only (lens, chiasm)
    n3 = claims[3].numbers[0]
    assert n3["other"] == "unet"
    assert n3["other_dice"] == pytest.approx(np.mean([(dice_of("unet", k, 4) + dice_of("unet", k, 8)) / 2
                                                      for k in range(K)]))
    # claim 4 weighted by StructSeg weights; the best member is slf2_a1 (weighted)
    wmean = [sum(W[o] * dice_of("ensemble", k, o) for o in ORGANS) / sum(W.values()) for k in range(K)]
    n4 = {x["other"]: x for x in claims[4].numbers}
    assert n4["slf1_a05"]["dice"] == pytest.approx(np.mean(wmean))
    assert "ensemble" in claims[4].detail


def test_claims_not_measured_without_models():
    rows = [r for r in _rows() if r.model == "slf1_a05"]
    res = StudyResults("one", [0, 1], {"slf1_a05": MODELS["slf1_a05"]}, rows)
    claims = evaluate_claims(res)
    assert [c.status for c in claims] == ["not measured"] * 6
    assert "needs an SLF and an NLF model" in claims[0].detail
    assert "in the config" in claims[0].detail


def test_write_report_tables_and_files(tmp_path):
    out = tmp_path / "report"
    md_path = write_report(_results(), out)
    assert md_path == out / "report.md"
    for name in ("report.md", "report.json", "per_case.csv", "dice_table.csv", "hd95_table.csv", "models.csv",
                 "uncertainty_levels.csv", "vvc_dice.csv"):
        assert (out / name).is_file(), name
    for name in ("dice_by_organ.png", "hd95_by_organ.png", "error_rates.png", "vvc_dice.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    assert not list(out.glob("*.tmp-*"))

    with open(out / "dice_table.csv") as f:
        table = {(r["model"], r["organ_id"]): r for r in csv.DictReader(f)}
    # per-organ mean/std over the cases
    vals = [dice_of("lexp", k, 4) for k in range(K)]
    assert float(table[("lexp", "4")]["mean"]) == pytest.approx(np.mean(vals))
    assert float(table[("lexp", "4")]["std"]) == pytest.approx(np.std(vals))
    # weighted average: per-case weighted mean, then mean over cases
    w = [sum(W[o] * dice_of("unet", k, o) for o in ORGANS) / 300 for k in range(K)]
    assert float(table[("unet", "weighted")]["mean"]) == pytest.approx(np.mean(w))
    small = [np.mean([dice_of("slf2_a1", k, o) for o in (4, 8)]) for k in range(K)]
    assert float(table[("slf2_a1", "small")]["mean"]) == pytest.approx(np.mean(small))
    with open(out / "hd95_table.csv") as f:
        hd = {(r["model"], r["organ_id"]): r for r in csv.DictReader(f)}
    assert int(hd[("unet", "8")]["n"]) == K - 1 and int(hd[("unet", "8")]["missing"]) == 1
    assert float(hd[("unet", "8")]["mean"]) == pytest.approx(np.mean([hd_of("unet", k, 8) for k in range(K)
                                                                        if k != 3]))

    md = md_path.read_text()
    # the lens row's best is the ensemble
    lens_mean = 100 * np.mean([dice_of("ensemble", k, 4) for k in range(K)])
    lens_std = 100 * np.std([dice_of("ensemble", k, 4) for k in range(K)])
    assert f"**{lens_mean:.1f} ± {lens_std:.1f}**" in md
    assert "| Lens L |" in md and "Weighted average (StructSeg)" in md and "Small organs" in md
    assert "✅ held" in md and "❌ not held" in md
    # slf1_a05 trained 3600 s and 3000 s: 3300 s = 0:55:00 per fold, 6600 s = 1:50:00 in total
    assert "| slf1_a05 | member | 3D-SepNet | SLF1 | ATH-L_Exp | 0.5 | 2,505,527 | 0:55:00 | 1:50:00 |" in md
    # brain stem: lexp and unet tie (0.90 + mean 0.035) -> both bold
    assert "| Brain Stem | 88.5 ± 2.3 | 87.5 ± 2.3 | 83.5 ± 2.3 | **93.5 ± 2.3** | **93.5 ± 2.3** | 91.5 ± 2.3 |" in md
    rep = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in rep["claims"]] == ["held", "not held", "held", "held", "held", "not held"]
    assert rep["summary"]["ensemble"]["dice"]["weighted"]["n"] == K
    assert rep["uncertainty"]["voxels"]["whole"] == [1000, 100, 10]


def test_rows_from_csv_style_dicts():
    # the keys and string values jobs/evaluate writes to metrics.csv / vvc.csv
    res = StudyResults("d", [0], {"m": ModelInfo("m")},
                       [{"fold": "0", "model": "m", "case": "c0", "organ": "4", "name": "Lens_L", "dice": "0.5",
                         "hd95": "nan", "assd": "", "vol_pred_cm3": "0.1", "flag": "pred_empty"}],
                       vvc=[{"fold": 0, "case": "c0", "organ": 4, "name": "Lens_L", "vvc": "0.2", "dice": 0.5}])
    r = res.per_case[0]
    assert (r.fold, r.case_id, r.organ_id, r.dice, r.flag) == (0, "c0", 4, 0.5, "pred_empty")
    assert math.isnan(r.hd95) and math.isnan(r.assd)
    assert res.vvc[0] == VVCRow(0, "c0", 4, 0.2, 0.5)


def test_write_report_minimal_without_uncertainty(tmp_path):
    rows = [r for r in _rows() if r.model in ("slf1_a05", "ensemble")]
    res = StudyResults("min", [0], {"slf1_a05": MODELS["slf1_a05"], "ensemble": MODELS["ensemble"]}, rows)
    write_report(res, tmp_path)
    assert not (tmp_path / "error_rates.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "not measured (needs ensemble uncertainty counts" in md
    with pytest.raises(ValueError, match="not in StudyResults.models"):
        write_report(StudyResults("bad", [0], {}, rows), tmp_path / "bad")


def test_figures_write_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(0, 20, (8, 24, 24)).astype(np.float32)
    ref = np.zeros((8, 24, 24), np.uint8)
    ref[2:6, 6:14, 6:14] = 1
    ref[3:5, 15:20, 15:20] = 4
    members = np.stack([np.roll(ref, s, axis=2) for s in (0, 0, 1, 1, -1, 0)])
    h = vote_entropy(members)
    p = figures.overlay_figure(img, ref, members[0], tmp_path / "a" / "overlay.png", spacing_zyx=(3, 1, 1),
                               title="t")
    assert p.read_bytes()[:8] == PNG_MAGIC
    assert figures.uncertainty_figure(img, h, tmp_path / "u.png", spacing_zyx=(3, 1, 1), ref=ref).is_file()
    c = error_counts(members[0], ref, h, n_members=6)
    assert figures.error_rate_figure(c.table(), tmp_path / "e.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="does not match"):
        figures.overlay_figure(img, ref[:4], None, tmp_path / "x.png", spacing_zyx=(3, 1, 1))
    assert not math.isnan(float(h.max()))


def test_claim6_needs_a_significant_negative_correlation():
    organs = list(range(1, 11))
    # strongly negative: Dice falls as VVC rises across 10 organs -> held
    strong = [VVCRow(0, "c0", o, 0.05 * i, 0.9 - 0.05 * i) for i, o in enumerate(organs)]
    c6 = {c.id: c for c in evaluate_claims(_results(vvc=strong))}[6]
    assert c6.status == "held" and c6.numbers[0]["r"] < -0.99
    # a negative sign alone is not enough: a weak, non-significant r is inconclusive
    dice = [0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.45]
    weak = [VVCRow(0, "c0", o, 0.05 * i, d) for i, (o, d) in enumerate(zip(organs, dice))]
    c6 = {c.id: c for c in evaluate_claims(_results(vvc=weak))}[6]
    r, p = c6.numbers[0]["r"], c6.numbers[0]["p"]
    assert r < 0 and p > 0.05 and c6.status == "inconclusive"


def _two_models(n_cases, lead, *, noise=0.0, seed=0):
    """slf1 vs nlf1 (claim 1) on n_cases: slf1's mean Dice is nlf1's + lead (+ per-case noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_cases):
        base = 0.6 + 0.02 * (k % 5)
        d = lead + (noise * rng.normal() if noise else 0.0)
        for organ in (1, 4):
            rows.append(CaseMetricRow(0, "slf1_a05", f"c{k}", organ, base + d, 2.0, 1.0, "ok"))
            rows.append(CaseMetricRow(0, "nlf1", f"c{k}", organ, base, 2.0, 1.0, "ok"))
    models = {"slf1_a05": MODELS["slf1_a05"], "nlf1": MODELS["nlf1"]}
    return {c.id: c for c in evaluate_claims(StudyResults("s", [0], models, rows))}


def test_claims_by_paired_statistics():
    # a +1e-6 Dice lead on 2 cases was "held": now inconclusive, and the minimum n is stated
    c1 = _two_models(2, 1e-6)[1]
    assert c1.status == "inconclusive" and "2 cases < 6 needed" in c1.detail
    # a clear effect on 12 cases: held, with n, effect, CI and p shown
    c1 = _two_models(12, 0.03, noise=0.01)[1]
    assert c1.status == "held"
    x = c1.numbers[0]
    assert x["n"] == 12 and x["p"] < 0.01 and x["ci_low"] > 0 and "n=12" in c1.detail and "p=" in c1.detail
    # the clear reverse effect: not held
    assert _two_models(12, -0.03, noise=0.01)[1].status == "not held"
    # below the stated minimum effect (0.5 DSC points) on 12 cases: inconclusive
    assert _two_models(12, 0.001)[1].status == "inconclusive"


def test_claim5_needs_more_than_one_uncertain_voxel():
    one = UncertaintyCounts(3, {"whole": [1000, 1, 0], "background": [900, 1, 0], "organs": [100, 0, 0]},
                            {"whole": [10, 1, 0], "background": [5, 1, 0], "organs": [5, 0, 0]})
    c5 = {c.id: c for c in evaluate_claims(_results(uncertainty=one))}[5]
    assert c5.status == "inconclusive" and "1 voxels above entropy 0 < 100 needed" in c5.detail
    # per-case counts: one case with one uncertain voxel is 1 paired observation -> inconclusive
    c5 = {c.id: c for c in evaluate_claims(_results(uncertainty=one, uncertainty_cases={(0, "c0"): one}))}[5]
    assert c5.status == "inconclusive" and "1 cases < 6 needed" in c5.detail


def test_claim5_paired_over_cases():
    rng = np.random.default_rng(0)
    cases = {}
    for k in range(10):
        e0 = int(rng.integers(5, 15))
        e1 = int(rng.integers(30, 60))
        cases[(0, f"c{k}")] = UncertaintyCounts(
            3, {"whole": [1000, 100, 0], "background": [900, 60, 0], "organs": [100, 40, 0]},
            {"whole": [e0, e1, 0], "background": [e0, e1, 0], "organs": [0, 0, 0]})
    c5 = {c.id: c for c in evaluate_claims(_results(uncertainty_cases=cases))}[5]
    t = c5.numbers[0]
    assert c5.status == "held" and t["test"] == "wilcoxon_per_case" and t["n"] == 10
    assert t["p"] == pytest.approx(2 / 2**10)  # every case's uncertain rate is higher: exact p
    # reversed (errors concentrated at entropy 0): not held
    rev = {k: UncertaintyCounts(3, c.voxels, {r: v[::-1].copy() if r != "organs" else v for r, v in c.errors.items()})
           for k, c in cases.items()}
    for c in rev.values():
        c.errors["whole"] = np.array([300, 1, 0])
    assert {c.id: c for c in evaluate_claims(_results(uncertainty_cases=rev))}[5].status == "not held"


def test_missed_organs_beside_every_hd_mean(tmp_path):
    # one case: the lens is missed (HD NaN), the brain stem absent and predicted absent (HD 0 by policy)
    rows = [CaseMetricRow(0, "m", "c0", 4, 0.0, float("nan"), float("nan"), "pred_empty"),
            CaseMetricRow(0, "m", "c0", 1, 1.0, 0.0, 0.0, "both_empty"),
            CaseMetricRow(0, "m", "c1", 4, 0.8, 1.5, 0.5, "ok"),
            CaseMetricRow(0, "m", "c1", 1, 0.9, 2.5, 0.7, "ok")]
    write_report(StudyResults("miss", [0], {"m": ModelInfo("m")}, rows), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| Lens L | 1.50 ± 0.00 (1 missed) |" in md
    assert "| Brain Stem | 1.25 ± 1.25 |" in md  # nothing missed: no note
    # case c0's weighted HD95 is 0.0 mm only because the lens was missed: the cell says so
    assert "| **Weighted average (StructSeg)** | 1.08 ± 1.08 (1 missed) |" in md
    assert "| **Small organs** | 1.50 ± 0.00 (1 missed) |" in md
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["summary"]["m"]["hd95"]["weighted"]["missed"] == 1
    assert rep["summary"]["m"]["hd95"]["small"]["missed"] == 1
    with open(tmp_path / "hd95_table.csv") as f:
        table = {(r["model"], r["organ_id"]): r for r in csv.DictReader(f)}
    assert table[("m", "4")]["missed"] == "1" and table[("m", "1")]["missed"] == "0"


def test_postprocessed_ensemble_row_is_shown_and_kept_out_of_claims(tmp_path):
    models = dict(MODELS)
    models["ensemble+pp"] = ModelInfo("ensemble+pp", "ensemble", postprocessed=True)
    rows = _rows()
    # the postprocessed ensemble is better than the ensemble: still, claim 4 compares the plain one
    rows += [CaseMetricRow(r.fold, "ensemble+pp", r.case_id, r.organ_id, min(1.0, r.dice + 0.05), r.hd95 - 1.0,
                           r.assd, "") for r in rows if r.model == "ensemble"]
    res = _results(models=models, per_case=rows)
    c4 = {c.id: c for c in evaluate_claims(res)}[4]
    assert {x["model"] for x in c4.numbers} == {"ensemble"}
    write_report(res, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| ensemble | ensemble+pp |" in md.splitlines()[md.splitlines().index("## Dice similarity coefficient") + 2]
    assert "ensemble+pp: keep-largest-connected-component postprocessing" in md


def test_collect_results_reads_pp_rows_and_per_case_uncertainty(tmp_path):
    from sepnet.hpc.atomic import atomic_write_json, atomic_write_text
    from sepnet.jobs.config import load_config
    from sepnet.jobs.report import collect_results

    cfg = load_config("configs/quickstart.yaml", overrides={"root": str(tmp_path)})
    d = tmp_path / "eval" / "fold0"
    atomic_write_json(d / "done.json", {"fold": 0, "models": {}})
    lines = ["fold,model,case,organ,name,dice,hd95,assd,flag"]
    for model in ("ensemble", "ensemble+pp", "sep-slf1-a05", "stranger+pp"):
        lines += [f"0,{model},c{k},4,Lens_L,0.5,2.0,1.0,ok" for k in range(2)]
    atomic_write_text(d / "metrics.csv", "\n".join(lines) + "\n")
    one = {"voxels": {"whole": [10, 2, 0, 0], "background": [5, 1, 0, 0], "organs": [5, 1, 0, 0]},
           "errors": {"whole": [1, 1, 0, 0], "background": [0, 1, 0, 0], "organs": [1, 0, 0, 0]}}
    cfg_members = len(cfg.members)
    levels = len(UncertaintyCounts(cfg_members).levels)
    one = {k: {r: (v + [0] * levels)[:levels] for r, v in reg.items()} for k, reg in one.items()}
    atomic_write_json(d / "uncertainty.json", {"n_members": cfg_members, **one, "per_case": {"c0": one, "c1": one}})
    res = collect_results(cfg, [0])
    pp = res.models["ensemble+pp"]
    assert pp.postprocessed and pp.kind == "ensemble" and "stranger+pp" not in res.models
    assert {r.model for r in res.per_case} == {"ensemble", "ensemble+pp", "sep-slf1-a05"}
    assert set(res.uncertainty_cases) == {(0, "c0"), (0, "c1")}
    assert res.uncertainty_cases[(0, "c1")].errors["whole"][:2].tolist() == [1, 1]
