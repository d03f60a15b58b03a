"""Reading images (files, DICOM folders) and writing label maps with exact geometry, atomically."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segbook.errors import InputError
from segbook.io import Geometry, atomic_path, output_format, read_image, sidecar_path, write_labels

DATA = Path(__file__).parent / "data"
OBLIQUE = (0.9848077, -0.1736482, 0.0, 0.1736482, 0.9848077, 0.0, 0.0, 0.0, -1.0)


def _image(size=(20, 16, 12), pixel=sitk.sitkInt16) -> sitk.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=size[::-1]).astype(sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel)).dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-100.5, 20.25, 33.0))
    img.SetDirection(OBLIQUE)
    return img


def _same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_roundtrip_keeps_geometry_and_values(tmp_path, suffix):
    src = _image()
    sitk.WriteImage(src, str(tmp_path / "in.nrrd"))
    array, geometry = read_image(tmp_path / "in.nrrd")
    assert array.shape == (1, 12, 16, 20) and array.dtype == np.float32
    np.testing.assert_array_equal(array[0], sitk.GetArrayFromImage(src))
    np.testing.assert_allclose(geometry.spacing_zyx, (2.5, 0.8, 0.7), rtol=1e-6)
    labels = (np.abs(array[0]) % 5).astype(np.uint8)
    table = [{"value": v, "name": f"organ{v}", "color": [10 * v, 20, 30], "terminology": None} for v in range(1, 5)]
    out = write_labels(labels, geometry, tmp_path / f"seg{suffix}", table)
    back = sitk.ReadImage(str(out))
    _same_geometry(back, src)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.nrrd", f"seg{suffix}"])   # no temp files
    if suffix == ".seg.nrrd":
        assert back.GetMetaData("Segment2_Name") == "organ3"
        assert back.GetMetaData("Segment2_LabelValue") == "3"
        assert back.GetMetaData("Segment0_Color").startswith("0.0392157 0.0784314")


def test_seg_nrrd_terminology_tags(tmp_path):
    from segbook.labels import class_table
    table = class_table(["background", "liver", "spleen"])
    write_labels(np.zeros((3, 4, 5), np.uint8), Geometry((5, 4, 3), (1, 1, 1), (0, 0, 0), OBLIQUE),
                 tmp_path / "x.seg.nrrd", table)
    tags = sitk.ReadImage(str(tmp_path / "x.seg.nrrd")).GetMetaData("Segment0_Tags")
    assert tags.startswith("TerminologyEntry:Segmentation category and type - SegBook~SCT^")
    assert "^Liver" in tags


def test_dicom_series_folder(tmp_path):
    src = _image(size=(24, 20, 6))
    src.SetDirection(OBLIQUE[:8] + (1.0,))      # DICOM slices stack along row x column: right-handed
    series = tmp_path / "dicom"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = src.GetDirection()
    for i in range(src.GetDepth()):
        sl = src[:, :, i]
        pos = src.TransformIndexToPhysicalPoint((0, 0, i))
        for tag, value in [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"), ("0020|0013", str(i + 1)),
                           ("0020|0032", "\\".join(map(str, pos))),
                           ("0020|0037", "\\".join(map(str, direction[0:9:3] + direction[1:9:3]))),
                           ("0028|0030", "0.8\\0.7"), ("0018|0050", "2.5"),
                           ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.2.{i + 1}")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"slice{i:03d}.dcm"))
        writer.Execute(sl)
    array, geometry = read_image(series)
    assert array.shape == (1, 6, 20, 24)
    np.testing.assert_array_equal(array[0], sitk.GetArrayFromImage(src))
    np.testing.assert_allclose(geometry.spacing, src.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(geometry.origin, src.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(geometry.direction, src.GetDirection(), atol=1e-5)


def test_multichannel_4d_and_vector(tmp_path):
    arr = np.random.default_rng(1).normal(size=(3, 5, 6, 7)).astype(np.float32)
    img4 = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in arr])
    sitk.WriteImage(img4, str(tmp_path / "four.nii.gz"))
    array, geometry = read_image(tmp_path / "four.nii.gz")
    assert array.shape == (3, 5, 6, 7) and geometry.size == (7, 6, 5)
    np.testing.assert_array_equal(array, arr)
    vec = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.nrrd"))
    np.testing.assert_array_equal(read_image(tmp_path / "vec.nrrd")[0], arr)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.nii.gz: no such file"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_text("not an image")
    with pytest.raises(InputError, match="junk.nii.gz: cannot read"):
        read_image(tmp_path / "junk.nii.gz")
    sitk.WriteImage(sitk.Image([30, 40], sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="flat.nrrd: a 2D image"):
        read_image(tmp_path / "flat.nrrd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path / "empty")
    nan = sitk.GetImageFromArray(np.full((4, 5, 6), np.nan, np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="NaN"):
        read_image(tmp_path / "nan.nrrd")


def test_output_names(tmp_path):
    assert output_format("a/b.seg.nrrd") == ".seg.nrrd"
    assert output_format("b.NII.GZ") == ".nii.gz"
    assert sidecar_path("x/case1.seg.nrrd") == Path("x/case1.json")
    assert sidecar_path("case1.nii.gz") == Path("case1.json")
    with pytest.raises(InputError, match="unknown output format"):
        output_format("seg.png")
    # the format a name asks for is the format written: each file's own bytes (the formats' magic numbers; a
    # NIfTI-1 header is 348 bytes ending in "n+1"), then its voxels read back with SimpleITK
    labels = (np.arange(3 * 4 * 5) % 3).astype(np.uint8).reshape(3, 4, 5)
    geometry = Geometry((5, 4, 3), (0.5, 1.0, 2.0), (1.0, 2.0, 3.0), OBLIQUE)
    table = [{"value": v, "name": f"s{v}", "color": [9, 9, 9], "terminology": None} for v in (1, 2)]
    for name, is_format in (("b.NII.GZ", lambda b: b[:2] == b"\x1f\x8b" and gzip.decompress(b)[344:348] == b"n+1\0"),
                            ("c.nii", lambda b: b[344:348] == b"n+1\0"),
                            ("x.seg.nrrd", lambda b: b.startswith(b"NRRD000") and b"Segment1_Name:=s2" in b),
                            ("d.nrrd", lambda b: b.startswith(b"NRRD000") and b"Segment" not in b),
                            ("e.mha", lambda b: b.startswith(b"ObjectType = Image"))):
        out = write_labels(labels, geometry, tmp_path / name, table)
        assert out == tmp_path / name and is_format(out.read_bytes()), name
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), labels)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "out.nii.gz") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        write_labels(np.zeros((2, 2, 2), np.uint8), Geometry((3, 3, 3), (1, 1, 1), (0, 0, 0), OBLIQUE),
                     tmp_path / "bad.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_physical_box_to_voxels_oblique():
    img = _image()
    geometry = Geometry(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    a = img.TransformIndexToPhysicalPoint((3, 4, 2))
    b = img.TransformIndexToPhysicalPoint((10, 9, 7))
    box = geometry.physical_box_to_voxels((*a, *b))
    z0, y0, x0, z1, y1, x1 = box
    # every voxel whose centre lies in the axis-aligned physical box is inside the voxel box
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    for idx in np.ndindex(*img.GetSize()):
        p = np.array(img.TransformIndexToPhysicalPoint(tuple(map(int, idx))))
        if np.all(p >= lo - 1e-6) and np.all(p <= hi + 1e-6):
            assert x0 <= idx[0] < x1 and y0 <= idx[1] < y1 and z0 <= idx[2] < z1
    assert (z0, z1) == (2, 8)
    with pytest.raises(InputError, match="outside"):
        geometry.physical_box_to_voxels((1e4, 1e4, 1e4, 1e4 + 5, 1e4 + 5, 1e4 + 5))
