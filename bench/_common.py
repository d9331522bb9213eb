"""Shared helpers of the benchmark scripts: timing, tables, machine description, synthetic cases.

Benchmarks print Markdown tables; they never assert timings. Compared things run in the same process,
alternating, for several repetitions, and the tables report medians and ratios (the machine is shared,
so absolute seconds mean little).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    p.add_argument("--reps", type=int, default=None, help="repetitions per compared item (default per mode)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads that wait on "
                        "each other in every op run several times slower than 1)")
    return p


def set_threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, int(args.threads)))


def machine() -> str:
    """One line: nproc, CPU model, torch version, CUDA device if any."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        tv = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    except ImportError:
        tv, gpu = "n/a", "n/a"
    return (f"nproc={os.cpu_count()}, CPU: {cpu}, torch {tv}, {gpu}, python {platform.python_version()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def header(title: str, args: argparse.Namespace) -> None:
    mode = "quick" if args.quick else "full"
    print(f"# {title} ({mode} mode)\n")
    print(f"Command: `{' '.join([Path(sys.executable).name] + sys.argv)}`  ")
    print(f"Machine: {machine()}, torch threads {args.threads}\n")


def alternate(items: dict[str, Callable[[], object]], *, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every callable ``reps`` times, round-robin (A B C A B C ...), after ``warmup`` untimed rounds.

    Returns name -> list of wall-clock seconds. The order rotates each round so no item always runs
    first (after a cache-cold or another item's heavy allocations).
    """
    names = list(items)
    for _ in range(warmup):
        for n in names:
            items[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            items[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(list(xs))) if len(xs) else float("nan")


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats formatted with :func:`fmt`. Printed and returned."""
    def cell(v: object) -> str:
        return fmt(v) if isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


# --------------------------------------------------------------------------- synthetic data

# (centre mm from the volume centre (x, y, z), semi-axes mm (x, y, z), HU) per organ id, roughly the
# layout of the phantom (docs/conventions.md); _R organs mirror x. Ellipsoids only: enough for I/O and metric timing.
_ORGANS = {
    1: ((0, 15, -10), (11, 11, 30), 29), 2: ((32, -65, 10), (13, 13, 13), 25), 4: ((32, -75, 10), (5, 2.5, 5), 60),
    6: ((20, -35, 12), (12, 2.5, 3), 35), 8: ((0, -10, 20), (8, 5, 3), 35), 9: ((45, 0, 20), (25, 45, 22), 40),
    11: ((0, -5, 8), (6.5, 5, 4), 45), 12: ((50, 10, -35), (12.5, 20, 22), 15), 14: ((35, 15, -5), (6, 5, 5), 1000),
    16: ((45, 15, -5), (4, 6, 7), -600), 18: ((50, 12, -10), (8, 5, 6), 400), 20: ((0, 25, -60), (6.5, 4.5, 40), 30),
    21: ((25, -40, -75), (22, 35, 10), 750),
}
_MIRROR = {2: 3, 4: 5, 6: 7, 9: 10, 12: 13, 14: 15, 16: 17, 18: 19, 21: 22}


def synthetic_case(*, shape=(120, 512, 512), spacing_zyx=(3.0, 1.0, 1.0), seed: int = 0, jitter_mm: float = 0.0,
                   case_id: str = "synthetic"):
    """A Case with 22 ellipsoid organs in an elliptic body (int16 HU, uint8 labels), ~1 s at full size.

    ``jitter_mm`` moves every organ centre by a random offset (for a "prediction" of the same case).
    """
    from sepnet.data.case import Case, Geometry

    rng = np.random.default_rng(seed)
    z, y, x = shape
    sz, sy, sx = spacing_zyx
    hu = np.full(shape, -1000, np.int16)
    lab = np.zeros(shape, np.uint8)
    # body: elliptic cylinder ~ 80 x 100 mm semi-axes (scaled down for small grids)
    scale = min(1.0, (x * sx) / 512.0 * 2.2, (y * sy) / 512.0 * 2.2, (z * sz) / 360.0)
    yy, xx = np.ogrid[:y, :x]
    body = (((yy - y / 2) * sy / (100 * scale)) ** 2 + ((xx - x / 2) * sx / (80 * scale)) ** 2) < 1
    hu[:, body] = 40
    hu += rng.normal(0, 12, size=(1, y, x)).astype(np.int16)  # cheap texture, same per slice
    organs = dict(_ORGANS)
    for left, right in _MIRROR.items():
        (cx, cy, cz), ax, h = _ORGANS[left]
        organs[right] = ((-cx, cy, cz), ax, h)
    for oid in sorted(organs):
        (cx, cy, cz), (ax, ay, az), h = organs[oid]
        off = rng.normal(0, jitter_mm, 3) if jitter_mm else np.zeros(3)
        c = np.array([z / 2 + (cz * scale + off[2]) / sz, y / 2 + (cy * scale + off[1]) / sy,
                      x / 2 + (cx * scale + off[0]) / sx])
        r = np.maximum(np.array([az * scale / sz, ay * scale / sy, ax * scale / sx]), 0.75)
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        g = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = sum(((gi - ci) / ri) ** 2 for gi, ci, ri in zip(g, c, r)) <= 1
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        lab[box][inside] = oid
        hu[box][inside] = h
    geom = Geometry(spacing=(float(sx), float(sy), float(sz)), origin=(0.0, 0.0, 0.0),
                    direction=tuple(np.eye(3).ravel()), shape=tuple(shape))
    return Case(case_id=case_id, image=hu, label=lab, geometry=geom)


def phantom_or_synthetic(*, size: str, seed: int, case_id: str, shape=None):
    """``sepnet.data.phantom.make_case`` when that module exists, else :func:`synthetic_case`.

    Returns (case, source) with source "phantom" or "synthetic".
    """
    try:
        from sepnet.data.phantom import make_case

        return make_case(seed=seed, size=size, case_id=case_id), "phantom"
    except ImportError:
        pass
    if shape is None:
        shape = {"tiny": (16, 40, 40), "small": (48, 160, 160), "full": (120, 512, 512)}[size]
    return synthetic_case(shape=shape, seed=seed, case_id=case_id), "synthetic"


def write_structseg(case, root: Path) -> Path:
    """``<root>/<case_id>/data.nii.gz`` + ``label.nii.gz``, as StructSeg ships them (the project's writer)."""
    from sepnet.data.readers import write_case

    return write_case(case, root, format="structseg")


def preprocess_store(dataset: Path, store: Path, **kw):
    """``sepnet.data.preprocess.preprocess`` on a StructSeg folder; raises if a case failed."""
    from sepnet.data.preprocess import preprocess

    report = preprocess(dataset, store, format="structseg", progress=False, **kw)
    if report.failed:
        raise RuntimeError(f"preprocess failed: {report.failed}")
    return report


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cuda_note(what: str) -> bool:
    """True when CUDA exists; otherwise print a skip note for ``what`` and return False."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    print(f"_{what}: skipped (no CUDA device on this machine)._\n")
    return False
