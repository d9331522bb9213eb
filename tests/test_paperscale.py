"""The paper-scale smoke at the arrays users will see: configs/paperscale-smoke.yaml.

Full-size phantom CT (512x512 in-plane at ~1 mm, 3 mm slices), the paper's 256x256 crop, base-24 networks,
16x128x128 patches and the paper config's inference windows. Both tests run ``sepnet cv`` to the report and
``sepnet predict`` on a new scan written as a DICOM series, whose labels and uncertainty must come back in
that scan's geometry, and print each job's last line (time, peak RSS).

- ``test_paperscale_reduced`` (``-m "paperscale and not slow"``, a phase of .ci/run, ~12 min on 2 cores): the
  ``slab`` phantom (512x512, ~32 slices), 2 SepNet members + the 3D-UNet.
- ``test_paperscale_full`` (``-m "paperscale and slow"``, on demand): the config as it is, 5 full-size cases
  of ~100 slices and all 9 models (docs/benchmarks.md, section 8).
"""

from __future__ import annotations

import json
import re
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
SLAB = "[{path: ./phantom-slab, format: structseg, phantom: {cases: 5, seed: 0, size: slab}}]"

# runs its arguments as a child and prints the peak RSS (KiB) of the largest process it waited for
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print('peak-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def _sepnet(*args: str, cwd: Path) -> tuple[float, float, str]:
    """Run ``sepnet ARGS`` in a child process; (seconds, peak RSS GiB of its largest process, stdout)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "sepnet.jobs.cli", *args], cwd=cwd,
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out[-3000:])
    kib = int(next(ln for ln in reversed(out.splitlines()) if ln.startswith("peak-kib")).split()[1])
    return time.perf_counter() - t0, kib / 2**20, out


def _job_lines(study: Path) -> list[str]:
    """The last line with a peak RSS of every job's stdout (jobs.json), prefixed with the job's name."""
    jobs = json.loads((study / "jobs.json").read_text())["jobs"]
    lines = []
    for name, job in sorted(jobs.items()):
        path = Path(job.get("stdout") or "")
        text = path.read_text(errors="replace") if path.is_file() else ""
        rss = [ln for ln in text.splitlines() if "peak RSS" in ln]
        lines.append(f"{name}: {rss[-1] if rss else '(no peak RSS line)'}")
    return lines


def _smoke(tmp_path: Path, *sets: str, new_size: str, members: int) -> None:
    cfg = tmp_path / "paperscale-smoke.yaml"
    cfg.write_text((ROOT / "configs" / "paperscale-smoke.yaml").read_text().replace("../studies/", "./"))
    args = [a for s in sets for a in ("--set", s)]
    seconds, rss, _ = _sepnet("cv", str(cfg), *args, cwd=tmp_path)
    study = tmp_path / "paperscale-smoke"
    report = json.loads((study / "report" / "report.json").read_text())
    spec = json.loads((study / "models" / "fold0" / "sep-slf1-a05" / "spec.json").read_text())
    assert spec["base"] == 24 and list(spec["patch"]) == [16, 128, 128]
    assert "ensemble" in report["summary"] and "sep-slf1-a05" in report["summary"] and "unet3d" in report["summary"]
    store_meta = json.loads((study / "store" / "fingerprint.json").read_text())
    shapes = [(c["shape"], c["stored_shape"]) for c in store_meta["cases"].values()]
    # 512x512 in-plane before the crop, the paper's 256x256 after it
    assert all(s[1] >= 500 and s[2] >= 500 and list(t[1:]) == [256, 256] for s, t in shapes), shapes
    lines = _job_lines(study)
    print("\n".join(["", f"paperscale smoke: sepnet cv {seconds:.0f} s, peak RSS of its largest process "
                     f"{rss:.2f} GiB; per job:", *lines]))
    assert not [ln for ln in lines if ln.startswith("train/") and "no peak RSS" in ln]

    # a new scan as a DICOM series: labels and uncertainty in its own geometry
    from sepnet.data.phantom import write_phantom

    scans = tmp_path / "new"
    write_phantom(scans, cases=1, seed=7, size=new_size, format="dicom", prefix="new")
    series = next(p for p in scans.rglob("*") if p.is_dir() and any(p.glob("*.dcm")) and
                  not any(q.is_dir() for q in p.iterdir()))
    seconds, rss, out_text = _sepnet("predict", "-i", str(series), "-o", str(tmp_path / "out"), "--study", str(study),
                                     cwd=tmp_path)
    assert re.search(rf"ensemble of {members} model\(s\)", out_text), out_text[-2000:]
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
    u = sitk.GetArrayViewFromImage(unc)
    assert np.isfinite(u).all() and u.min() >= 0 and u.max() <= np.log(members) + 1e-6  # vote entropy, nats
    print(f"paperscale smoke: sepnet predict of a {ct.GetSize()} DICOM series with {members} members "
          f"{seconds:.0f} s, peak RSS {rss:.2f} GiB")


@pytest.mark.timeout(1500)
def test_paperscale_reduced(tmp_path):
    """CI's variant: 512x512 slabs of ~32 slices, 2 members + the 3D-UNet, all else the paper's arrays."""
    _smoke(tmp_path, f"datasets={SLAB}", f"members={MEMBERS}", f"baselines={BASELINES}",
           "training.val_slabs=1", new_size="slab", members=2)


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_paperscale_full(tmp_path):
    """The config as it is: 5 full-size cases, all 9 models; predict a new full-size scan with 6 members."""
    _smoke(tmp_path, new_size="full", members=6)
