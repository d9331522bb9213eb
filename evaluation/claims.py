"""The paper's six claims decided on a study's data: held / not held / inconclusive / not measured.

1. SLF beats NLF, 2. ATH-L_Exp beats L_Exp, 3. 3D-SepNet beats the 3D-UNet variants on small organs,
4. the ensemble beats its members, 5. the voxel error rate rises with vote entropy, 6. VVC is negatively
correlated with DSC across organs.

Claims 1-4 compare models on the (fold, case) pairs they share, so folds one model lacks do not bias it,
by paired tests (:mod:`sepnet.evaluation.significance`); a claim over several comparisons is combined with
:func:`sepnet.evaluation.significance.combine`. Postprocessed models never enter a claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from sepnet.evaluation.results import CaseIndex, ModelInfo, StudyResults, ordered_models, pct
from sepnet.evaluation.significance import (
    ALPHA,
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    PairedTest,
    combine,
    min_cases,
    paired_test,
)
from sepnet.evaluation.uncertainty import UncertaintyCounts, error_rate_trend, vvc_dice_fit, vvc_dice_table

UNET_VARIANTS = ("unet3d", "unet3d_res", "unet3d_se")
# Smallest effects a claim needs (below them it is inconclusive): mean paired DSC difference (0.5 points),
# mean paired error-rate difference (1 point), and |Pearson r| of VVC against DSC.
MIN_DICE_EFFECT = 0.005
MIN_ERROR_RATE_EFFECT = 0.01
MIN_VVC_R = 0.3
MIN_UNCERTAIN_VOXELS = 100  # pooled-count fallback of claim 5

STATISTICS_NOTE = (
    f"Claims 1-4: paired Wilcoxon signed-rank test (two-sided) of the case scores the two models share, with "
    f"a seeded bootstrap 95% CI of the mean difference; held/not held needs p < {ALPHA:g}, at least "
    f"{min_cases(ALPHA)} cases and a mean difference of at least {100 * MIN_DICE_EFFECT:g} DSC points, "
    f"otherwise inconclusive; a claim over several comparisons holds only if each holds. Claim 5: the same "
    f"test on each case's error rate above vs at entropy 0 (minimum {100 * MIN_ERROR_RATE_EFFECT:g} percentage "
    f"point). "
    f"Claim 6: Pearson r across organs, p < {ALPHA:g} and |r| >= {MIN_VVC_R:g}."
)


@dataclass
class Claim:
    id: int
    title: str
    status: str  # "held" | "not held" | "inconclusive" | "not measured"
    detail: str
    numbers: list[dict] = field(default_factory=list)


def statistics_settings() -> dict:
    """The thresholds the claims are decided with (report.json's ``claims_statistics``)."""
    return {"alpha": ALPHA, "min_cases": min_cases(ALPHA), "min_dice_effect": MIN_DICE_EFFECT,
            "min_error_rate_effect": MIN_ERROR_RATE_EFFECT, "min_vvc_r": MIN_VVC_R,
            "min_uncertain_voxels_pooled": MIN_UNCERTAIN_VOXELS}


def evaluate_claims(results: StudyResults) -> list[Claim]:
    """The paper's six claims, each held / not held / inconclusive / not measured on this study's data."""
    idx = CaseIndex(results.per_case)
    models = results.models
    single = [n for n in ordered_models(results)
              if models[n].kind != "ensemble" and not models[n].postprocessed and n in idx.by]
    return [
        _claim_transform(idx, models, single),
        _claim_loss(idx, models, single),
        _claim_network(idx, models, single),
        _claim_ensemble(idx, results, single),
        _claim_error_rate(results),
        _claim_vvc(results),
    ]


# --------------------------------------------------------------------------- claims 1-4: paired DSC

def _dice_comparison(idx: CaseIndex, a: str, b: str, how: str, group: str = "") -> dict:
    """Paired test of "a has a higher case DSC than b" (``how`` average) as a numbers entry."""
    sa, sb = idx.paired(a, b, how)
    t = paired_test(sa, sb, min_effect=MIN_DICE_EFFECT)
    return {"group": group, "model": a, "other": b, "dice": float(sa.mean()) if sa.size else float("nan"),
            "other_dice": float(sb.mean()) if sb.size else float("nan"), "cases": t.n, "status": t.status,
            "holds": t.status == HELD, **asdict(t)}


def _describe(x: dict, metric: str) -> str:
    t = {k: x[k] for k in ("status", "n", "effect", "ci_low", "ci_high", "p", "min_effect", "min_n", "reason")}
    return (f"{x['model']} {pct(x['dice'])} vs {x['other']} {pct(x['other_dice'])} ({metric}; "
            f"{PairedTest(**t).describe()}): {x['status']}")


def _compare_claim(
    cid: int,
    title: str,
    idx: CaseIndex,
    pairs: list[tuple[str, str, str]],
    *,
    how: str,
    needs: str,
) -> Claim:
    """pairs: (winner-candidate, other, group description); each decided by a paired test on the case
    scores, the claim by :func:`sepnet.evaluation.significance.combine`."""
    numbers = [x for x in (_dice_comparison(idx, a, b, how, group) for a, b, group in pairs) if x["cases"]]
    if not numbers:
        return Claim(cid, title, "not measured", f"not measured (needs {needs} in the config)")
    metric = {"mean": "mean DSC", "weighted": "weighted DSC", "small": "small-organ DSC"}[how]
    detail = "; ".join(_describe(x, metric) for x in numbers)
    return Claim(cid, title, combine([x["status"] for x in numbers]), detail, numbers)


def _first(names: list[str], models: dict[str, ModelInfo], pred: Callable[[ModelInfo], bool]) -> str | None:
    return next((n for n in names if pred(models[n])), None)


def _claim_transform(idx: CaseIndex, models: dict[str, ModelInfo], single: list[str]) -> Claim:
    """(1) SLF vs NLF: same network + loss (+ alpha); the SLF1 model (paper's choice) else the first SLF."""
    pairs = []
    groups: dict[tuple, list[str]] = {}
    for n in single:
        m = models[n]
        groups.setdefault((m.network, m.loss, m.alpha if m.loss == "ath_exp_log" else None), []).append(n)
    for (net, loss, alpha), names in groups.items():
        slf = [n for n in names if (models[n].transform or "").startswith("SLF")]
        ref = _first(slf, models, lambda m: m.transform == "SLF1") or (slf[0] if slf else None)
        for other in names:
            if ref and (models[other].transform or "").startswith("NLF"):
                pairs.append((ref, other, f"{net}/{loss}" + (f"(α={alpha:g})" if alpha is not None else "")))
    return _compare_claim(1, "SLF intensity transform beats NLF windows (same network and loss)", idx,
                          pairs, how="mean", needs="an SLF and an NLF model with the same network and loss")


def _claim_loss(idx: CaseIndex, models: dict[str, ModelInfo], single: list[str]) -> Claim:
    """(2) ATH-L_Exp vs L_Exp: same network + transform; the alpha=0.5 ATH model (Table 1) else the first."""
    pairs = []
    groups: dict[tuple, list[str]] = {}
    for n in single:
        groups.setdefault((models[n].network, models[n].transform), []).append(n)
    for (net, tr), names in groups.items():
        ath = [n for n in names if models[n].loss == "ath_exp_log"]
        ref = _first(ath, models, lambda m: m.alpha == 0.5) or (ath[0] if ath else None)
        for other in names:
            if ref and models[other].loss == "exp_log":
                pairs.append((ref, other, f"{net}/{tr}"))
    return _compare_claim(2, "ATH-L_Exp beats L_Exp (same network and transform)", idx, pairs, how="mean",
                          needs="an ath_exp_log and an exp_log model with the same network and transform")


def _claim_network(idx: CaseIndex, models: dict[str, ModelInfo], single: list[str]) -> Claim:
    """(3) SepNet vs each 3D-UNet variant on the small organs: same transform + loss (+ alpha)."""
    pairs = []
    groups: dict[tuple, list[str]] = {}
    for n in single:
        m = models[n]
        groups.setdefault((m.transform, m.loss, m.alpha if m.loss == "ath_exp_log" else None), []).append(n)
    for (tr, loss, _alpha), names in groups.items():
        sep = next((n for n in names if models[n].network == "sepnet"), None)
        for other in names:
            if sep and models[other].network in UNET_VARIANTS:
                pairs.append((sep, other, f"{tr}/{loss}"))
    return _compare_claim(3, "3D-SepNet beats 3D-UNet variants on small organs", idx, pairs, how="small",
                          needs="a sepnet and a unet3d (or _res/_se) model with the same transform and loss")


def _claim_ensemble(idx: CaseIndex, results: StudyResults, single: list[str]) -> Claim:
    """(4) The (not postprocessed) ensemble beats every member (weighted DSC): each by a paired test."""
    title = "The ensemble beats the best single member (weighted DSC)"
    models = results.models
    ens = [n for n in ordered_models(results) if models[n].kind == "ensemble" and n in idx.by
           and not models[n].postprocessed]
    members = [n for n in single if models[n].kind == "member"]
    comps = [_dice_comparison(idx, ens[0], m, "weighted") for m in members] if ens else []
    comps = [c for c in comps if c["cases"]]
    if not comps:
        return Claim(4, title, "not measured",
                     "not measured (needs an ensemble of at least one member in the config, evaluated)")
    best = max(comps, key=lambda c: c["other_dice"])
    others = [c for c in comps if c is not best]
    detail = "best member: " + _describe(best, "weighted DSC")
    if others:
        detail += f"; vs the other {len(others)} member(s): " + ", ".join(f"{c['other']} {c['status']}" for c in others)
    return Claim(4, title, combine([c["status"] for c in comps]), detail, comps)


# --------------------------------------------------------------------------- claims 5-6: uncertainty

_ERROR_RATE_TITLE = "Voxel error rate increases with the vote-entropy level"


def _claim_error_rate(results: StudyResults) -> Claim:
    """(5) Error rate at vote entropy > 0 above the rate at 0: paired over cases (per-case counts) or,
    with pooled counts only, a chi-square test on the 2x2 table (voxels treated as independent)."""
    u = results.uncertainty
    trends = [error_rate_trend(u, region=r) for r in ("whole", "background", "organs")] if u is not None else []
    trend_txt = "; ".join(
        f"{x['region']}: {pct(x['rate_certain'])} at entropy 0 vs {pct(x['rate_uncertain'])} above, "
        f"Spearman {x['spearman']:.2f} over {x['levels_used']} levels"
        for x in trends if x["increases"] is not None)
    if results.uncertainty_cases:
        certain, uncertain = [], []
        for c in results.uncertainty_cases.values():
            v, e = c.voxels["whole"], c.errors["whole"]
            if v[0] > 0 and v[1:].sum() > 0:
                certain.append(e[0] / v[0])
                uncertain.append(e[1:].sum() / v[1:].sum())
        t = paired_test(uncertain, certain, min_effect=MIN_ERROR_RATE_EFFECT)
        detail = f"per-case error rate above entropy 0 minus at 0: {t.describe()}"
        return Claim(5, _ERROR_RATE_TITLE, t.status, detail + (f"; pooled {trend_txt}" if trend_txt else ""),
                     [{"test": "wilcoxon_per_case", **asdict(t)}, *trends])
    if u is None:
        return Claim(5, _ERROR_RATE_TITLE, "not measured",
                     "not measured (needs ensemble uncertainty counts: an ensemble of >= 2 members evaluated)")
    return _claim_error_rate_pooled(u, trends, trend_txt)


def _claim_error_rate_pooled(u: UncertaintyCounts, trends: list[dict], trend_txt: str) -> Claim:
    """Claim 5 from fold-pooled counts only: chi-square on [[errors, correct] at 0, above 0]."""
    v, e = u.voxels["whole"], u.errors["whole"]
    vu, eu, v0, e0 = int(v[1:].sum()), int(e[1:].sum()), int(v[0]), int(e[0])
    effect = (eu / vu if vu else float("nan")) - (e0 / v0 if v0 else float("nan"))
    num = {"test": "chi2_pooled", "uncertain_voxels": vu, "effect": effect, "p": float("nan")}
    if vu < MIN_UNCERTAIN_VOXELS or not v0:
        status, why = INCONCLUSIVE, f"{vu} voxels above entropy 0 < {MIN_UNCERTAIN_VOXELS} needed"
    else:
        from scipy.stats import chi2_contingency

        table = [[e0, v0 - e0], [eu, vu - eu]]
        num["p"] = p = float(chi2_contingency(table)[1]) if min(e0 + eu, v0 + vu - e0 - eu) > 0 else 1.0
        if abs(effect) < MIN_ERROR_RATE_EFFECT:
            status, why = INCONCLUSIVE, f"|effect| below the minimum {MIN_ERROR_RATE_EFFECT:g}"
        elif not p < ALPHA:
            status, why = INCONCLUSIVE, f"p >= {ALPHA:g}"
        else:
            status, why = (HELD if effect > 0 else NOT_HELD), ""
    detail = (f"pooled voxels (no per-case counts; voxels are not independent, so p is optimistic): "
              f"{100 * effect:+.2f} pts" + (f", p={num['p']:.2g}" if math.isfinite(num["p"]) else "")
              + (f" ({why})" if why else "") + (f"; {trend_txt}" if trend_txt else ""))
    return Claim(5, _ERROR_RATE_TITLE, status, detail, [num, *trends])


def _claim_vvc(results: StudyResults) -> Claim:
    """(6) VVC negatively correlated with DSC across organs (Fig. 13): Pearson r with its p."""
    title = "Structure uncertainty (VVC) is negatively correlated with DSC"
    table = vvc_dice_table(results.vvc) if results.vvc else []
    fit = vvc_dice_fit(table) if table else None
    if fit is None or fit.n < 3 or not math.isfinite(fit.r):
        return Claim(6, title, "not measured",
                     "not measured (needs ensemble VVC rows for at least 3 organs with varying values)")
    if abs(fit.r) < MIN_VVC_R:
        status, why = INCONCLUSIVE, f"|r| below the minimum {MIN_VVC_R:g}"
    elif not fit.p < ALPHA:
        status, why = INCONCLUSIVE, f"p >= {ALPHA:g}"
    else:
        status, why = (HELD if fit.r < 0 else NOT_HELD), ""
    return Claim(6, title, status, f"Pearson r = {fit.r:.2f} (p = {fit.p:.3g}), slope {100 * fit.slope:.1f} "
                 f"DSC-% per unit VVC, over {fit.n} organs" + (f" ({why})" if why else ""), [asdict(fit)])
