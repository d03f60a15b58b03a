"""DICOM series for the tests: a real CT written as a series with valid, generated UIDs (what a scanner's export
looks like to SegBook) or anonymised down to empty UIDs (as ../shared/data/ct/abdomen_ct_dicom is), for the
DICOM SEG tests; and synthetic series written with SimpleITK's GDCM writer, for the reading tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_ct_series(image_path, folder, anonymised: bool = False) -> list:
    """One CT Image Storage file per z-slice of `image_path` (int16 HU), in shuffled file order so that
    the reader must sort by position. Returns the SOP Instance UIDs in slice order."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(image_path))
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, origin = image.GetSpacing(), np.array(image.GetOrigin())
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    uids = []
    order = np.random.default_rng(0).permutation(array.shape[0])
    for k in range(array.shape[0]):
        sop = generate_uid()
        uids.append(sop)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Abdomen", "SEGBOOK01", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
        ds.Manufacturer = "SegBook test"
        ds.PositionReferenceIndicator, ds.KVP, ds.AcquisitionNumber = "", "120", 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [float(v) for v in origin + k * spacing[2] * direction[:, 2]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = array.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(array[k]).tobytes()
        if anonymised:
            for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "PatientID"):
                setattr(ds, key, "")
        ds.save_as(str(folder / f"IM{order[k]:04d}.dcm"), enforce_file_format=True) \
            if int(pydicom.__version__.split(".")[0]) >= 3 else ds.save_as(str(folder / f"IM{order[k]:04d}.dcm"),
                                                                            write_like_original=False)
    return uids


def tool(name: str) -> str:
    """The path of a checker the DICOM SEG tests run (they carry the `dicom` marker, so it is there)."""
    from skip_policy import find_tool
    found = find_tool(name)
    assert found is not None, f"{name} not found: `make test` installs it"
    return found


def run_tool(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


STUDY = "1.2.826.0.1.3680043.2.1125.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_series(folder: Path, positions=None, *, uid=STUDY + ".2", description="CT test", size=(24, 20),
                 spacing=(0.7, 0.8), orientation=AXIAL, rescale=None, seed=0, name="slice", thickness=2.5,
                 orientations=None, sizes=None) -> list[Path]:
    """One slice file per position (x, y, z in LPS mm); returns the files in position order.
    `rescale` = (slope, intercept) stores int16 values with those rescale tags; `orientations`/`sizes` give
    per-slice values (for mixed series)."""
    folder.mkdir(parents=True, exist_ok=True)
    if positions is None:
        positions = [(-10.0, 5.0, 30.0 + 2.5 * k) for k in range(6)]
    rng = np.random.default_rng(seed)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k, pos in enumerate(positions):
        cols, rows = (sizes[k] if sizes else size)
        values = rng.integers(-1000, 1000, size=(1, rows, cols)).astype(np.int16)
        sl = sitk.GetImageFromArray(values)
        iop = orientations[k] if orientations else orientation
        row, col = np.array(iop[:3]), np.array(iop[3:])
        sl.SetSpacing((spacing[0], spacing[1], thickness))
        sl.SetOrigin(tuple(float(v) for v in pos))
        sl.SetDirection(tuple(float(v) for v in np.column_stack([row, col, np.cross(row, col)]).ravel()))
        tags = {"0008|0060": "CT", "0020|000d": STUDY, "0020|000e": uid, "0008|103e": description,
                "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.4f}" for v in pos),
                "0020|0037": "\\".join(f"{v:.6f}" for v in iop),
                "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(thickness),
                "0008|0018": f"{uid}.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}
        if rescale:
            tags.update({"0028|1053": str(rescale[0]), "0028|1052": str(rescale[1])})
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        path = folder / f"{name}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files


def expected_volume(files) -> np.ndarray:
    """The stored values of the slices, stacked (z, y, x), as GDCM reads them (rescale applied)."""
    return np.concatenate([sitk.GetArrayFromImage(sitk.ReadImage(str(f), sitk.sitkFloat32)) for f in files])
