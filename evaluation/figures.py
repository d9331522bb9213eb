"""PNG figure writers (matplotlib, Agg backend): overlays, uncertainty maps, Fig. 12 and Fig. 13 analogues.

Every writer saves atomically (:func:`sepnet.hpc.atomic.atomic_write`) and returns the path.
Slices are shown in radiological convention for LPS arrays: axial with anterior up and the patient's
left on the image right; coronal and sagittal with superior up. Pixel aspect comes from the spacing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from sepnet.core.organs import ORGAN_NAMES  # noqa: E402
from sepnet.hpc.atomic import atomic_write  # noqa: E402

# HU window used when the image looks like HU (soft tissue + bone readable): level 150, width 1300
HU_WINDOW = (-500.0, 800.0)


def _save(fig, out_png: str | os.PathLike) -> Path:
    try:
        return atomic_write(out_png, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _organ_colour(organ: int):
    # strong tab20 colours for organs 1-10, their light partners for 11-20, Set1 beyond
    if organ > 20:
        return plt.get_cmap("Set1")((organ - 21) % 9)
    k = organ - 1
    return plt.get_cmap("tab20")((2 * k) % 20 + k // 10)


def _display_range(image: np.ndarray, window) -> tuple[float, float]:
    if window is not None:
        return float(window[0]), float(window[1])
    lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    if lo >= -0.01 and hi <= 1.01:  # transformed intensities
        return 0.0, 1.0
    return HU_WINDOW


def _centre(*masks) -> tuple[int, int, int]:
    """Integer (z, y, x) centroid of the union of the given masks; the volume centre if all are empty."""
    union = None
    for m in masks:
        if m is None:
            continue
        union = m if union is None else (union | m)
    shape = next(m.shape for m in masks if m is not None)
    if union is None or not union.any():
        return tuple(s // 2 for s in shape)
    idx = np.argwhere(union)
    # the voxel of the union nearest to its centroid, so each view cuts through an organ
    c = idx.mean(axis=0)
    return tuple(int(v) for v in idx[np.argmin(((idx - c) ** 2).sum(axis=1))])


def _views(volume: np.ndarray, centre, spacing_zyx):
    """(name, 2D slice, aspect, origin) for axial, coronal and sagittal views."""
    z, y, x = centre
    sz, sy, sx = (float(s) for s in spacing_zyx)
    return [
        ("axial", volume[z], sy / sx, "upper"),
        ("coronal", volume[:, y, :], sz / sx, "lower"),
        ("sagittal", volume[:, :, x], sz / sy, "lower"),
    ]


def _check_shapes(image: np.ndarray, *others) -> None:
    for o in others:
        if o is not None and np.shape(o) != image.shape:
            raise ValueError(f"figure: array shape {np.shape(o)} does not match image shape {image.shape}")
    if image.ndim != 3:
        raise ValueError(f"figure: image must be (z, y, x), got shape {image.shape}")


def _contours(ax, label2d: np.ndarray, *, style: str, organs: Sequence[int]) -> None:
    for organ in organs:
        m = label2d == organ
        if m.any() and not m.all():
            ax.contour(m.astype(np.float32), levels=[0.5], colors=[_organ_colour(organ)], linewidths=1.0,
                       linestyles=style)


def overlay_figure(
    image,
    ref,
    pred,
    out_png: str | os.PathLike,
    *,
    spacing_zyx: Sequence[float],
    title: str | None = None,
    window: tuple[float, float] | None = None,
    centre: tuple[int, int, int] | None = None,
) -> Path:
    """Axial / coronal / sagittal slices with reference (solid) and prediction (dashed) organ contours.

    Args:
        image: (z, y, x) CT in HU or transformed intensities in [0, 1].
        ref, pred: (z, y, x) int labels (either may be None).
        spacing_zyx: voxel spacing (z, y, x) in mm, sets each view's pixel aspect.
        window: display range; None = [0, 1] for transformed images, HU_WINDOW for HU.
        centre: (z, y, x) voxel the three planes pass through; None = the organs' centre.
    """
    image = np.asarray(image, dtype=np.float32)
    ref = None if ref is None else np.asarray(ref)
    pred = None if pred is None else np.asarray(pred)
    _check_shapes(image, ref, pred)
    vmin, vmax = _display_range(image, window)
    c = centre or _centre(None if ref is None else ref > 0, None if pred is None else pred > 0)
    present: set[int] = set()
    for lab in (ref, pred):
        if lab is not None:
            present |= set(np.unique(lab).tolist())
    organs = sorted(o for o in present if o > 0)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    img_views = _views(image, c, spacing_zyx)
    ref_views = _views(ref, c, spacing_zyx) if ref is not None else [None] * 3
    pred_views = _views(pred, c, spacing_zyx) if pred is not None else [None] * 3
    for ax, (name, sl, aspect, origin), rv, pv in zip(axes, img_views, ref_views, pred_views):
        ax.imshow(sl, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, origin=origin, interpolation="nearest")
        if rv is not None:
            _contours(ax, rv[1], style="solid", organs=organs)
        if pv is not None:
            _contours(ax, pv[1], style="dashed", organs=organs)
        ax.set_title(f"{name} ({'z' if name == 'axial' else 'y' if name == 'coronal' else 'x'}="
                     f"{c[0] if name == 'axial' else c[1] if name == 'coronal' else c[2]})", fontsize=10)
        ax.set_axis_off()
    handles = [Line2D([], [], color="k", ls="solid", label="reference"),
               Line2D([], [], color="k", ls="dashed", label="prediction")]
    handles += [Line2D([], [], color=_organ_colour(o), lw=3, label=ORGAN_NAMES.get(o, str(o))) for o in organs]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(bottom=0.05 + 0.04 * ((len(handles) + 5) // 6))
    return _save(fig, out_png)


def uncertainty_figure(
    image,
    entropy,
    out_png: str | os.PathLike,
    *,
    spacing_zyx: Sequence[float],
    ref=None,
    pred=None,
    title: str | None = None,
    window: tuple[float, float] | None = None,
    centre: tuple[int, int, int] | None = None,
    vmax: float | None = None,
) -> Path:
    """Three views of the voxel-wise vote entropy (nats) over the image, like the paper's Fig. 11.

    Certain voxels (entropy 0) are transparent; ``vmax`` defaults to the map's maximum. If ``ref`` /
    ``pred`` are given their contours are drawn (white solid / red dashed, all organs together).
    """
    image = np.asarray(image, dtype=np.float32)
    h = np.asarray(entropy, dtype=np.float32)
    _check_shapes(image, h, ref, pred)
    lo, hi = _display_range(image, window)
    c = centre or _centre(h > 1e-6, None if ref is None else np.asarray(ref) > 0)
    top = float(vmax) if vmax is not None else max(float(h.max()), 1e-6)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    im = None
    for i, (ax, (name, sl, aspect, origin)) in enumerate(zip(axes, _views(image, c, spacing_zyx))):
        hv = _views(h, c, spacing_zyx)[i][1]
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin=origin, interpolation="nearest")
        im = ax.imshow(np.ma.masked_less_equal(hv, 1e-6), cmap="viridis", vmin=0, vmax=top, aspect=aspect,
                       origin=origin, interpolation="nearest", alpha=0.85)
        for lab, colour, style in ((ref, "white", "solid"), (pred, "red", "dashed")):
            if lab is not None:
                m = _views(np.asarray(lab) > 0, c, spacing_zyx)[i][1]
                if m.any() and not m.all():
                    ax.contour(m.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8,
                               linestyles=style)
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01, label="vote entropy (nats)")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def _level_labels(rows: Sequence[dict]) -> tuple[list[int], list[str]]:
    levels = sorted({int(r["level"]) for r in rows})
    ent = {int(r["level"]): float(r["entropy"]) for r in rows}
    return levels, [f"L{lv}\n{ent[lv]:.3f}" for lv in levels]


def error_rate_figure(table: Sequence[dict], out_png: str | os.PathLike, *, title: str | None = None) -> Path:
    """Fig. 12 analogue: top row error rate per uncertainty level (whole / predicted background /
    predicted organs), bottom row the share of each region's misclassified voxels per level.

    Args:
        table: rows of :meth:`sepnet.evaluation.uncertainty.UncertaintyCounts.table` (region, level,
            entropy, voxels, errors, error_rate, error_share).
    """
    regions = ("whole", "background", "organs")
    names = {"whole": "whole image", "background": "predicted background", "organs": "predicted organs"}
    levels, labels = _level_labels(table)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for j, region in enumerate(regions):
        rows = {int(r["level"]): r for r in table if r["region"] == region}
        for i, (key, ylabel, colour) in enumerate(
            (("error_rate", "error rate", "tab:red"), ("error_share", "share of errors", "tab:blue"))
        ):
            vals = np.array([float(rows[lv][key]) if lv in rows else np.nan for lv in levels])
            ax = axes[i, j]
            pos = np.arange(len(levels))
            ax.bar(pos, np.nan_to_num(vals), color=colour, alpha=0.8)
            for p, v in zip(pos, vals):
                ax.text(p, (0 if np.isnan(v) else v) + 0.01, "n/a" if np.isnan(v) else f"{100 * v:.1f}%",
                        ha="center", va="bottom", fontsize=7)
            ax.set_ylim(0, 1.1)
            ax.set_xticks(pos, labels, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_title(f"({'abc'[j] if i == 0 else 'def'[j]}) {names[region]}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("uncertainty level (entropy, nats)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png)


def vvc_dice_figure(
    rows: Sequence[dict],
    out_png: str | os.PathLike,
    *,
    fit=None,
    title: str | None = None,
) -> Path:
    """Fig. 13 analogue: per-organ mean VVC (x) against mean ensemble Dice (y, %), numbered by organ id,
    with the least-squares line and Pearson r.

    Args:
        rows: :func:`sepnet.evaluation.uncertainty.vvc_dice_table` rows (organ_id, vvc, dice in [0, 1]).
        fit: a :class:`sepnet.evaluation.uncertainty.LineFit` of dice on vvc; None = computed here.
    """
    from sepnet.evaluation.uncertainty import fit_line

    x = np.array([float(r["vvc"]) for r in rows])
    y = np.array([float(r["dice"]) for r in rows])
    fit = fit if fit is not None else fit_line(x, y)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], 100 * y[ok], s=28, color="tab:blue", zorder=3)
    for r, xi, yi, good in zip(rows, x, y, ok):
        if good:
            ax.annotate(str(r["organ_id"]), (xi, 100 * yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if np.isfinite(fit.slope):
        xs = np.linspace(x[ok].min(), x[ok].max(), 50)
        label = f"fit: DSC = {100 * fit.slope:.1f}·VVC + {100 * fit.intercept:.1f}   r = {fit.r:.2f}"
        ax.plot(xs, 100 * (fit.slope * xs + fit.intercept), color="tab:red", lw=1.5, label=label)
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("mean VVC (σ/μ of member volumes)")
    ax.set_ylabel("mean ensemble DSC (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"VVC vs DSC per organ (n = {int(ok.sum())})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def metric_bars_figure(
    values: dict[str, dict[int, float]],
    out_png: str | os.PathLike,
    *,
    ylabel: str = "DSC (%)",
    scale: float = 100.0,
    title: str | None = None,
) -> Path:
    """Grouped horizontal bars, organs on the y axis (top to bottom in id order), one bar per model
    (the paper's Fig. 9 turned sideways): a 4:3 page that stays legible in a browser's artifact viewer.

    Args:
        values: model name -> organ id -> mean metric (NaN / missing = no bar).
        ylabel: the metric's axis label (on the x axis here).
        scale: multiplier for display (100 for Dice fractions -> %).
    """
    models = list(values)
    organs = sorted({o for v in values.values() for o in v})
    height = max(4.5, 0.3 * len(organs) + 1.5)  # inches: about 0.3 in per organ group
    fig, ax = plt.subplots(figsize=(height * 4 / 3, height))
    bar = 0.8 / max(1, len(models))
    pos = np.arange(len(organs))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        vals = np.array([values[m].get(o, np.nan) for o in organs], dtype=float) * scale
        ax.barh(pos - 0.4 + bar * (i + 0.5), np.nan_to_num(vals), bar, label=m, color=cmap(i % 10))
    ax.set_yticks(pos, [ORGAN_NAMES.get(o, str(o)) for o in organs], fontsize=10)
    ax.set_ylim(len(organs) - 0.5, -0.5)  # the first organ on top
    ax.tick_params(axis="x", labelsize=10)
    ax.set_xlabel(ylabel, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, max(1, len(models))),
              frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, out_png)


__all__ = [
    "HU_WINDOW",
    "error_rate_figure",
    "metric_bars_figure",
    "overlay_figure",
    "uncertainty_figure",
    "vvc_dice_figure",
]
