"""Reading refuses what it cannot read exactly (every format, DICOM series as they come), and keeps reading
legitimate inputs exactly as ITK does."""
from __future__ import annotations

import gzip
import logging
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_fixtures import AXIAL, expected_volume, write_series
from segbook.dicom import read_series
from segbook.errors import InputError
from segbook.io import read_image

DATA = Path(__file__).parent / "data"
REAL_DICOM = DATA / "dicom_ct_3slices"


def _volume(dtype=np.int16, shape=(12, 16, 20), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.integers(0 if dtype == np.uint8 else -1000, 250 if dtype == np.uint8 else 1000,
                                              size=shape).astype(dtype))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-100.5, 20.25, 33.0))
    return img


def _cut(path: Path, keep: float | int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return path


def _flip(path: Path, where: float) -> Path:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x55
    path.write_bytes(bytes(data))
    return path


def _patch(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    return path


def _nifti_pixdim(path: Path, axis: int, value: float) -> Path:
    data = bytearray(path.read_bytes())
    data[76 + 4 * axis: 80 + 4 * axis] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return path


def _write(img, path: Path, compress: bool) -> Path:
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


# ------------------------------------------------------------------------------------ damaged files
def _damaged(tmp: Path, kind: str) -> tuple[Path, str]:
    img = _volume()
    cases = {
        "nii.gz cut in half": lambda: (_cut(_write(img, tmp / "a.nii.gz", True), 0.5), "truncated"),
        "nii.gz without its last bytes": lambda: (_cut(_write(img, tmp / "a.nii.gz", True), -6), "truncated"),
        "nii.gz corrupt": lambda: (_flip(_write(img, tmp / "a.nii.gz", True), 0.6), "damaged compressed data"),
        "nii cut": lambda: (_cut(_write(img, tmp / "a.nii", False), 0.7), "truncated"),
        "nii zero spacing": lambda: (_nifti_pixdim(_write(img, tmp / "a.nii", False), 1, 0.0), "voxel size 0"),
        "nii.gz zero spacing": lambda: (_gz(_nifti_pixdim(_write(img, tmp / "a.nii", False), 3, 0.0)), "voxel size"),
        "nii negative spacing": lambda: (_nifti_pixdim(_write(img, tmp / "a.nii", False), 2, -0.8), "voxel size"),
        "nii NaN spacing": lambda: (_nifti_pixdim(_write(img, tmp / "a.nii", False), 1, float("nan")), "voxel size"),
        "nii inf spacing": lambda: (_nifti_pixdim(_write(img, tmp / "a.nii", False), 3, float("inf")), "voxel size"),
        "nhdr raw cut": lambda: (_detached(img, tmp, "a.nhdr", False, lambda p: _cut(p, 0.5)), "truncated"),
        "nhdr data missing": lambda: (_detached(img, tmp, "a.nhdr", False, Path.unlink), "a.raw is missing"),
        "nhdr gzip cut": lambda: (_detached(img, tmp, "a.nhdr", True, lambda p: _cut(p, 0.5)), "cannot read"),
        "nrrd cut": lambda: (_cut(_write(img, tmp / "a.nrrd", False), 0.8), "truncated"),
        "nrrd gzip corrupt": lambda: (_flip(_write(img, tmp / "a.nrrd", True), 0.7), "cannot read"),
        "nrrd zero spacing": lambda: (_patch(_write(img, tmp / "a.nrrd", False), b"(0.69999999999999996,0,0)",
                                             b"(0,0,0)"), "spacing"),
        "mha cut": lambda: (_cut(_write(img, tmp / "a.mha", False), 0.6), "truncated"),
        "mha zlib cut": lambda: (_cut(_write(img, tmp / "a.mha", True), 0.6), "truncated"),
        "mha zlib corrupt": lambda: (_flip(_write(img, tmp / "a.mha", True), 0.6), "damaged compressed data"),
        "mhd raw cut": lambda: (_detached(img, tmp, "a.mhd", False, lambda p: _cut(p, 0.5)), "truncated"),
        "mhd zraw corrupt": lambda: (_detached(img, tmp, "a.mhd", True, lambda p: _flip(p, 0.5)),
                                     "damaged compressed data"),
        "mha zero spacing": lambda: (_patch(_write(img, tmp / "a.mha", False), b"ElementSpacing = 0.69999999999999996",
                                            b"ElementSpacing = 0.0"), "spacing (0.0"),
        "mha NaN spacing": lambda: (_patch(_write(img, tmp / "a.mha", False), b"ElementSpacing = 0.69999999999999996",
                                           b"ElementSpacing = nan"), "spacing"),
        "mha NaN direction": lambda: (_patch(_write(img, tmp / "a.mha", False), b"TransformMatrix = 1 0 0",
                                             b"TransformMatrix = nan 0 0"), "direction"),
        "mha singular direction": lambda: (_patch(_write(img, tmp / "a.mha", False), b"TransformMatrix = 1 0 0 0 1 0",
                                                  b"TransformMatrix = 1 0 0 1 0 0"), "direction"),
        "mha negative size": lambda: (_patch(_write(img, tmp / "a.mha", False), b"DimSize = 20 16 12",
                                             b"DimSize = 20 -16 12"), "damaged header (DimSize '20 -16 12')"),
        "nrrd zero size": lambda: (_patch(_write(img, tmp / "a.nrrd", False), b"sizes: 20 16 12",
                                          b"sizes: 20 16 0"), "damaged header (sizes '20 16 0')"),
    }
    return cases[kind]()


def _gz(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


def _detached(img, tmp: Path, header: str, compress: bool, damage) -> Path:
    """Write `header` with its data in a separate file, damage that file; returns the header's path."""
    sitk.WriteImage(img, str(tmp / header), useCompression=compress)
    damage(next(p for p in tmp.iterdir() if p.name != header))
    return tmp / header


KINDS = ["nii.gz cut in half", "nii.gz without its last bytes", "nii.gz corrupt", "nii cut", "nii zero spacing",
         "nii.gz zero spacing", "nii negative spacing", "nii NaN spacing", "nii inf spacing", "nhdr raw cut",
         "nhdr data missing", "nhdr gzip cut", "nrrd cut", "nrrd gzip corrupt", "nrrd zero spacing", "mha cut",
         "mha zlib cut", "mha zlib corrupt", "mhd raw cut", "mhd zraw corrupt", "mha zero spacing",
         "mha NaN spacing", "mha NaN direction", "mha singular direction", "mha negative size", "nrrd zero size"]


def _nifti_field(path: Path, offset: int, fmt: str, value) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


# (header byte offset, struct format, value) of NIfTI-1 fields a damaged header gets wrong
HEADER_DAMAGE = {"negative size": (42, "<h", -5, "size -5 along axis 1"),
                 "zero slices": (46, "<h", 0, "size 0 along axis 3"),
                 "dim[0] = 9": (40, "<h", 9, "dim[0] = 9"),
                 "bitpix 0": (72, "<h", 0, "bitpix 0")}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", HEADER_DAMAGE)
def test_a_damaged_nifti_header_is_one_line_and_nothing_on_stderr(tmp_path, capfd, kind, gz):
    """ITK's NIfTI library prints its own "** ERROR" to stderr before failing: refused before it reads."""
    offset, fmt, value, message = HEADER_DAMAGE[kind]
    path = _nifti_field(_write(_volume(), tmp_path / "a.nii", False), offset, fmt, value)
    if gz:
        path = _gz(path)
    capfd.readouterr()
    with pytest.raises(InputError, match=f"damaged header .*{re.escape(message)}") as err:
        read_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert capfd.readouterr().err == ""


def test_a_file_that_is_no_image_says_what_itk_said(tmp_path):
    path = tmp_path / "scan.nii"
    path.write_bytes(b"\0" * 400)
    with pytest.raises(InputError, match="cannot read as an image .*Unable to determine ImageIO reader"):
        read_image(path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_file_is_refused_naming_it(tmp_path, kind):
    path, message = _damaged(tmp_path, kind)
    with pytest.raises(InputError) as err:
        read_image(path)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert "a." in text                     # names the file (the header, or its data file)


def test_truncation_says_what_to_do(tmp_path):
    path, _ = _damaged(tmp_path, "nii.gz cut in half")
    with pytest.raises(InputError, match=r"a\.nii\.gz: truncated .*re-download or re-export"):
        read_image(path)


# ---------------------------------------------------------------------------------- legitimate files
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_nifti_gz_reads_exactly_as_itk(tmp_path, dtype):
    img = _volume(dtype)
    path = _write(img, tmp_path / "v.nii.gz", True)
    array, geometry = read_image(path)
    ref = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(array[0], sitk.GetArrayFromImage(ref).astype(np.float32))
    assert geometry.spacing == ref.GetSpacing() and geometry.origin == ref.GetOrigin()
    assert geometry.direction == ref.GetDirection()


@pytest.mark.parametrize("slope, inter", [(0.37, -1024.3), (1.0, -1024.0), (2.0, 0.0), (0.0, 5.0)])
def test_nifti_scaling_as_itk(tmp_path, slope, inter):
    plain = _write(_volume(), tmp_path / "v.nii", False)
    data = bytearray(plain.read_bytes())
    data[112:120] = struct.pack("<ff", slope, inter)
    plain.write_bytes(bytes(data))
    for path in (plain, _gz(plain)):
        array, _ = read_image(path)
        np.testing.assert_array_equal(array[0], sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32))


def test_gzip_variants_that_are_fine(tmp_path):
    """Several gzip members (pigz, concatenation), an uncompressed file named .nii.gz, big-endian NIfTI."""
    img = _volume()
    plain = _write(img, tmp_path / "v.nii", False).read_bytes()
    cut = len(plain) // 3
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(plain[:cut]) + gzip.compress(plain[cut:]))
    (tmp_path / "stored.nii.gz").write_bytes(plain)
    expected = sitk.GetArrayFromImage(img).astype(np.float32)
    for name in ("multi.nii.gz", "stored.nii.gz"):
        np.testing.assert_array_equal(read_image(tmp_path / name)[0][0], expected)
    import nibabel  # test dependency: writes big-endian NIfTI, as some scanners' converters do
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    big = nibabel.Nifti1Image(np.arange(6 * 7 * 8, dtype=">i2").reshape(8, 7, 6), affine)
    nibabel.save(big, str(tmp_path / "big.nii.gz"))
    array, geometry = read_image(tmp_path / "big.nii.gz")
    np.testing.assert_array_equal(array[0], sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "big.nii.gz"))))
    np.testing.assert_allclose(geometry.spacing, (0.7, 0.8, 2.5), rtol=1e-6)


@pytest.mark.parametrize("name", ["a.nhdr", "b.nhdr", "a.mhd", "b.mhd", "c.mha", "d.nrrd"])
def test_detached_and_compressed_headers_that_are_fine(tmp_path, name):
    img = _volume()
    compress = name.startswith(("b", "c", "d"))
    sitk.WriteImage(img, str(tmp_path / name), useCompression=compress)
    np.testing.assert_array_equal(read_image(tmp_path / name)[0][0], sitk.GetArrayFromImage(img))


def test_paths_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "Dossier patient été" / "série 1"
    folder.mkdir(parents=True)
    img = _volume()
    for name in ("scan 1 ü.nii.gz", "scan 2 日本.nrrd", "scan 3 ø.mha"):
        sitk.WriteImage(img, str(folder / name), useCompression=True)
        np.testing.assert_array_equal(read_image(folder / name)[0][0], sitk.GetArrayFromImage(img))
    files = write_series(folder / "dicom ä")
    np.testing.assert_array_equal(read_image(folder / "dicom ä")[0][0], expected_volume(files))


# ------------------------------------------------------------------------------------------- DICOM
def test_dicom_series_in_slice_order_with_its_files_and_uid(tmp_path):
    positions = [(-10.0, 5.0, 30.0 + 2.5 * k) for k in range(6)]
    files = write_series(tmp_path / "s", positions[::-1], uid="1.2.3.4.5", rescale=(2, -1024))
    array, (spacing, origin, direction), series = read_series(tmp_path / "s")
    assert series.uid == "1.2.3.4.5" and series.files == files[::-1]    # z ascending: the array's order
    assert series.instance_uids == [f"1.2.3.4.5.{k}" for k in range(6, 0, -1)]
    assert series.study_uid == "1.2.826.0.1.3680043.2.1125.1"
    np.testing.assert_array_equal(array[0], expected_volume(files[::-1]))
    np.testing.assert_allclose(spacing, (0.7, 0.8, 2.5), rtol=1e-6)
    np.testing.assert_allclose(origin, positions[0], atol=1e-4)
    assert sitk.ReadImage(str(files[0])).GetMetaData("0028|1053").strip() == "2"
    # rescale applied: the values read are the ones written (GDCM stores (v - intercept) / slope)
    assert array.min() < -500 and array.max() > 500


def test_several_series_are_listed_and_one_is_chosen(tmp_path):
    write_series(tmp_path, uid="1.2.3.100", description="Abdomen 3mm", name="a")
    files = write_series(tmp_path, [(0.0, 0.0, 2.0 * k) for k in range(4)], uid="1.2.3.200",
                         description="Scout", size=(16, 12), name="b")
    with pytest.raises(InputError) as err:
        read_image(tmp_path)
    text = str(err.value)
    assert "2 DICOM series" in text and "--series" in text and "\n" not in text
    assert "1.2.3.100 ('Abdomen 3mm', 6 files, 24x20)" in text and "1.2.3.200 ('Scout', 4 files, 16x12)" in text
    array, geometry = read_image(tmp_path, series="1.2.3.200")
    assert array.shape == (1, 4, 12, 16)
    np.testing.assert_array_equal(array[0], expected_volume(files))
    with pytest.raises(InputError, match="no DICOM series with UID 9.9.9; it holds: 1.2.3.100"):
        read_image(tmp_path, series="9.9.9")


def _positions(zs):
    return [(-10.0, 5.0, float(z)) for z in zs]


@pytest.mark.parametrize("kind, message", [
    ("missing", r"missing slice\(s\) between \(-10.00, 5.00, 35.00\) and \(-10.00, 5.00, 40.00\)"),
    ("duplicate", r"two slices at the same position \(-10.00, 5.00, 32.50\)"),
    ("unequal", r"unequal slice spacing between \(-10.00, 5.00, 32.50\) and \(-10.00, 5.00, 36.00\)"),
    ("orientation", "different orientations"),
    ("size", "different sizes: 24x24"),
    ("off line", "do not lie on one line"),
])
def test_slices_that_do_not_form_one_grid_are_refused(tmp_path, kind, message):
    zs = [30.0, 32.5, 35.0, 37.5, 40.0]
    kwargs = {}
    positions = _positions(zs)
    if kind == "missing":
        positions = _positions([30.0, 32.5, 35.0, 40.0, 42.5])
    elif kind == "duplicate":
        positions = _positions([30.0, 32.5, 32.5, 35.0, 37.5])
    elif kind == "unequal":
        positions = _positions([30.0, 32.5, 36.0, 38.5, 41.0])
    elif kind == "orientation":
        tilted = (1.0, 0.0, 0.0, 0.0, 0.9848078, 0.1736482)
        kwargs["orientations"] = [AXIAL, AXIAL, tilted, AXIAL, AXIAL]
    elif kind == "size":
        kwargs["sizes"] = [(24, 20), (24, 20), (24, 20), (24, 24), (24, 20)]
    elif kind == "off line":
        positions[3] = (-7.0, 5.0, 37.5)
    write_series(tmp_path / "s", positions, **kwargs)
    with pytest.raises(InputError, match=message) as err:
        read_image(tmp_path / "s")
    assert str(tmp_path / "s") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "last byte lost", "cut in the pixel data header", "garbage .dcm",
                                    "empty .dcm"])
def test_a_damaged_slice_is_named(tmp_path, damage):
    """Every version of SimpleITK: its GDCM before 2.5 reads a cut slice file as if whole (zeros for the rest)."""
    files = write_series(tmp_path / "s")
    bad = files[3]
    pixels = 24 * 20 * 2
    if damage == "truncated":
        _cut(bad, -200)
    elif damage == "last byte lost":
        _cut(bad, -1)
    elif damage == "cut in the pixel data header":
        _cut(bad, len(bad.read_bytes()) - pixels - 6)
    elif damage == "garbage .dcm":
        bad.write_bytes(b"\x00garbage" * 100)
    else:
        bad.write_bytes(b"")
    with pytest.raises(InputError, match=f"{bad.name} cannot be read .*re-export the series"):
        read_image(tmp_path / "s")


def test_other_files_beside_a_series_are_ignored(tmp_path):
    files = write_series(tmp_path / "s")
    (tmp_path / "s" / "README.txt").write_text("exported from PACS")
    (tmp_path / "s" / "DICOMDIR").write_bytes(b"\x00" * 300)
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\x00" * 30)
    np.testing.assert_array_equal(read_image(tmp_path / "s")[0][0], expected_volume(files))


def test_gantry_tilt_is_read_on_the_acquired_slices_and_said(tmp_path, caplog):
    # 15 degree tilt: each slice 2.5 mm further along z and shifted 0.67 mm along y within its plane
    step, shift = 2.5, 2.5 * np.tan(np.radians(15))
    positions = [(-10.0, 5.0 + shift * k, 30.0 + step * k) for k in range(5)]
    files = write_series(tmp_path / "s", positions)
    with caplog.at_level(logging.WARNING, logger="segbook.dicom"):
        array, geometry = read_image(tmp_path / "s")
    assert "gantry tilt of 15.00 degrees" in caplog.text
    np.testing.assert_array_equal(array[0], expected_volume(files))
    # the grid ITK's series reader gives (Slicer's volume loading the same): the label map overlays it
    itk = sitk.ImageSeriesReader()
    itk.SetFileNames([str(f) for f in files])
    ref = itk.Execute()
    np.testing.assert_allclose(geometry.spacing, ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(geometry.spacing, (0.7, 0.8, step / np.cos(np.radians(15))), rtol=1e-4)
    np.testing.assert_allclose(geometry.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(geometry.direction, ref.GetDirection(), atol=1e-6)


def test_multi_frame_file(tmp_path):
    img = sitk.Cast(_volume(np.uint8, shape=(5, 20, 24)), sitk.sitkUInt16)
    (tmp_path / "mf").mkdir()
    sitk.WriteImage(img, str(tmp_path / "mf" / "volume.dcm"))
    array, geometry = read_image(tmp_path / "mf")
    np.testing.assert_array_equal(array[0], sitk.GetArrayFromImage(img))
    np.testing.assert_allclose(geometry.spacing, img.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(geometry.origin, img.GetOrigin(), atol=1e-4)


def test_real_jpeg2000_series():
    """Three slices of a real scanner series (JPEG 2000, HU rescale, empty Series UID after anonymisation)."""
    array, geometry = read_image(REAL_DICOM)
    assert array.shape == (1, 3, 512, 512)
    assert -1100 < array.min() < -900 and array.max() > 500             # HU: rescale intercept -1024 applied
    np.testing.assert_allclose(geometry.spacing, (0.9765625, 0.9765625, 2.0), rtol=1e-5)


@pytest.mark.parametrize("keep", [0.5, 0.9, -8, -1])
def test_a_cut_compressed_slice_is_named(tmp_path, keep):
    """Encapsulated (JPEG 2000) pixel data: its fragments must run to the sequence delimiter; the last 8 bytes
    are that delimiter, so even -1 loses it."""
    shutil.copytree(REAL_DICOM, tmp_path / "s")
    victim = sorted((tmp_path / "s").iterdir())[1]
    _cut(victim, keep)
    with pytest.raises(InputError, match=f"{victim.name} cannot be read"):
        read_image(tmp_path / "s")


def _element(tag, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (DICOM PS3.5 7.1.2)."""
    head = struct.pack("<HH", *tag) + vr
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def test_pixel_data_check_reads_each_syntax_and_ignores_look_alike_bytes(tmp_path):
    """The check finds the Pixel Data element in implicit and explicit little endian, whole files pass, and
    the element's bytes inside an earlier value (claiming more bytes than the file has) do not fail a whole
    file, nor hide the cut of a damaged one."""
    from segbook.dicom import _pixel_data_complete
    img = sitk.Cast(_volume(np.uint8, shape=(1, 20, 24)), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    whole = 24 * 20 * 2
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        path = tmp_path / f"{syntax}.dcm"
        img.SetMetaData("0002|0010", syntax)
        writer.SetFileName(str(path))
        writer.Execute(img)
        assert _pixel_data_complete(path, whole), syntax
        assert not _pixel_data_complete(path, whole + 2), syntax     # a header promising more than the file has
        _cut(path, -2)
        assert not _pixel_data_complete(path, whole), syntax
    fake = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", 10 ** 6)
    pixels = bytes(range(256)) * 4
    data = (b"\0" * 128 + b"DICM" + _element((2, 0x10), b"UI", b"1.2.840.10008.1.2.1\0")
            + _element((8, 0x103E), b"LO", fake) + _element((0x7FE0, 0x10), b"OW", pixels))
    path = tmp_path / "look-alike.dcm"
    path.write_bytes(data)
    assert _pixel_data_complete(path, len(pixels))
    path.write_bytes(data[:-1])
    assert not _pixel_data_complete(path, len(pixels))
