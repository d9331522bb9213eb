"""``sepnet fingerprint STORE``: the dataset fingerprint of a Zarr store, human-readable (or --json).

``--verify`` checks every complete case against the checksums recorded when it was written instead;
exit codes: 0 intact, 1 some case damaged (one line each, naming it), 2 not a store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sepnet.core.errors import DataError
from sepnet.core.organs import ORGAN_NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a store written by `sepnet preprocess` (or a study folder)")
    p.add_argument("--json", action="store_true", help="print fingerprint.json as it is")
    p.add_argument("--verify", action="store_true",
                   help="check every case's arrays against their recorded checksums; exit 1 if any is damaged")


def _store_path(path: Path) -> Path:
    """The store itself, or the store of a study folder."""
    return path / "store" if not (path / "zarr.json").is_file() and (path / "store" / "zarr.json").is_file() else path


def verify(path: Path) -> int:
    from sepnet.data.store import Store

    store = Store(_store_path(path))
    ids = store.case_ids
    damaged = store.verify_all()
    for msg in damaged.values():
        print(f"damaged: {msg}")
    print(f"sepnet fingerprint --verify: {store.path}: {len(ids)} cases checked, {len(damaged)} damaged"
          + (f" ({', '.join(sorted(damaged))})" if damaged else ""))
    return 1 if damaged else 0


def run(args: argparse.Namespace) -> int:
    path = Path(args.store)
    if args.verify:
        return verify(path)
    fp_file = next((p for p in (path / "fingerprint.json", path / "store" / "fingerprint.json") if p.is_file()), None)
    if fp_file is None:
        raise DataError(f"{path}: no fingerprint.json (is it a store written by `sepnet preprocess`?)")
    fp = json.loads(fp_file.read_text())
    if args.json:
        print(json.dumps(fp, indent=2))
        return 0
    sp, sh, it = fp["spacing_zyx"], fp["shape_zyx"], fp["intensity"]
    print(f"{fp_file.parent}: {fp['num_cases']} cases")
    def r(v):
        return [round(float(x), 2) for x in v]

    print(f"spacing (z, y, x) mm: median {r(sp['median'])}, min {r(sp['min'])}, max {r(sp['max'])}")
    print(f"shape (z, y, x): median {r(sh['median'])}, min {r(sh['min'])}, max {r(sh['max'])}")
    pct = it["percentiles"]
    print(f"HU in the body (> {it['body_threshold_hu']:.0f}): mean {it['mean']:.1f}, std {it['std']:.1f}, "
          f"percentiles 0.5/50/99.5: {pct['0.5']:.0f} / {pct['50']:.0f} / {pct['99.5']:.0f}")
    vols = fp["organs"].get("volume_cm3", {})
    freq = fp.get("class_frequencies", {})
    print(f"{'organ':<18} {'mean cm3':>9} {'class freq':>11}")
    for organ, name in ORGAN_NAMES.items():
        v = vols.get(str(organ))
        f = freq.get(str(organ))
        if v is None and f is None:
            continue
        mean = v / fp["num_cases"] if isinstance(v, (int, float)) else float("nan")
        print(f"{name:<18} {mean:>9.2f} {f if f is not None else float('nan'):>11.2e}")
    return 0
