"""``sepnet export STUDY OUT [--fold all|N]``: a study's trained ensemble as a self-contained bundle.

The bundle (``sepnet.jobs.bundle``) holds the case-preparation plan, the resolved config, the organ map,
each member's weights (tensors only), the fusion weights, inference and postprocessing settings, the
sepnet and torch versions and a manifest of checksums; ``sepnet predict --bundle OUT`` uses it without
the study or its store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="a study folder trained by `sepnet cv` (or its YAML config)")
    p.add_argument("out", help="the bundle folder to write (an existing bundle there is replaced)")
    p.add_argument("--fold", default="all",
                   help="'all' (default: every fold whose ensemble is trained) or one fold index")


def run(args: argparse.Namespace) -> int:
    from sepnet.jobs.bundle import META, export_bundle, verify_bundle

    out = export_bundle(Path(args.study), Path(args.out), fold=str(args.fold))
    files = verify_bundle(out)["files"]
    meta = json.loads((out / META).read_text())
    folds = meta["folds"]
    size = sum(int(f["size"]) for f in files.values())
    print(f"bundle {out}: {len(meta['members']) * len(folds)} model(s) ({', '.join(meta['members'])}) "
          f"x fold(s) {', '.join(map(str, folds))}; {len(files)} files, {size / 1e6:.1f} MB; "
          f"predict with `sepnet predict --bundle {out}`")
    return 0
