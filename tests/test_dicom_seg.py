"""data.dicom_seg: a label map as DICOM-SEG, checked by reading the file with pydicom alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest

from sepnet import __version__
from sepnet.core.errors import DataError
from sepnet.core.organs import NAME_TO_ID, ORGAN_NAMES
from sepnet.data.dicom_seg import read_dicom_seg, write_dicom_seg
from sepnet.data.phantom import make_case
from sepnet.data.readers import write_case

# the phantom's CT series has single-component patient names, which highdicom warns about
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")

FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


@pytest.fixture(scope="module", params=["identity", "flipped_z"])
def dicom_case(request, tmp_path_factory):
    """(phantom case, its DICOM folder, its labels on the series grid). A left-handed grid reads back
    from DICOM with z reversed (slices sorted along row x column)."""
    case = make_case(seed=0, size="tiny")
    if request.param == "flipped_z":
        case = dataclasses.replace(case, geometry=dataclasses.replace(case.geometry, direction=FLIP_Z))
    folder = write_case(case, tmp_path_factory.mktemp(request.param), format="dicom")
    on_series_grid = case.label if request.param == "identity" else np.ascontiguousarray(case.label[::-1])
    return case, folder, on_series_grid


def _ct_headers(folder):
    return {str(h.SOPInstanceUID): h for h in (pydicom.dcmread(f, stop_before_pixels=True)
                                               for f in sorted(folder.rglob("CT_*.dcm")))}


def _rebuild(seg: pydicom.Dataset, case, ct: dict) -> np.ndarray:
    """Label map on the phantom's own grid from the SEG's frames, placed by the physical position of the
    CT slice each frame names (pydicom only: independent of the writer's slice ordering)."""
    organ_of = {int(s.SegmentNumber): NAME_TO_ID[str(s.SegmentLabel)] for s in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out = np.zeros(case.label.shape, dtype=np.uint8)
    for frame, fg in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        sop = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        ipp = np.asarray(ct[sop].ImagePositionPatient, dtype=float)
        assert np.allclose(np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, dtype=float), ipp, atol=1e-3)
        z = int(round(case.geometry.physical_to_index(ipp[None])[0, 2]))
        out[z][frame > 0] = organ_of[int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
    return out


def test_frames_equal_the_label_map_voxel_for_voxel(dicom_case, tmp_path):
    case, folder, labels = dicom_case
    out = write_dicom_seg(labels, folder, tmp_path / "seg.dcm", organ_names=ORGAN_NAMES)
    seg = pydicom.dcmread(out)
    ct = _ct_headers(folder)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert np.array_equal(_rebuild(seg, case, ct), case.label)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == [ORGAN_NAMES[i] for i in sorted(ORGAN_NAMES)]
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == next(iter(ct.values())).SeriesInstanceUID
    assert {str(r.ReferencedSOPInstanceUID) for r in ref.ReferencedInstanceSequence} == set(ct)
    assert seg.StudyInstanceUID == next(iter(ct.values())).StudyInstanceUID
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("sepnet", __version__)
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    back, names = read_dicom_seg(out, folder)  # the module's own reader: the round trip
    assert back.dtype == np.uint8 and np.array_equal(back, labels) and names == ORGAN_NAMES


def test_absent_organs_get_no_segment(dicom_case, tmp_path):
    case, folder, labels = dicom_case
    only = np.where(np.isin(labels, [1, 4]), labels, 0).astype(np.uint8)
    out = write_dicom_seg(only, folder, tmp_path / "seg.dcm", organ_names=ORGAN_NAMES)
    seg = pydicom.dcmread(out)
    assert [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence] == [
        (1, "Brain_Stem"), (2, "Lens_L")]
    truth = np.where(np.isin(case.label, [1, 4]), case.label, 0)
    assert np.array_equal(_rebuild(seg, case, _ct_headers(folder)), truth)
    back, names = read_dicom_seg(out, folder)
    assert np.array_equal(back, only) and names == {1: "Brain_Stem", 4: "Lens_L"}


def test_colours_match_the_rtstruct_or_are_given(dicom_case, tmp_path):
    import highdicom as hd

    _, folder, labels = dicom_case
    seg = pydicom.dcmread(write_dicom_seg(labels, folder, tmp_path / "a.dcm", organ_names=ORGAN_NAMES))
    rt = pydicom.dcmread(folder / "rtstruct.dcm")
    roi_name = {int(r.ROINumber): str(r.ROIName) for r in rt.StructureSetROISequence}
    rgb = {roi_name[int(c.ReferencedROINumber)]: [int(v) for v in c.ROIDisplayColor] for c in rt.ROIContourSequence}
    for s in seg.SegmentSequence:  # the RTSTRUCT beside it shows each organ in the same colour
        assert list(s.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*rgb[s.SegmentLabel]).value)
    seg = pydicom.dcmread(write_dicom_seg(labels, folder, tmp_path / "b.dcm", organ_names=ORGAN_NAMES,
                                          organ_colours={4: (255, 0, 0)}))
    lens = next(s for s in seg.SegmentSequence if s.SegmentLabel == "Lens_L")
    # pure red: L* 53.24, a* 80.09, b* 67.20, scaled to 0..65535 (L* / 100, (a*, b*) + 128 / 255)
    assert np.allclose(lens.RecommendedDisplayCIELabValue, [34891, 53480, 50166], atol=20)


def test_bad_inputs_are_data_errors(dicom_case, tmp_path):
    _, folder, labels = dicom_case
    with pytest.raises(DataError, match=r"seg\.dcm: the label map has no organ voxels"):
        write_dicom_seg(np.zeros_like(labels), folder, tmp_path / "seg.dcm", organ_names=ORGAN_NAMES)
    with pytest.raises(DataError, match="does not match the CT series"):
        write_dicom_seg(labels[1:], folder, tmp_path / "seg.dcm", organ_names=ORGAN_NAMES)
    with pytest.raises(DataError, match=r"label ids \[22\] have no organ name"):
        names = {i: n for i, n in ORGAN_NAMES.items() if i != 22}
        write_dicom_seg(labels, folder, tmp_path / "seg.dcm", organ_names=names)
    assert not (tmp_path / "seg.dcm").exists()
    with pytest.raises(DataError, match="not a readable DICOM-SEG"):
        read_dicom_seg(folder / "rtstruct.dcm", folder)
