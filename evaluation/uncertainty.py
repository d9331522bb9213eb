"""The paper's uncertainty analyses (Sec. 4.1.3, Figs. 12-13) as count tables and fits.

Fig. 12: per vote-entropy level, in three regions of the fused prediction,
- ``whole``: every voxel;
- ``background``: voxels the ensemble predicts as background (their errors are under-segmentation);
- ``organs``: voxels the ensemble predicts as an organ (their errors are over-segmentation, including
  confusions between organs);
the error rate ``#misclassified at level / #voxels at level`` (a-c) and the share of the region's
misclassified voxels that lie at each level (d-f). :class:`UncertaintyCounts` holds the raw counts, so
cases and folds pool by adding counts (``a + b``), never by averaging rates.

Fig. 13: per organ, the mean VVC across cases against the mean ensemble Dice, with a least-squares
line and the Pearson correlation (:func:`vvc_dice_table`, :func:`fit_line`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from sepnet.core.ensemble import entropy_levels, quantise_levels
from sepnet.core.organs import ORGAN_NAMES

REGIONS: tuple[str, ...] = ("whole", "background", "organs")


@dataclass
class UncertaintyCounts:
    """Voxel and error counts per vote-entropy level and region for an ensemble of ``n_members``.

    voxels[r][l], errors[r][l]: int counts for region r (see :data:`REGIONS`) and level index l of
    ``entropy_levels(n_members)``.
    """

    n_members: int
    voxels: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nl = len(self.levels)
        for d in (self.voxels, self.errors):
            for r in REGIONS:
                d[r] = np.zeros(nl, dtype=np.int64) if r not in d else np.asarray(d[r], dtype=np.int64)
                if d[r].shape != (nl,):
                    raise ValueError(f"UncertaintyCounts: region {r} needs {nl} level counts, got {d[r].shape}")

    @property
    def levels(self) -> np.ndarray:
        return entropy_levels(self.n_members)

    def __add__(self, other: UncertaintyCounts) -> UncertaintyCounts:
        if other.n_members != self.n_members:
            raise ValueError(f"cannot pool counts of {self.n_members} and {other.n_members} members")
        return UncertaintyCounts(
            self.n_members,
            {r: self.voxels[r] + other.voxels[r] for r in REGIONS},
            {r: self.errors[r] + other.errors[r] for r in REGIONS},
        )

    def to_dict(self) -> dict:
        return {
            "n_members": self.n_members,
            "levels": self.levels.tolist(),
            "voxels": {r: self.voxels[r].tolist() for r in REGIONS},
            "errors": {r: self.errors[r].tolist() for r in REGIONS},
        }

    @classmethod
    def from_dict(cls, d: dict) -> UncertaintyCounts:
        return cls(int(d["n_members"]), dict(d["voxels"]), dict(d["errors"]))

    def table(self, *, nonempty: bool = True) -> list[dict]:
        """Rows (one per region and level) for Fig. 12.

        Keys: region, level (1-based, as the paper numbers them), entropy (nats), voxels, errors,
        error_rate (errors / voxels, NaN where no voxels), error_share (errors / the region's errors,
        NaN where the region has none). ``nonempty`` drops levels with no voxel in the whole image.
        """
        rows = []
        keep = self.voxels["whole"] > 0 if nonempty else np.ones(len(self.levels), bool)
        for r in REGIONS:
            total_err = int(self.errors[r].sum())
            for li, h in enumerate(self.levels):
                if not keep[li]:
                    continue
                v, e = int(self.voxels[r][li]), int(self.errors[r][li])
                rows.append(
                    {
                        "region": r,
                        "level": li + 1,
                        "entropy": float(h),
                        "voxels": v,
                        "errors": e,
                        "error_rate": e / v if v else float("nan"),
                        "error_share": e / total_err if total_err else float("nan"),
                    }
                )
        return rows


def error_counts(
    fused,
    ref,
    entropy,
    *,
    n_members: int,
    annotated: Iterable[int] | None = None,
    tol: float = 1e-4,
) -> UncertaintyCounts:
    """Count voxels and misclassified voxels per entropy level for one case.

    Args:
        fused: (Z, Y, X) int fused (ensemble) labels, 0 = background.
        ref: (Z, Y, X) int reference labels.
        entropy: (Z, Y, X) vote entropy in nats from :func:`sepnet.core.ensemble.vote_entropy` of the
            ``n_members`` members' labels.
        annotated: organ ids annotated in this case; voxels whose fused or reference label is an organ
            outside it are left out (their truth is unknown). None = all annotated.

    Returns:
        :class:`UncertaintyCounts` of this case; add cases with ``+``.
    """
    fused = np.asarray(fused)
    ref = np.asarray(ref)
    if fused.shape != ref.shape or np.shape(entropy) != fused.shape:
        raise ValueError(
            f"error_counts: fused {fused.shape}, ref {ref.shape} and entropy {np.shape(entropy)} must match"
        )
    level = quantise_levels(entropy, n_members, tol=tol).ravel()
    f = fused.ravel()
    g = ref.ravel()
    valid = None
    if annotated is not None:
        annotated = [int(a) for a in annotated]
        ann = np.zeros(max(int(f.max(initial=0)), int(g.max(initial=0)), *annotated, 0) + 1, dtype=bool)
        ann[0] = True
        ann[annotated] = True
        valid = ann[f] & ann[g]
    err = f != g
    pred_bg = f == 0
    nl = len(entropy_levels(n_members))
    counts = UncertaintyCounts(n_members)
    for r, mask in (("whole", None), ("background", pred_bg), ("organs", ~pred_bg)):
        m = valid if mask is None else (mask if valid is None else mask & valid)
        lv = level if m is None else level[m]
        e = err if m is None else err[m]
        counts.voxels[r] = np.bincount(lv, minlength=nl).astype(np.int64)
        counts.errors[r] = np.bincount(lv[e], minlength=nl).astype(np.int64)
    return counts


def pool(counts: Iterable[UncertaintyCounts]) -> UncertaintyCounts | None:
    """Sum counts over cases / folds; None for an empty iterable."""
    out = None
    for c in counts:
        out = c if out is None else out + c
    return out


def counts_to_json(per_case: dict[str, UncertaintyCounts]) -> dict:
    """The fold's ``uncertainty.json``: the pooled counts (:meth:`UncertaintyCounts.to_dict`) plus
    ``"per_case": {case_id: {"voxels": ..., "errors": ...}}``; ``{}`` when there are no cases."""
    pooled = pool(per_case.values())
    if pooled is None:
        return {}
    cases = {}
    for case, c in per_case.items():
        d = c.to_dict()
        cases[str(case)] = {"voxels": d["voxels"], "errors": d["errors"]}
    return {**pooled.to_dict(), "per_case": cases}


def counts_from_json(d: dict) -> tuple[UncertaintyCounts | None, dict[str, UncertaintyCounts]]:
    """(pooled counts or None, case_id -> counts) from :func:`counts_to_json` output; files without
    ``per_case`` give an empty dict."""
    if not d:
        return None, {}
    n = int(d["n_members"])
    cases = {str(k): UncertaintyCounts(n, dict(v["voxels"]), dict(v["errors"]))
             for k, v in (d.get("per_case") or {}).items()}
    return UncertaintyCounts.from_dict(d), cases


def error_rate_trend(counts: UncertaintyCounts, *, region: str = "whole", min_voxels: int = 1) -> dict:
    """Does the error rate grow with the uncertainty level? (the paper's Fig. 12 a-c reading)

    Returns a dict: ``rate_certain`` (error rate at entropy 0), ``rate_uncertain`` (pooled over all
    levels > 0), ``spearman`` (rank correlation of entropy and error rate over levels with at least
    ``min_voxels`` voxels; NaN with fewer than 2 such levels), ``levels_used``, ``increases`` (rate at
    entropy 0 below the pooled uncertain rate and spearman > 0; None when not measurable).
    """
    v = counts.voxels[region]
    e = counts.errors[region]
    rate_certain = e[0] / v[0] if v[0] else float("nan")
    vu, eu = int(v[1:].sum()), int(e[1:].sum())
    rate_uncertain = eu / vu if vu else float("nan")
    use = v >= max(min_voxels, 1)
    rho = float("nan")
    if use.sum() >= 2:
        rates = e[use] / v[use]
        if np.ptp(rates) > 0:
            rho = float(stats.spearmanr(counts.levels[use], rates).statistic)
    measurable = np.isfinite(rate_certain) and np.isfinite(rate_uncertain) and np.isfinite(rho)
    return {
        "region": region,
        "rate_certain": float(rate_certain),
        "rate_uncertain": float(rate_uncertain),
        "spearman": rho,
        "levels_used": int(use.sum()),
        "increases": bool(rate_certain < rate_uncertain and rho > 0) if measurable else None,
    }


@dataclass(frozen=True)
class LineFit:
    """Least-squares line y = slope * x + intercept and Pearson r (p two-sided) over n points."""

    slope: float
    intercept: float
    r: float
    p: float
    n: int


def fit_line(x: Sequence[float], y: Sequence[float]) -> LineFit:
    """Least-squares line and Pearson correlation over the finite (x, y) pairs (NaN if < 2 / constant)."""
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(xa.size)
    if n < 2 or np.ptp(xa) == 0:
        return LineFit(float("nan"), float("nan"), float("nan"), float("nan"), n)
    slope, intercept = np.polyfit(xa, ya, 1)
    if np.ptp(ya) == 0:
        return LineFit(float(slope), float(intercept), float("nan"), float("nan"), n)
    if n < 3:
        r, p = float(np.corrcoef(xa, ya)[0, 1]), float("nan")
    else:
        res = stats.pearsonr(xa, ya)
        r, p = float(res.statistic), float(res.pvalue)
    return LineFit(float(slope), float(intercept), r, p, n)


def vvc_dice_table(rows: Iterable) -> list[dict]:
    """Per-organ mean VVC and mean ensemble Dice across cases (Fig. 13's points).

    Args:
        rows: per (case, organ) records with attributes or keys ``organ_id``, ``vvc``, ``dice``
            (e.g. :class:`sepnet.evaluation.report.VVCRow`); non-finite values are skipped per column.

    Returns:
        rows sorted by organ id: organ_id, organ, vvc (mean), dice (mean), n (cases with both finite).
    """
    by: dict[int, list[tuple[float, float]]] = {}
    for row in rows:
        get = row.get if isinstance(row, dict) else lambda k, _r=row: getattr(_r, k)
        by.setdefault(int(get("organ_id")), []).append((float(get("vvc")), float(get("dice"))))
    out = []
    for organ in sorted(by):
        a = np.asarray(by[organ], dtype=np.float64)
        ok = np.isfinite(a).all(axis=1)
        out.append(
            {
                "organ_id": organ,
                "organ": ORGAN_NAMES.get(organ, str(organ)),
                "vvc": float(a[ok, 0].mean()) if ok.any() else float("nan"),
                "dice": float(a[ok, 1].mean()) if ok.any() else float("nan"),
                "n": int(ok.sum()),
            }
        )
    return out


def vvc_dice_fit(table: Sequence[dict]) -> LineFit:
    """Fig. 13's fitted line of mean Dice against mean VVC over the organs of :func:`vvc_dice_table`."""
    return fit_line([r["vvc"] for r in table], [r["dice"] for r in table])
