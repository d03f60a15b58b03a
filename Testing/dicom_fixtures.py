"""Synthetic DICOM series written with SimpleITK's GDCM writer, for the reading tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

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
