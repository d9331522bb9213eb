"""Dataset fingerprint of a store (nnU-Net-like): spacings, shapes, HU statistics, organ volumes and class
frequencies, computed from the per-case statistics the writer keeps in each case's attrs."""

from __future__ import annotations

import numpy as np

BODY_HU = -500.0  # "inside the body" threshold for the intensity fingerprint


def _axis_stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    return {
        "median": [float(v) for v in np.median(values, axis=0)],
        "min": [float(v) for v in values.min(axis=0)],
        "max": [float(v) for v in values.max(axis=0)],
    }


def compute_fingerprint(store) -> dict:
    """nnU-Net-like dataset fingerprint over the store's complete cases.

    Organ voxel counts and volumes (cm3) are measured on the original labels; HU statistics inside the
    body (HU > -500) on the original images (per case exact; dataset mean/std exact, dataset percentiles
    from a pooled sample of up to 10000 body voxels per case); class frequencies on the stored labels
    (what training sees), background included.

    ``store``: a :class:`sepnet.data.store.Store`.
    """
    ids = store.case_ids
    cases: dict[str, dict] = {}
    spacings, shapes, samples = [], [], []
    n_body = 0
    s1 = s2 = 0.0
    tot_vox: dict[str, int] = {}
    tot_cm3: dict[str, float] = {}
    stored_tot: dict[str, int] = {}
    for cid in ids:
        m = store.meta(cid)
        st = m.stats
        cases[cid] = {
            "shape": st["shape"],
            "spacing_zyx": st["spacing_zyx"],
            "stored_shape": list(m.stored_shape),
            "annotated": list(m.annotated),
            "hu_percentiles": st["hu_percentiles"],
            "hu_mean": st["hu_sum"] / st["body_voxels"] if st["body_voxels"] else None,
            "voxels": st["voxels"],
            "volume_cm3": st["volume_cm3"],
        }
        spacings.append(st["spacing_zyx"])
        shapes.append(st["shape"])
        n_body += st["body_voxels"]
        s1 += st["hu_sum"]
        s2 += st["hu_sumsq"]
        for k, v in st["voxels"].items():
            tot_vox[k] = tot_vox.get(k, 0) + int(v)
        for k, v in st["volume_cm3"].items():
            tot_cm3[k] = tot_cm3.get(k, 0.0) + float(v)
        for k, v in st["stored_voxels"].items():
            stored_tot[k] = stored_tot.get(k, 0) + int(v)
        samples.append(store.hu_sample(cid))
    pooled = np.concatenate(samples) if samples else np.zeros(0)
    mean = s1 / n_body if n_body else None
    std = float(np.sqrt(max(s2 / n_body - mean * mean, 0.0))) if n_body else None
    total_stored = sum(stored_tot.values())
    return {
        "num_cases": len(ids),
        "case_ids": ids,
        "spacing_zyx": _axis_stats(np.asarray(spacings, dtype=float).reshape(-1, 3)),
        "shape_zyx": _axis_stats(np.asarray(shapes, dtype=float).reshape(-1, 3)),
        "intensity": {
            "body_threshold_hu": BODY_HU,
            "body_voxels": n_body,
            "mean": mean,
            "std": std,
            "percentiles": (
                {str(q): float(v) for q, v in zip((0.5, 50, 99.5), np.percentile(pooled, (0.5, 50, 99.5)))}
                if pooled.size
                else {}
            ),
        },
        "organs": {
            "voxels": dict(sorted(tot_vox.items(), key=lambda kv: int(kv[0]))),
            "volume_cm3": dict(sorted(tot_cm3.items(), key=lambda kv: int(kv[0]))),
            "cases_present": {
                k: sum(1 for c in cases.values() if c["voxels"].get(k, 0) > 0) for k in sorted(tot_vox, key=int)
            },
        },
        "class_frequencies": {k: v / total_stored for k, v in sorted(stored_tot.items(), key=lambda kv: int(kv[0]))}
        if total_stored
        else {},
        "cases": cases,
    }
