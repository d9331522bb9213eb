"""``preprocess``: a labelled dataset -> the chunked Zarr store that ``sepnet.data.store.Store`` reads.

Each case goes through the one case preparation (``sepnet.data.prepare.prepare_case``), is written under
a temporary name and committed by renaming its directory (``os.replace``), so a crash never leaves a
half-written case that :class:`Store` would accept. A complete case whose sources and plan
(``Plan.key()``) are unchanged is skipped on a rerun.

Several writers (shards, ``case_ids``) may fill one store at once, also on a shared filesystem: each
writes only its own cases and removes only its own cases' leftovers; plan.json and plan.md have the
same content whoever writes them (atomic renames); the store folder is initialised before they
start (:func:`init_store`) and fingerprint.json is written once every case is in
(:func:`write_fingerprint`, ``fingerprint=False`` for a shard).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import time
import traceback
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sepnet.core.errors import DataError
from sepnet.data.case import Case
from sepnet.data.fingerprint import BODY_HU, compute_fingerprint
from sepnet.data.prepare import STORE_VERSION, Plan, make_plan, prepare_case
from sepnet.data.store import Store, array_checksum, read_group_attrs
from sepnet.hpc.atomic import atomic_write_json, atomic_write_text, replace_dir, temp_path

log = logging.getLogger(__name__)

FG_PER_CLASS = 1000  # foreground voxel coordinates kept per class per case (for the sampler)
HU_SAMPLE_PER_CASE = 10000  # body HU values kept per case for pooled percentiles


@dataclass
class PreprocessReport:
    """Outcome of :func:`preprocess`. ``failed`` maps case id -> one-line message naming file and cause."""

    store: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def zarr_compressors(codec: str, clevel: int):
    """The Zarr compressors of a store's arrays (``Plan.codec``/``clevel``: Blosc with byte shuffle; None for
    "none"); the evaluation's saved outputs use the same."""
    from zarr.codecs import BloscCodec

    if codec == "none":
        return None
    return [BloscCodec(cname=codec, clevel=int(clevel), shuffle="shuffle")]


def _source_files(ref) -> list[Path]:
    """Files a case is read from, for the change hash. Works with any CaseRef that names its paths."""
    cands: list = []
    for attr in ("sources", "paths", "files", "image", "label", "masks", "path"):
        v = getattr(ref, attr, None)
        if v is None:
            continue
        if isinstance(v, dict):
            cands.extend(v.values())
        elif isinstance(v, (list, tuple, set)):
            cands.extend(v)
        else:
            cands.append(v)
    files: set[Path] = set()
    for c in cands:
        if not isinstance(c, (str, os.PathLike)):
            continue
        p = Path(c)
        if p.is_dir():
            files.update(q for q in p.rglob("*") if q.is_file())
        elif p.exists():
            files.add(p)
    return sorted(files)


def source_hash(ref) -> str:
    """sha1 over (path, mtime_ns, size) of the case's source files; changes when any file changes."""
    h = hashlib.sha1()
    files = _source_files(ref)
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    if not files:  # nothing to stat: never consider the stored copy up to date
        h.update(f"nofiles-{time.time_ns()}".encode())
    return h.hexdigest()[:20]


def _case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha1(case_id.encode()).digest()[:8], "little")


def _fg_coords(label: np.ndarray, *, case_id: str, per_class: int = FG_PER_CLASS) -> np.ndarray:
    """(N, 4) int32 rows (class, z, y, x): a deterministic random subset of each organ's voxels."""
    rng = np.random.default_rng(_case_seed(case_id))
    rows = []
    flat = label.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=256)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for c in np.flatnonzero(counts):
        if c == 0:
            continue
        idx = order[starts[c] : starts[c + 1]]
        if idx.size > per_class:
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        zyx = np.stack(np.unravel_index(idx, label.shape), axis=1)
        rows.append(np.concatenate([np.full((idx.size, 1), c), zyx], axis=1))
    if not rows:
        return np.zeros((0, 4), dtype=np.int32)
    return np.concatenate(rows).astype(np.int32)


def _case_stats(case: Case, stored_label: np.ndarray) -> tuple[dict, np.ndarray]:
    """Per-case fingerprint entries (JSON-able) and a body HU sample (int16) for pooled percentiles."""
    geom = case.geometry
    voxel_mm3 = float(np.prod(geom.spacing))
    hu = case.image
    body = hu[hu > BODY_HU]
    rng = np.random.default_rng(_case_seed(case.case_id) + 1)
    sample = body if body.size <= HU_SAMPLE_PER_CASE else rng.choice(body, HU_SAMPLE_PER_CASE, replace=False)
    b64 = body.astype(np.float64)
    counts = np.bincount(case.label.ravel(), minlength=23) if case.label is not None else np.zeros(23, int)
    stored = np.bincount(stored_label.ravel(), minlength=23)
    stats = {
        "shape": list(map(int, geom.shape)),
        "spacing_zyx": list(geom.spacing_zyx),
        "body_voxels": int(body.size),
        "hu_sum": float(b64.sum()),
        "hu_sumsq": float((b64 * b64).sum()),
        "hu_percentiles": (
            {str(q): float(v) for q, v in zip((0.5, 50, 99.5), np.percentile(body, (0.5, 50, 99.5)))}
            if body.size
            else {}
        ),
        "voxels": {str(c): int(n) for c, n in enumerate(counts) if n and c > 0},
        "volume_cm3": {str(c): float(n) * voxel_mm3 / 1000.0 for c, n in enumerate(counts) if n and c > 0},
        "stored_voxels": {str(c): int(n) for c, n in enumerate(stored) if n},
    }
    return stats, np.asarray(sample, dtype=np.int16)



def _write_arrays(g, prepared, plan: Plan, fg: np.ndarray, hu_sample: np.ndarray) -> dict:
    """Write the case's arrays into group ``g``; return their checksums (as the reader will decode them)."""
    image = prepared.image.astype(plan.dtype)  # exact: prepare_case already rounded through plan.dtype
    lab = prepared.label
    chunks = tuple(min(c, s) for c, s in zip(plan.chunks, image.shape))
    comp = zarr_compressors(plan.codec, plan.clevel)
    g.create_array("image", shape=image.shape, dtype=plan.dtype, chunks=chunks, compressors=comp,
                   fill_value=0)[...] = image
    g.create_array("label", shape=lab.shape, dtype="uint8", chunks=chunks[1:], compressors=comp,
                   fill_value=0)[...] = lab
    g.create_array("fg_coords", shape=fg.shape, dtype="int32", chunks=(max(1, fg.shape[0]), 4),
                   fill_value=0)[...] = fg
    g.create_array("hu_sample", shape=hu_sample.shape, dtype="int16", chunks=(max(1, hu_sample.size),),
                   fill_value=0)[...] = hu_sample
    return {
        "algorithm": "sha256 of the C-order bytes of the decoded array",
        "image": [array_checksum(c) for c in image],
        "label": array_checksum(lab),
        "fg_coords": array_checksum(fg),
        "hu_sample": array_checksum(hu_sample),
    }


def _commit(tmp: Path, case_dir: Path, case_id: str) -> None:
    """Move any previous version aside, rename the new one in, then drop the old one."""
    replace_dir(tmp, case_dir)


def store_case(case: Case, store: str | os.PathLike, plan: Plan, *, source_hash: str = "") -> Path:
    """Prepare one labelled case with ``plan`` and write it into the store folder ``store`` (made by
    :func:`init_store`) under a temporary name, then commit it by rename. Returns the case folder.

    Raises DataError for a case without a label or with mismatching image/label shapes.
    """
    import zarr

    if case.label is None:
        raise DataError(f"{case.case_id}: no label; the store holds labelled training cases only")
    prepared = prepare_case(case.image, case.geometry, plan, label=case.label, case_id=case.case_id)
    stats, hu_sample = _case_stats(case, prepared.label)
    fg = _fg_coords(prepared.label, case_id=case.case_id)
    case_dir = Path(store) / "cases" / case.case_id
    tmp = temp_path(case_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        g = zarr.open_group(tmp, mode="w")
        _write_group(g, case, prepared, plan, fg, hu_sample, stats, source_hash=source_hash)
        _commit(tmp, case_dir, case.case_id)
    except OSError as exc:  # e.g. a full disk: free what was written, report the case and the cause
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{case.case_id}: cannot write to the store {store}: {exc.strerror or exc}") from None
    return case_dir


def _write_group(g, case: Case, prepared, plan: Plan, fg, hu_sample, stats, *, source_hash: str) -> None:
    """Arrays, then attrs (metadata, fingerprint stats, checksums), then ``complete`` last."""
    meta = prepared.meta
    checksums = _write_arrays(g, prepared, plan, fg, hu_sample)
    g.attrs.update({
        "case_id": case.case_id,
        "channels": list(plan.channels),
        "geometry": meta.geometry.to_dict(),
        "grid": meta.grid.to_dict(),
        "crop_box": [list(b) for b in meta.crop_box],
        "spacing_zyx": list(meta.spacing_zyx),
        "original_shape": list(map(int, meta.original_shape)),
        "stored_shape": list(map(int, meta.stored_shape)),
        "annotated": [int(a) for a in case.annotated],
        "sources": [str(s) for s in case.sources],
        "source_hash": source_hash,
        "plan_hash": plan.key(),
        "stats": stats,
        "checksums": checksums,
    })
    g.attrs["complete"] = True  # written last: only a fully written group carries it


def _process_one(ref, fmt: str, store_path: str, plan: Plan, src_hash: str) -> tuple[str, str, str, float]:
    """Worker entry (top level, spawn-safe). Returns (case_id, "done"|"failed", message, seconds)."""
    from sepnet.data import readers

    case_id = str(ref.case_id)
    t0 = time.perf_counter()
    try:
        case = readers.read_case(ref, format=fmt, require_label=True)
        store_case(case, store_path, plan, source_hash=src_hash)
    except DataError as exc:
        return case_id, "failed", str(exc), time.perf_counter() - t0
    except Exception as exc:  # a reader bug or an unforeseen file problem: report, keep the others going
        log.debug("case %s failed:\n%s", case_id, traceback.format_exc())
        msg = f"{', '.join(map(str, _source_files(ref))) or case_id}: {type(exc).__name__}: {exc}"
        return case_id, "failed", msg, time.perf_counter() - t0
    return case_id, "done", "", time.perf_counter() - t0


def init_store(path: str | os.PathLike, *, own: Collection[str] | None = None) -> Path:
    """Create (or reopen) the store folder ``path``; remove leftovers of a crashed writer. Returns the path.

    own: the case ids this writer owns (a shard); only their leftovers are removed, so that writers of
    other cases may be at work at the same time. None: the only writer, every leftover goes.
    Raises DataError when ``path`` is not a folder that can hold a store (a file, below a file, not
    writable, or another Zarr group).
    """
    import zarr

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: store path exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{path}: cannot create the store folder: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{path}: store folder is not writable")
    root_attrs = read_group_attrs(path)
    if (path / "zarr.json").is_file():
        if root_attrs is None or "sepnet_store" not in root_attrs:
            raise DataError(f"{path}: a Zarr group but not a sepnet store; choose another folder")
    root = zarr.open_group(path, mode="a")
    if root.attrs.get("sepnet_store") != STORE_VERSION:  # older cases are rewritten: their plan key differs
        root.attrs["sepnet_store"] = STORE_VERSION
    (path / "cases").mkdir(exist_ok=True)
    if not (path / "cases" / "zarr.json").is_file():
        zarr.open_group(path / "cases", mode="a")
    # Leftovers of a crashed run (of this writer's cases: other writers' temp folders are theirs).
    for d in (path / "cases").iterdir():
        if d.name.startswith(".") and (".tmp-" in d.name or ".old-" in d.name):
            if own is None or re.sub(r"\.(tmp|old)-\d+$", "", d.name[1:]) in own:
                shutil.rmtree(d, ignore_errors=True)
    return path


def _plan_md(plan: Plan, n_cases: int) -> str:
    tf = "".join(
        f"  - {t.name}: HU {list(t.hu_breakpoints)} -> {list(t.values)}\n" for t in plan.transforms
    )
    return (
        "# sepnet preprocessing plan\n\n"
        f"- cases: {n_cases}; plan key {plan.key()} (store version {STORE_VERSION})\n"
        f"- transforms (image channels, piecewise linear, clamped):\n{tf}"
        f"- in-plane centre crop (y, x): {list(plan.crop) if plan.crop else 'none'}"
        " (smaller axes kept whole; the sampler pads)\n"
        f"- resampling to (z, y, x) mm: {list(plan.spacing_zyx) if plan.spacing_zyx else 'none (original spacing)'}"
        f" (HU linear with fill {plan.fill_hu:g} HU outside the image, labels nearest)\n"
        f"- chunks (channel, z, y, x): {list(plan.chunks)}; codec: {plan.codec} (clevel {plan.clevel}, byte shuffle)\n"
        f"- image {plan.dtype} in [0, 1] (0 = air), label uint8\n"
    )


def _up_to_date(store: Path, cid: str, src_hash: str, plan: Plan, *, verify: bool) -> bool:
    attrs = read_group_attrs(store / "cases" / cid)
    if not (attrs and attrs.get("complete") is True and attrs.get("source_hash") == src_hash
            and attrs.get("plan_hash") == plan.key()):
        return False
    if verify:
        try:
            Store(store).verify(cid)
        except DataError as exc:
            log.warning("preprocess: rewriting damaged case: %s", exc)
            return False
    return True


def _write_file(path: Path, write) -> None:
    """``write(path)`` with an OSError (full disk, permissions) turned into a one-line DataError."""
    try:
        write(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot write: {exc.strerror or exc}") from None


def stale_cases(dataset: str | os.PathLike, store: str | os.PathLike, *, plan: Plan, format: str = "auto",
                case_ids: Collection[str] | None = None) -> list[str]:
    """Case ids of ``dataset`` (those in ``case_ids`` when given) that the store lacks or holds out of date
    (sources or plan changed): what :func:`preprocess` would write. Reads attributes only, writes nothing."""
    from sepnet.data import readers

    store = Path(store)
    return [str(r.case_id) for r in readers.list_cases(dataset, format=format)
            if (case_ids is None or str(r.case_id) in case_ids)
            and not _up_to_date(store, str(r.case_id), source_hash(r), plan, verify=False)]


def write_fingerprint(store: str | os.PathLike) -> Path:
    """Compute the fingerprint of the store's complete cases and write fingerprint.json (atomic)."""
    store = Path(store)
    fp = compute_fingerprint(Store(store))
    _write_file(store / "fingerprint.json", lambda p: atomic_write_json(p, fp))
    return store / "fingerprint.json"


def _run_cases(todo: list, *, fmt: str, store: Path, plan: Plan, workers: int, collect) -> None:
    """Process ``todo`` [(ref, source_hash)] serially or in ``workers`` spawned processes."""
    if workers <= 1 or len(todo) <= 1:
        for ref, h in todo:
            collect(_process_one(ref, fmt, str(store), plan, h))
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as ex:
        futs = [ex.submit(_process_one, ref, fmt, str(store), plan, h) for ref, h in todo]
        for f in cf.as_completed(futs):
            collect(f.result())


def preprocess(
    dataset: str | os.PathLike,
    store: str | os.PathLike,
    *,
    format: str = "auto",
    transforms: Sequence[str] = ("SLF1", "SLF2", "SLF3"),
    crop: Sequence[int] | None = (256, 256),
    spacing: Sequence[float] | None = None,
    chunks: Sequence[int] = (1, 16, 128, 128),
    codec: str = "zstd",
    clevel: int = 3,
    workers: int = 2,
    progress: bool = True,
    verify: bool = False,
    case_ids: Collection[str] | None = None,
    fingerprint: bool = True,
) -> PreprocessReport:
    """Convert a labelled dataset into a Zarr store (layout: ``sepnet.data.store``).

    Args:
        dataset: dataset folder (any format ``sepnet.data.readers`` knows).
        store: output folder; created if missing; complete, unchanged cases are skipped.
        transforms: intensity presets, one channel each (plan dtype, float16).
        crop: in-plane (y, x) centre crop in voxels of the (resampled) grid; None = off.
        spacing: target (z, y, x) voxel spacing in mm; None = keep the original grid.
        chunks: (channel, z, y, x) chunk shape; codec: zstd | lz4 (Blosc, byte shuffle) | none.
        workers: processes (spawn); 1 = in this process.
        verify: check the checksums of cases that would be skipped and rewrite the damaged ones.
        progress: print one line per case written (case id, seconds, ok / failed: cause) to stdout.
        case_ids: only these cases of the dataset (a shard; the others are left alone).
        fingerprint: write fingerprint.json at the end (False for a shard: the caller writes it
            with :func:`write_fingerprint` once every shard is done).

    Returns:
        PreprocessReport; a case whose reading fails is listed in ``failed`` and skipped.

    Raises:
        ConfigError: a bad option. DataError: the dataset or the store folder is unusable.
    """
    from sepnet.data import readers

    t0 = time.perf_counter()
    plan = make_plan(transforms=transforms, crop=crop, spacing_zyx=spacing, chunks=chunks, codec=codec,
                     clevel=clevel)
    store = init_store(store, own=case_ids)
    refs = readers.list_cases(dataset, format=format)
    report = PreprocessReport(store=store)
    todo = []
    for ref in refs:
        cid = str(ref.case_id)
        if case_ids is not None and cid not in case_ids:
            continue
        if not cid or cid.startswith(".") or "/" in cid or "\\" in cid:
            report.failed[cid] = f"{dataset}: case id {cid!r} is not a valid folder name"
            continue
        h = source_hash(ref)
        if _up_to_date(store, cid, h, plan, verify=verify):
            report.skipped.append(cid)
        else:
            todo.append((ref, h))
    _write_file(store / "plan.json", lambda p: atomic_write_json(p, plan.to_dict()))
    _write_file(store / "plan.md", lambda p: atomic_write_text(p, _plan_md(plan, len(refs))))

    def _collect(res: tuple[str, str, str, float]) -> None:
        cid, status, msg, seconds = res
        if status == "done":
            report.done.append(cid)
        else:
            report.failed[cid] = msg
            log.warning("preprocess: failed case %s: %s", cid, msg)  # one line per bad case
        if progress:  # one line per case, also in a batch job's log
            n = len(report.done) + len(report.failed)
            print(f"preprocess [{n}/{len(todo)}] {cid}: {seconds:.1f} s "
                  + ("ok" if status == "done" else f"failed: {msg}"), flush=True)

    try:
        _run_cases(todo, fmt=format, store=store, plan=plan, workers=workers, collect=_collect)
    finally:
        if fingerprint:  # describes what is complete now (also after an interrupted run)
            write_fingerprint(store)
    report.done.sort()
    report.skipped.sort()
    report.seconds = time.perf_counter() - t0
    return report
