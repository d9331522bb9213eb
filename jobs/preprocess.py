"""``sepnet preprocess DATASET STORE``: convert a labelled dataset into the chunked Zarr store.

Exit codes: 0 all cases stored (or skipped as up to date), 1 some cases failed (each reported on one
line naming the file and the cause; the others are stored), 2 bad arguments/inputs (including an
output folder that cannot be created or written).
"""

from __future__ import annotations

import argparse

from sepnet.core.errors import ConfigError


def _ints(text: str, *, n: int, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--{name}: expected {n} comma-separated integers, got {text!r}") from None
    if len(vals) != n:
        raise ConfigError(f"--{name}: expected {n} comma-separated integers, got {text!r}")
    return vals


def _crop(text: str) -> tuple[int, int] | None:
    if text.lower() == "none":
        return None
    vals = _ints(text, n=2, name="crop") if "," in text else (int(text),) * 2 if text.isdigit() else None
    if vals is None:
        raise ConfigError(f"--crop: expected N, Y,X or none, got {text!r}")
    return vals  # type: ignore[return-value]


def _spacing(text: str | None) -> tuple[float, float, float] | None:
    if text is None or text.lower() == "none":
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise ConfigError(f"--spacing: expected Z,Y,X in mm (e.g. 3,1,1), got {text!r}")
    return vals  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder (StructSeg, PDDCA, HaN-Seg or DICOM layout)")
    parser.add_argument("store", help="output Zarr store folder (created; complete unchanged cases are skipped)")
    parser.add_argument("--format", default="auto", help="dataset format (default: auto-detect)")
    parser.add_argument(
        "--transforms", default="SLF1,SLF2,SLF3", help="comma-separated intensity presets, one channel each"
    )
    parser.add_argument("--crop", default="256", help="in-plane centre crop: N (NxN), Y,X, or none (default 256)")
    parser.add_argument("--spacing", default=None, help="resample to Z,Y,X mm (e.g. 3,1,1); default: no resampling")
    parser.add_argument("--chunks", default="1,16,128,128", help="chunk shape C,Z,Y,X (default 1,16,128,128)")
    parser.add_argument("--codec", default="zstd", choices=("zstd", "lz4", "none"), help="Blosc codec (default zstd)")
    parser.add_argument("--clevel", type=int, default=3, help="compression level (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (1 = in-process; default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify", action="store_true",
                        help="check the checksums of up-to-date cases and rewrite the damaged ones")


def run(args: argparse.Namespace) -> int:
    from sepnet.data.preprocess import preprocess

    report = preprocess(
        args.dataset,
        args.store,
        format=args.format,
        transforms=tuple(t.strip() for t in args.transforms.split(",") if t.strip()),
        crop=_crop(args.crop),
        spacing=_spacing(args.spacing),
        chunks=_ints(args.chunks, n=4, name="chunks"),
        codec=args.codec,
        clevel=args.clevel,
        workers=args.workers,
        progress=not args.no_progress,
        verify=args.verify,
    )
    # each failure was logged (one line naming the file and the cause) as it happened
    failed = f" ({', '.join(sorted(report.failed))})" if report.failed else ""
    print(
        f"sepnet preprocess: {report.store}: {len(report.done)} written, {len(report.skipped)} up to date, "
        f"{len(report.failed)} failed{failed} ({report.seconds:.1f} s)"
    )
    return 1 if report.failed else 0
