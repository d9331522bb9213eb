"""The paper-scale smoke at the arrays users will see: configs/paperscale-smoke.yaml, reduced for CI.

Full-size phantom CT (512x512 in-plane at ~1 mm, ~100 slices), the paper's 256x256 crop, base-24 networks,
16x128x128 patches and whole-plane inference windows; reduced by ``--set`` to 2 ensemble members + the
3D-UNet: the study reaches its report and ``sepnet predict`` segments a new full-size DICOM series. Marked
``paperscale`` and run on demand (``make test PYTEST_ARGS="-s -m paperscale"``): at base 24 on 2 CPU cores
its evaluation alone takes tens of minutes (docs/benchmarks.md, section 8).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.paperscale

ROOT = Path(__file__).resolve().parent.parent
MEMBERS = ("[{name: sep-slf1-a05, network: sepnet, transform: SLF1, loss: ath_exp_log, alpha: 0.5},"
           " {name: sep-slf2-a1, network: sepnet, transform: SLF2, loss: ath_exp_log, alpha: 1.0}]")
BASELINES = "[{name: unet3d, network: unet3d, transform: SLF1, loss: ath_exp_log, alpha: 0.5}]"


# runs its arguments as a child and prints the peak RSS (KiB) of the largest process it waited for
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print('peak-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def _sepnet(*args: str, cwd: Path) -> tuple[float, float]:
    """Run ``sepnet ARGS`` in a child process; (seconds, peak RSS GiB of its largest process)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "sepnet.jobs.cli", *args], cwd=cwd,
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out[-3000:])
    kib = int(next(ln for ln in reversed(out.splitlines()) if ln.startswith("peak-kib")).split()[1])
    return time.perf_counter() - t0, kib / 2**20


def test_paperscale_smoke_reaches_the_report_and_predicts_a_full_size_dicom(tmp_path):
    cfg = tmp_path / "paperscale-smoke.yaml"
    text = (ROOT / "configs" / "paperscale-smoke.yaml").read_text()
    cfg.write_text(text.replace("../studies/", "./"))
    seconds, rss = _sepnet("cv", str(cfg), "--set", f"members={MEMBERS}", "--set", f"baselines={BASELINES}",
                           cwd=tmp_path)
    study = tmp_path / "paperscale-smoke"
    report = json.loads((study / "report" / "report.json").read_text())
    assert {"sep-slf1-a05", "sep-slf2-a1", "unet3d", "ensemble"} <= set(report["summary"])
    store_meta = json.loads((study / "store" / "fingerprint.json").read_text())
    spec = json.loads((study / "models" / "fold0" / "sep-slf1-a05" / "spec.json").read_text())
    assert spec["base"] == 24 and list(spec["patch"]) == [16, 128, 128]
    shapes = [c["shape"] for c in store_meta["cases"].values()]
    assert all(s[1] >= 500 and s[2] >= 500 for s in shapes), shapes  # 512x512 in-plane before the crop
    print(f"\npaperscale smoke: sepnet cv {seconds:.0f} s, peak RSS of its largest process {rss:.2f} GiB")

    # a new full-size scan as a DICOM series: labels and uncertainty in its own geometry
    from sepnet.data.phantom import write_phantom

    scans = tmp_path / "new"
    write_phantom(scans, cases=1, seed=7, size="full", format="dicom", prefix="new")
    series = next(p for p in scans.rglob("*") if p.is_dir() and any(p.glob("*.dcm")) and
                  not any(q.is_dir() for q in p.iterdir()))
    seconds, rss = _sepnet("predict", "-i", str(series), "-o", str(tmp_path / "out"), "--study", str(study),
                           cwd=tmp_path)
    out = next((tmp_path / "out").iterdir())
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ct = reader.Execute()
    labels, unc = sitk.ReadImage(str(out / "labels.nii.gz")), sitk.ReadImage(str(out / "uncertainty.nii.gz"))
    for img in (labels, unc):
        assert img.GetSize() == ct.GetSize()
        np.testing.assert_allclose(img.GetSpacing(), ct.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    assert (out / "rtstruct.dcm").is_file()
    assert np.isfinite(sitk.GetArrayViewFromImage(unc)).all()
    print(f"paperscale smoke: sepnet predict of a {ct.GetSize()} DICOM series with 2 members {seconds:.0f} s, "
          f"peak RSS {rss:.2f} GiB")
    shutil.rmtree(tmp_path / "phantom-full", ignore_errors=True)
