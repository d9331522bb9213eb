"""``sepnet preprocess DATASET STORE``: convert a labelled dataset into the chunked Zarr store.

Exit codes: 0 all cases stored (or skipped as up to date), 1 some cases failed (each reported on one
line naming the file and the cause; the others are stored), 2 bad arguments/inputs (including an
output folder that cannot be created or written).
"""

from __future__ import annotations

import argparse
import logging

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
    parser.add_argument("--no-progress", action="store_true", help="no per-case progress lines")
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


# --------------------------------------------------------------------------- the study's preprocessing stage

def study_cases(cfg) -> list[tuple[int, str]]:
    """(dataset index, case id) of every case of the study's datasets, from their listings (no store needed).

    A phantom dataset lists the cases it will have (``phantom_000``, ...), generated or not; a listed case
    with a problem (``CaseRef.problem``: incomplete or broken folder) is left out with a warning. Raises
    DataError for a dataset folder that does not exist (and is not a phantom) or lists no case.
    """
    from pathlib import Path

    from sepnet.core.errors import DataError
    from sepnet.data.readers import list_cases

    out: list[tuple[int, str]] = []
    for i, ds in enumerate(cfg.datasets):
        if ds.phantom is not None:
            out += [(i, f"{ds.phantom.prefix}_{n:03d}") for n in range(ds.phantom.cases)]
        elif Path(ds.path).is_dir():
            for r in list_cases(ds.path, format=ds.format):
                if r.problem:  # an incomplete or broken case folder: reported, left out of the study
                    logging.getLogger("sepnet.cv").warning("case %s left out: %s", r.case_id, r.problem)
                else:
                    out.append((i, str(r.case_id)))
        else:
            raise DataError(f"{ds.path}: dataset folder does not exist")
    if not out:
        raise DataError(f"{', '.join(d.path for d in cfg.datasets)}: no readable case")
    first: dict[str, int] = {}
    for i, cid in out:  # the store is keyed by case id: a second dataset's case would overwrite the first's
        if first.setdefault(cid, i) != i:
            raise DataError(f"{cfg.datasets[i].path}: case id {cid!r} is also a case of "
                            f"{cfg.datasets[first[cid]].path} (give phantom datasets distinct `phantom.prefix`)")
    return out


def study_plan(cfg):
    """The store's preparation plan from the config's ``preprocess`` section."""
    from sepnet.data.prepare import make_plan

    pp = cfg.preprocess
    return make_plan(transforms=tuple(pp.transforms), crop=tuple(pp.crop) if pp.crop else None,
                     spacing_zyx=tuple(pp.spacing) if pp.spacing else None, chunks=tuple(pp.chunks),
                     codec=pp.codec, clevel=pp.clevel)


def shard_count(cfg, n_cases: int) -> int:
    """How many preprocessing jobs: ``executor.stages.preprocess.array``, at most one per case."""
    return max(1, min(cfg.executor.array_of("preprocess"), n_cases))


def data_ready(cfg, store) -> bool:
    """Whether the store holds every case of the study (:func:`study_cases`) up to date and its fingerprint:
    nothing to preprocess. Reads listings and attributes only (cheap enough for a login node)."""
    from pathlib import Path

    from sepnet.data.preprocess import stale_cases

    store = Path(store)
    if not (store / "fingerprint.json").is_file():
        return False
    plan, cases = study_plan(cfg), study_cases(cfg)
    for i, ds in enumerate(cfg.datasets):
        wanted = {cid for d, cid in cases if d == i}
        if not Path(ds.path).is_dir() or not wanted <= _listed_ids(ds):
            return False
        if stale_cases(ds.path, store, plan=plan, format=_format(ds), case_ids=wanted):
            return False
    return True


def _format(ds) -> str:
    return "structseg" if ds.phantom is not None and ds.format == "auto" else ds.format


def _listed_ids(ds) -> set[str]:
    from sepnet.data.readers import list_cases

    return {str(r.case_id) for r in list_cases(ds.path, format=_format(ds))}


class PreprocessTask:
    """One preprocessing job of a study (picklable): phantom generation and preprocessing of shard
    ``shard`` of ``shards`` (every ``shards``-th case of :func:`study_cases`), into the shared store.

    Each case is written atomically; complete, unchanged cases are skipped (resume). The shard that
    finds every case of the study in the store writes fingerprint.json (the same content whichever
    does). Raises DataError naming the failed cases (so the jobs after it do not start).
    """

    def __init__(self, cfg, *, store: str, shard: int, shards: int):
        self.datasets, self.pp, self.store = list(cfg.datasets), cfg.preprocess, str(store)
        self.cases = study_cases(cfg)
        self.shard, self.shards = shard, shards

    def mine(self) -> list[tuple[int, str]]:
        return self.cases[self.shard::self.shards]

    def __call__(self) -> dict:
        from pathlib import Path

        from sepnet.core.errors import DataError
        from sepnet.data.preprocess import preprocess, write_fingerprint
        from sepnet.data.store import Store
        from sepnet.hpc.resources import peak_rss_gib

        pp, failed, done = self.pp, {}, 0
        for i, ds in enumerate(self.datasets):
            ids = {cid for d, cid in self.mine() if d == i}
            if not ids:
                continue
            if ds.phantom is not None:
                from sepnet.data.phantom import write_phantom

                write_phantom(ds.path, cases=ds.phantom.cases, seed=ds.phantom.seed, size=ds.phantom.size,
                              format=_format(ds), indices={int(c.rsplit("_", 1)[1]) for c in ids},
                              prefix=ds.phantom.prefix)
            if not Path(ds.path).is_dir():
                raise DataError(f"{ds.path}: dataset folder does not exist")
            report = preprocess(ds.path, self.store, format=_format(ds), transforms=tuple(pp.transforms),
                                crop=tuple(pp.crop) if pp.crop else None,
                                spacing=tuple(pp.spacing) if pp.spacing else None, chunks=tuple(pp.chunks),
                                codec=pp.codec, clevel=pp.clevel, workers=pp.workers, case_ids=ids,
                                fingerprint=False)
            failed.update(report.failed)
            failed.update({c: "not listed in the dataset" for c in ids - set(report.done) - set(report.skipped)
                           - set(report.failed)})
            done += len(report.done)
        if failed:
            cid, msg = next(iter(sorted(failed.items())))
            raise DataError(f"preprocess shard {self.shard}: {len(failed)} case(s) failed, first {cid}: {msg}")
        if {cid for _, cid in self.cases} <= set(Store(self.store).case_ids):
            write_fingerprint(self.store)
        print(f"preprocess shard {self.shard}/{self.shards}: {done} written, "
              f"{len(self.mine()) - done} up to date, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
        return {"shard": self.shard, "written": done}
