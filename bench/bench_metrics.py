"""Per-case evaluation: the project's Dice + HD95 + ASSD against medpy, MONAI and DeepMind's surface-distance.

One 22-organ case (the ``full`` phantom, ~512x512x~100 at ~1x1x3 mm; ``--quick``: a small synthetic case);
the "prediction" is the reference shifted by (0, 2, 1) voxels (z, y, x) with a few organs dilated, so
every organ has non-trivial distances. Every tool computes Dice, HD95 and ASSD of all 22 organs the way a
user would call it (binary masks per organ on the full grid). medpy takes minutes per case: in full mode it
runs on a subset of organs and its time is extrapolated to 22 organs (linear in organs: each organ costs
full-volume distance transforms).

Matching conventions: project ``convention="max"`` vs MONAI (max of directed 95th percentiles, same
boundary definition); project ``"pooled"`` vs medpy ``hd95``. surface-distance measures surfels at voxel
corners, a different definition: its difference is shown for information.

Run: ``.venv/bin/python bench/bench_metrics.py [--quick]``.
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
from _common import alternate, header, median, parser, phantom_or_synthetic, set_threads, synthetic_case, table, verdict
from scipy import ndimage

from sepnet.core.organs import ORGAN_IDS


def make_pair(quick: bool):
    if quick:
        case, src = synthetic_case(shape=(24, 128, 128), seed=0), "synthetic"
    else:
        case, src = phantom_or_synthetic(size="full", seed=0, case_id="bench")
    ref = case.label
    pred = np.roll(ref, (0, 2, 1), axis=(0, 1, 2))
    for organ in (1, 9, 20, 21):  # grow a few organs by one voxel in-plane
        m = ndimage.binary_dilation(pred == organ, structure=np.ones((1, 3, 3), bool))
        pred[m & (pred == 0)] = organ
    return pred, ref, case.geometry.spacing_zyx, src


def project(pred, ref, sp, organs, convention="max"):
    from sepnet.evaluation.metrics import evaluate_case

    res = evaluate_case(pred, ref, spacing_zyx=sp, organs=organs, convention=convention)
    return {m.organ: m.hd95 for m in res}


def monai(pred, ref, sp, organs):
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    out = {}
    for o in organs:
        p = torch.from_numpy(pred == o)[None, None]
        r = torch.from_numpy(ref == o)[None, None]
        compute_dice(p, r, include_background=True)
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=list(sp))
        compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=list(sp))
        out[o] = float(hd.item())
    return out


def medpy(pred, ref, sp, organs):
    from medpy.metric.binary import assd, dc, hd95

    out = {}
    for o in organs:
        p, r = pred == o, ref == o
        dc(p, r)
        out[o] = float(hd95(p, r, voxelspacing=sp))
        assd(p, r, voxelspacing=sp)
    return out


def deepmind(pred, ref, sp, organs):
    import surface_distance as sdm

    out = {}
    for o in organs:
        p, r = pred == o, ref == o
        sd = sdm.compute_surface_distances(r, p, spacing_mm=tuple(sp))
        out[o] = float(sdm.compute_robust_hausdorff(sd, 95))
        sdm.compute_average_surface_distance(sd)
        sdm.compute_dice_coefficient(r, p)
    return out


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    set_threads(args)
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI deprecation notes
    header("Evaluation metrics: project vs MONAI, medpy, surface-distance", args)
    pred, ref, sp, src = make_pair(args.quick)
    organs = [o for o in ORGAN_IDS if (ref == o).any()]
    reps = args.reps or (1 if args.quick else 3)
    medpy_organs = [o for o in (4, 8, 11) if o in organs] or organs[:3]
    monai_organs = medpy_organs if args.quick else organs
    scale = len(organs) / len(medpy_organs)
    print(f"Case: {src}, shape (z, y, x) {ref.shape}, spacing (z, y, x) mm {tuple(round(s, 3) for s in sp)}, "
          f"{len(organs)} organs; {reps} repetitions, alternating; medpy{' and MONAI' if args.quick else ''} on "
          f"organs {medpy_organs}, time extrapolated x {scale:.2f} to all organs.\n")
    try:
        import surface_distance  # noqa: F401

        have_sd = True
    except ImportError:
        have_sd = False
        print("_surface-distance: not installed (pip package `surface-distance`); skipped._\n")
    # imports and MONAI's lazy module loading are not part of the per-case time
    importlib.import_module("medpy.metric.binary")
    importlib.import_module("monai.metrics")

    tiny = np.zeros((8, 8, 8), np.uint8)
    tiny[2:5, 2:5, 2:5] = organs[0]
    for fn in (project, monai, medpy) + ((deepmind,) if have_sd else ()):
        fn(tiny, tiny, sp, organs[:1])
    results: dict[str, dict] = {}

    def runner(name, fn, org):
        def run():
            results[name] = fn(pred, ref, sp, org)
        return run

    items = {
        "sepnet evaluate_case (max)": runner("sepnet evaluate_case (max)", project, organs),
        "MONAI 1.x (per-organ masks)": runner("MONAI 1.x (per-organ masks)", monai, monai_organs),
        "medpy (dc, hd95, assd)": runner("medpy (dc, hd95, assd)", medpy, medpy_organs),
    }
    if have_sd:
        items["DeepMind surface-distance"] = runner("DeepMind surface-distance", deepmind, organs)
    times = alternate(items, reps=reps, warmup=0)
    results["pooled"] = project(pred, ref, sp, organs, convention="pooled")
    extrapolated = {"medpy (dc, hd95, assd)"} | ({"MONAI 1.x (per-organ masks)"} if args.quick else set())
    per_case = {k: median(v) * (scale if k in extrapolated else 1.0) for k, v in times.items()}
    ours = per_case["sepnet evaluate_case (max)"]
    mine = results["sepnet evaluate_case (max)"]

    def maxdiff(a, b, org):
        d = [abs(a[o] - b[o]) for o in org if np.isfinite(a[o]) and np.isfinite(b[o])]
        return max(d) if d else float("nan")

    diffs = {
        "sepnet evaluate_case (max)": ("-", 0.0),
        "MONAI 1.x (per-organ masks)": ("max", maxdiff(mine, results["MONAI 1.x (per-organ masks)"], monai_organs)),
        "medpy (dc, hd95, assd)": ("pooled", maxdiff(results["pooled"], results["medpy (dc, hd95, assd)"],
                                                      medpy_organs)),
    }
    if have_sd:
        diffs["DeepMind surface-distance"] = ("surfels (other definition) vs max",
                                              maxdiff(mine, results["DeepMind surface-distance"], organs))
    rows = [[k, per_case[k], per_case[k] / ours, diffs[k][0], diffs[k][1]] for k in items]
    table(["tool (Dice + HD95 + ASSD, 22 organs)", "s per case (median)", "x sepnet time",
          "HD95 convention compared", "max |HD95 diff| mm"], rows)
    mon = per_case["MONAI 1.x (per-organ masks)"] / ours
    trows = [[">= 100x faster than MONAI", f"{mon:.1f}x", verdict(mon >= 100)]]
    if have_sd:
        s = per_case["DeepMind surface-distance"] / ours
        trows.append([">= 10x faster than surface-distance", f"{s:.1f}x", verdict(s >= 10)])
    trows.append(["HD95 equal to MONAI (max) / medpy (pooled)",
                  f"{diffs['MONAI 1.x (per-organ masks)'][1]:.2g} / {diffs['medpy (dc, hd95, assd)'][1]:.2g} mm",
                  verdict(max(diffs["MONAI 1.x (per-organ masks)"][1], diffs["medpy (dc, hd95, assd)"][1]) < 1e-6)])
    table(["target", "measured", "verdict"], trows)


if __name__ == "__main__":
    main()
