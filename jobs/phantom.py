"""``sepnet phantom OUT --cases N --seed S [--size tiny|small|full] [--format ...]``.

Writes a synthetic head-and-neck CT dataset (``sepnet.data.phantom``) in any supported format and prints
one line per case folder. Cases already present in OUT are kept, so re-running completes a partial dataset.
"""

from __future__ import annotations

import argparse
import time

from sepnet.data.phantom import FORMATS, SIZES, write_phantom


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output dataset folder (created if missing)")
    parser.add_argument("--cases", type=int, default=6, help="number of cases phantom_000, ... (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; case i uses seed (seed, i) (default 0)")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="tiny: 64x64 in-plane at 3.8 mm; small: 128x128 at 2 mm; full: 512x512 at ~1 mm (default small)",
    )
    parser.add_argument("--format", choices=FORMATS, default="structseg", help="dataset layout (default structseg)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    paths = write_phantom(args.out, cases=args.cases, seed=args.seed, size=args.size, format=args.format)
    for p in paths:
        print(p)
    print(
        f"{len(paths)} {args.size} phantom case(s) in {args.out} ({args.format}, seed {args.seed}, "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    return 0
