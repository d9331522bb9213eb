"""Soak: a full disk while writing checkpoints and the Zarr store, on a small tmpfs (``mount -t tmpfs``).

Expectation: a clear one-line error; the previous checkpoint stays intact and loadable, no temporary file is
left behind; the store keeps its complete cases (bit-identical to a store written on a roomy disk), accepts
no half-written case, and a rerun with space again completes the rest. Needs root (mount); skipped
otherwise. Fast instance: 6 fill levels, 3 cases. ``slow``: 40 fill levels, 8 cases. Run the slow ones with
``.venv/bin/python -m pytest -m slow tests/test_soak_disk.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sepnet.data.phantom import write_phantom
from sepnet.data.store import Store
from sepnet.hpc.checkpoint import load, save_atomic

PAGE = 4096


def _mount_tmpfs(where: Path, size: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode}); run as root")


def _resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


@pytest.fixture
def small_fs(tmp_path):
    """A function mounting a tmpfs of ``size`` bytes at a fresh folder; everything is unmounted afterwards."""
    mounts: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        _mount_tmpfs(where, size)
        mounts.append(where)
        return where

    yield mount
    for m in mounts:
        subprocess.run(["umount", str(m)], capture_output=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path, leave: int) -> None:
    """Fill the file system of ``path`` with a filler file until about ``leave`` bytes stay free."""
    n = max(_free(path) - leave, 0)
    with open(path / "filler", "ab") as f:
        f.write(b"\0" * n)


def _state(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"step": seed, "weights": torch.randn(n, generator=g), "rng": np.random.default_rng(seed).bytes(64)}


def _same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and torch.equal(a["weights"], b["weights"]) and a["rng"] == b["rng"]


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_soak(fs: Path, levels: int) -> dict:
    """Save a 200 KB checkpoint over a 40 KB one with ``levels`` amounts of free space (0 .. 300 KB)."""
    ckpt = fs / "last.pt"
    outcomes = {"saved": 0, "refused": 0, "errors": set()}
    for i, leave in enumerate(np.linspace(0, 300_000, levels).astype(int)):
        (fs / "filler").unlink(missing_ok=True)
        ckpt.unlink(missing_ok=True)
        old = _state(10_000, seed=2 * i)
        save_atomic(old, ckpt)
        _fill(fs, int(leave))
        new = _state(50_000, seed=2 * i + 1)
        try:
            save_atomic(new, ckpt)
        except Exception as exc:  # noqa: BLE001 - the soak records what the writer raises
            outcomes["refused"] += 1
            outcomes["errors"].add(f"{type(exc).__name__}: {exc}".splitlines()[0])
            assert _same(load(ckpt), old), f"previous checkpoint damaged with {leave} bytes free"
        else:
            outcomes["saved"] += 1
            assert _same(load(ckpt), new)
        assert sorted(p.name for p in fs.iterdir()) == ["filler", "last.pt"], "temporary file left behind"
    return outcomes


@pytest.mark.parametrize("levels", [6, pytest.param(40, marks=pytest.mark.slow)])
def test_full_disk_keeps_the_previous_checkpoint(small_fs, levels):
    out = _checkpoint_soak(small_fs(1024 * 1024), levels)
    assert out["refused"] >= 1 and out["saved"] >= 1, out  # both sides of the edge were exercised
    print(f"\ncheckpoint soak: {levels} fill levels: {out}")


def test_full_disk_checkpoint_error_names_the_cause(small_fs):
    fs = small_fs(512 * 1024)
    save_atomic(_state(1000, 0), fs / "last.pt")
    _fill(fs, 8 * 1024)
    with pytest.raises(OSError, match="No space left on device") as err:
        save_atomic(_state(100_000, 1), fs / "last.pt")
    assert str(fs / "last.pt") in str(err.value) or err.value.filename is not None


# --------------------------------------------------------------------------- the store


def _du(path: Path) -> int:
    """Bytes a tree takes on a tmpfs: whole pages per file (folders take none)."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in path.rglob("*") if p.is_file())


def _preprocess(dataset: Path, store: Path) -> subprocess.CompletedProcess:
    sepnet = Path(sys.executable).with_name("sepnet")
    return subprocess.run(
        [str(sepnet), "preprocess", str(dataset), str(store), "--workers", "1", "--no-progress", "--crop", "none",
         "--transforms", "SLF1", "--chunks", "1,16,64,64"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _store_soak(tmp_path: Path, small_fs, cases: int) -> dict:
    dataset = tmp_path / "dataset"
    write_phantom(dataset, cases=cases, seed=3, size="tiny")
    ref = _preprocess(dataset, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    ids = sorted(p.name for p in (tmp_path / "ref" / "cases").iterdir() if p.is_dir())
    assert len(ids) == cases
    per_case = [_du(tmp_path / "ref" / "cases" / c) for c in ids]
    skeleton = _du(tmp_path / "ref") - sum(per_case)
    # room for the skeleton, about half the cases and half of the next one
    keep = cases // 2
    size = (skeleton + sum(per_case[:keep]) + per_case[keep] // 2) // PAGE * PAGE
    fs = small_fs(size)
    out = _preprocess(dataset, fs / "store")
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    failures = [ln for ln in out.stderr.splitlines() if "failed case" in ln or "error:" in ln]
    assert failures and all("No space left on device" in ln for ln in failures), out.stderr[-3000:]
    store, good = Store(fs / "store"), Store(tmp_path / "ref")
    done = store.case_ids
    assert 1 <= len(done) < cases and set(done) <= set(ids)
    for c in done:  # every accepted case is complete and bit-identical to the roomy-disk one
        np.testing.assert_array_equal(store.read_image(c), good.read_image(c))
        np.testing.assert_array_equal(store.read_label(c), good.read_label(c))
    leftovers = [p.name for p in (fs / "store" / "cases").iterdir() if p.is_dir() and p.name not in done]
    _resize(fs, 4 * _du(tmp_path / "ref") + 64 * PAGE)  # space again: a rerun completes the rest
    again = _preprocess(dataset, fs / "store")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{cases - len(done)} written, {len(done)} up to date, 0 failed" in again.stdout
    assert Store(fs / "store").case_ids == ids
    return {"cases": cases, "complete_on_full_disk": len(done), "leftover_dirs": leftovers,
            "failure_line": failures[0].split(": ", 1)[-1][-160:]}


@pytest.mark.parametrize("cases", [3, pytest.param(8, marks=pytest.mark.slow)])
def test_full_disk_store_keeps_complete_cases(tmp_path, small_fs, cases):
    fig = _store_soak(tmp_path, small_fs, cases)
    print(f"\nstore soak: {fig}")
