"""A procedural head-and-neck CT phantom with the 22 StructSeg organs.

No labelled head-and-neck CT can be downloaded here, so every quickstart and test runs on this phantom.
It is built to be hard in the ways real data is hard, not to be pretty (targets and their sources:
docs/conventions.md, "Phantom"):

- all 22 organs at approximately anatomical positions, sizes and HU (StructSeg means);
- surrounding anatomy: skin, subcutaneous fat, muscle, skull shell with diploe, skull base, brain white/grey
  matter with sulci and ventricles, CSF cisterns, orbital fat and extra-ocular muscles, sinuses, nasal cavity,
  airway, petrous bone, mastoid, vertebrae, teeth, tongue, thyroid, a couch and air outside;
- partial volume along z: the scene is rendered on ``nsub`` sub-slices per slice and averaged over the
  slab; labels are rendered on the same sub-slices and assigned by majority over the slab (ties go to the
  sub-slice nearest the slab centre), so image and label agree;
- spatially correlated noise (Gaussian-filtered white noise scaled to a per-case std of 12-18 HU) and a
  correlated tissue texture (trabecular bone, parotid lobules, mastoid air cells);
- tiny flat organs (lens, optic nerves, chiasm) spanning only 2-4 slices of 3 mm, and low-contrast soft
  tissue (parotid vs. muscle and fat, brain stem vs. brain and CSF);
- per-case variation: pose (yaw +-10 deg, pitch/roll +-2 deg, shift +-4 mm), scale 0.9-1.1, organ radii
  +-15 % (+-10 % for lens, optic nerves and chiasm so they stay a few slices thin), HU offsets +-10 per
  tissue, in-plane spacing, z range and so slice count, noise level.

Modules: ``phantom_shapes`` (shape primitives), ``phantom_anatomy`` (tissue HU, per-case parameters, the
context anatomy, the couch), ``phantom_organs`` (the 22 organs), ``phantom_render`` (pose, sub-slice
rendering, texture and noise). This module draws a case's grid and pose and puts them together.

Coordinates: the anatomy is written in an "anatomical" frame, mm from eye-level midline, LPS axes
(+x = patient left, +y = posterior, +z = superior). A case maps it to physical LPS space by
``P = t + s * R @ A``. Images have identity direction and the grid is centred in-plane on (0, 0), so the head
centre is near physical (0, 0, 0). Shapes are painted in a fixed order (couch, context, then organs from
low to high priority): each voxel has exactly one label.

Sizes (per case; in-plane spacing jitters by the given factor, the z range by the given intervals):

========  ==============  ===================  =======  ==========  ===================  =========
size      in-plane        spacing x/y (mm)     z (mm)   sub-slices  z range (mm)         slices
========  ==============  ===================  =======  ==========  ===================  =========
tiny      64 x 64         3.8 x [0.95, 1.05]   4.0      5           +50..60 to -118..130  43-48
small     128 x 128       2.0 x [0.95, 1.05]   3.0      5           +50..60 to -118..130  57-64
full      512 x 512       0.98 x [0.90, 1.10]  3.0      3           +75..105 to -200..250 93-119
slab      512 x 512       0.98 x [0.90, 1.10]  3.0      3           +25..35 to -60..70    29-36
========  ==============  ===================  =======  ==========  ===================  =========

``slab`` is ``full`` cut to a slab around the eyes and the skull base: the arrays users see in-plane, with a
third of the slices (a CI-sized paper-scale run).

``tiny`` is about 0.6 MB in memory (int16 + uint8), ``small`` about 3 MB, ``full`` about 80 MB.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sepnet.core.errors import DataError
from sepnet.data.case import Case, Geometry
from sepnet.data.layouts import FORMATS
from sepnet.data.phantom_anatomy import TISSUE_HU, Params, context, couch
from sepnet.data.phantom_organs import organs
from sepnet.data.phantom_render import Pose, add_texture_and_noise, render, rotation

log = logging.getLogger(__name__)

__all__ = ["SIZES", "SizeSpec", "make_case", "write_phantom", "FORMATS"]

HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class SizeSpec:
    """Grid of one phantom size. Lengths in mm, counts in voxels."""

    n_xy: int
    spacing_xy: float  # nominal in-plane spacing, mm
    spacing_z: float  # slice thickness = spacing, mm
    nsub: int  # sub-slices per slice for z partial volume
    z_top: tuple[float, float]  # top of the field of view, mm above eye level (uniform range)
    z_bottom: tuple[float, float]  # bottom, mm below eye level (uniform range, positive numbers)
    xy_jitter: float  # in-plane spacing factor range 1 +- xy_jitter


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(64, 3.8, 4.0, 5, (50.0, 60.0), (118.0, 130.0), 0.05),
    "small": SizeSpec(128, 2.0, 3.0, 5, (50.0, 60.0), (118.0, 130.0), 0.05),
    "full": SizeSpec(512, 0.98, 3.0, 3, (75.0, 105.0), (200.0, 250.0), 0.10),
    "slab": SizeSpec(512, 0.98, 3.0, 3, (25.0, 35.0), (60.0, 70.0), 0.10),
}


def make_case(*, seed: int, size: str = "small", case_id: str | None = None) -> Case:
    """Render one phantom case.

    seed: an int, or a sequence of ints (``write_phantom`` uses ``(seed, i)`` for case i); the same seed
    gives a bit-identical case. size: ``tiny`` | ``small`` | ``full`` | ``slab`` (see the module docstring).
    Returns a :class:`Case` with image int16 HU (z, y, x) clipped to [-1024, 3071], label uint8 (z, y, x)
    with StructSeg ids 0..22, identity direction, and the grid centred in-plane on (0, 0).
    Raises DataError for an unknown size.
    """
    if size not in SIZES:
        raise DataError(f"phantom size {size!r}: unknown, use one of {sorted(SIZES)}")
    spec = SIZES[size]
    seq = np.random.SeedSequence(list(seed) if isinstance(seed, (tuple, list)) else int(seed))
    rng = np.random.default_rng(seq)
    # the draw order (grid, pose, HU offsets, anatomy, organs, noise) fixes every case: keep it
    geom, sxy, (xs, ys, zf_all) = _grid(spec, rng)
    pose = _pose(rng)
    params = Params.draw(rng)
    context_shapes, brain = context(params)
    organ_shapes = organs(params, brain=brain)
    noise_sd = rng.uniform(12.0, 18.0)
    noise_seed = rng.integers(0, 2**63)

    shapes = [couch(scale=pose.scale, shift=pose.shift, rot=pose.rot)] + context_shapes + organ_shapes
    hu, amp, label = render(shapes, xs=xs, ys=ys, zf_all=zf_all, nsub=spec.nsub, pose=pose, background=TISSUE_HU["air"])
    hu = add_texture_and_noise(hu, amp, noise_sd=noise_sd, seed=noise_seed, spacing_xy=sxy)
    del amp
    image = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    cid = case_id if case_id is not None else f"phantom_{_seed_tag(seed)}"
    return Case(case_id=cid, image=image, label=label, geometry=geom, sources=(f"phantom:{size}:seed={seed}",))


def _grid(spec: SizeSpec, rng: np.random.Generator):
    """This case's Geometry, its in-plane spacing (mm), and the physical voxel centres xs (x), ys (y) float32
    and the sub-slice centres (z, ``spec.nsub`` per slice, slice-major) float64, all mm."""
    sxy = spec.spacing_xy * rng.uniform(1 - spec.xy_jitter, 1 + spec.xy_jitter)
    sz = spec.spacing_z
    z_top = rng.uniform(*spec.z_top)
    z_bot = -rng.uniform(*spec.z_bottom)
    nz = int(round((z_top - z_bot) / sz)) + 1
    n = spec.n_xy
    origin = (-(n - 1) / 2 * sxy, -(n - 1) / 2 * sxy, z_bot)
    geom = Geometry(
        spacing=(sxy, sxy, sz), origin=origin, direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), shape=(nz, n, n)
    )
    nsub = spec.nsub
    xs = (origin[0] + sxy * np.arange(n)).astype(np.float32)
    ys = (origin[1] + sxy * np.arange(n)).astype(np.float32)
    zf_all = (z_bot + sz * (np.arange(nz)[:, None] + (np.arange(nsub)[None, :] + 0.5) / nsub - 0.5)).ravel()
    return geom, sxy, (xs, ys, zf_all)


def _pose(rng: np.random.Generator) -> Pose:
    """Yaw +-10 deg, pitch and roll +-2 deg, scale 0.9-1.1, shift +-4 mm in-plane and +-5 mm in z."""
    rot = rotation(*np.deg2rad([rng.uniform(-10, 10), rng.uniform(-2, 2), rng.uniform(-2, 2)]))
    scale = rng.uniform(0.9, 1.1)
    shift = np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-5, 5)])
    return Pose(rot=rot, scale=scale, shift=shift)


def _seed_tag(seed) -> str:
    return "_".join(str(int(s)) for s in seed) if isinstance(seed, (tuple, list)) else str(int(seed))


# -------------------------------------------------------------------------------------------------
# Writing datasets.


def write_phantom(out, *, cases: int, seed: int, size: str = "small", format: str = "structseg",
                  indices=None, prefix: str = "phantom") -> list[Path]:
    """Write ``cases`` phantom cases ``<prefix>_000``, ... into ``out``; case i uses seed ``(seed, i)``.

    indices: only these case numbers of the ``cases`` (one shard of several writers); None = all.
    prefix: the case-id prefix (distinct per dataset when a study mixes several phantom datasets).

    format: ``structseg`` | ``pddca`` | ``hanseg`` | ``dicom``, written by ``sepnet.data.readers.write_case``
    as ``out/<case_id>/...``, which builds each case folder under a temporary name and renames it into place,
    so an interrupted run leaves no half-written case. Cases whose folder exists are skipped (not re-rendered).
    Returns the folders of all ``cases`` cases (written or already there). Raises DataError when ``out``
    cannot be written.
    """
    if format not in FORMATS:
        raise DataError(f"phantom format {format!r}: unknown, use one of {list(FORMATS)}")
    if size not in SIZES:
        raise DataError(f"phantom size {size!r}: unknown, use one of {sorted(SIZES)}")
    if cases < 0:
        raise DataError(f"phantom cases {cases}: must be >= 0")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DataError(f"{out}: cannot write the phantom dataset here ({exc.strerror or exc})") from exc
    from sepnet.data.readers import write_case  # imported late: SimpleITK/pydicom load only when writing

    paths: list[Path] = []
    for i in range(cases):
        if indices is not None and i not in indices:
            continue
        cid = f"{prefix}_{i:03d}"
        dest = out / cid
        if dest.exists():
            log.info("phantom: %s already present, skipped", dest)
            paths.append(dest)
            continue
        case = make_case(seed=(int(seed), i), size=size, case_id=cid)
        paths.append(Path(write_case(case, out, format=format)))
        log.info("phantom: wrote %s", paths[-1])
    return paths
