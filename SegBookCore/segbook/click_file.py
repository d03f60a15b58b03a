"""Clicks on image files: an InteractiveSession kept per image, each answer written as a label map.

The face of `segbook.interactive` that the CLI and the worker use: prompts in LPS mm (as `--roi`), the image
read once, the result written with the input's geometry and a sidecar, as `segbook predict` writes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .inference import Predictor
from .interactive import InteractiveSession

__all__ = ["FileSession", "physical_to_voxel"]


def physical_to_voxel(geometry, point_lps) -> tuple[float, float, float]:
    """An LPS mm point -> continuous (z, y, x) voxel index of `geometry` (oblique directions included)."""
    import SimpleITK as sitk
    from .io import lps_numbers
    values = lps_numbers(point_lps, 3, "a point needs three finite numbers X,Y,Z (LPS mm)")
    ref = geometry.apply_to(sitk.Image([1, 1, 1], sitk.sitkUInt8))
    x, y, z = ref.TransformPhysicalPointToContinuousIndex(values)
    return z, y, x


class FileSession:
    """An InteractiveSession on an image file or DICOM folder, writing each answer as a label map file.

    The worker keeps one per image: `matches` says whether a request is for the same image (path, series and
    modification time) and Predictor, so that the next click reuses its preprocessing and tiles."""

    def __init__(self, predictor: Predictor, input_path, series=None):
        from .io import read_image
        self.predictor, self.input, self.series = predictor, str(input_path), series
        self._stamp, self._tta = _stamp(input_path), predictor.tta     # kept tiles were computed with this TTA
        self.image, self.geometry = read_image(input_path, series=series)
        try:
            self.session = InteractiveSession(predictor, self.image, self.geometry.spacing_zyx)
        except InputError as e:
            raise InputError(f"{input_path}: {e}") from None

    def matches(self, predictor: Predictor, input_path, series=None) -> bool:
        return (predictor is self.predictor and str(input_path) == self.input and series == self.series
                and _stamp(input_path) == self._stamp and predictor.tta == self._tta)

    def segment(self, output_path, *, points_lps=(), negative_points_lps=(), box_lps=None, previous=None,
                class_name=None) -> dict:
        """One structure into `output_path` (its label value inside, 0 elsewhere, the input's geometry) and a
        sidecar JSON beside it; returns the sidecar. previous: a label map file on the input's grid (its
        non-zero voxels). Points and box in LPS mm, as `--roi`."""
        from .io import atomic_path, check_writable, read_labels, sidecar_path, write_labels
        from .labels import class_table
        t0 = time.perf_counter()
        check_writable(output_path)
        g = self.geometry
        points, negative = (_points(g, p, what) for p, what in ((points_lps, "points"),
                                                                 (negative_points_lps, "negative points")))
        box = list(g.physical_box_to_voxels(box_lps)) if box_lps is not None else None
        prev = None
        if previous:
            labels, pg = read_labels(previous)
            if pg.size != g.size or not np.allclose(pg.origin, g.origin, atol=1e-3) or \
                    not np.allclose(pg.spacing, g.spacing, rtol=1e-4):
                raise InputError(f"{previous}: the previous segmentation is not on the grid of {self.input}")
            prev = labels != 0
        try:
            mask, info = self.session.segment(points, negative, box, prev, class_name)
        except InputError as e:
            raise InputError(f"{self.input}: {e}") from None
        config = self.predictor.config
        out = np.zeros(g.shape_zyx, dtype=np.uint8 if len(config.class_names) <= 256 else np.uint16)
        out[mask] = info["value"]
        table = [c for c in class_table(config.class_names, config.colors) if c["value"] == info["value"]]
        sidecar = {"input": self.input, "output": str(output_path), "model": config.name,
                   "checkpoint": self.predictor.checkpoint, "labels": table,
                   "prompts": {"points_lps": [list(map(float, p)) for p in points_lps],
                               "negative_points_lps": [list(map(float, p)) for p in negative_points_lps],
                               "box_lps": [float(v) for v in box_lps] if box_lps is not None else None,
                               "previous": str(previous) if previous else None, "class": class_name},
                   "result": info,
                   "settings": {"device": str(self.predictor.device), "backend": self.predictor.runner.name,
                                "precision": self.predictor.runner.precision, "tta": self.predictor.tta},
                   "geometry": {"size": list(g.size), "spacing": list(g.spacing)}}
        sidecar["elapsed_s"] = round(time.perf_counter() - t0, 3)
        # the label map is complete before the sidecar is renamed into place: a sidecar means a finished file
        with atomic_path(sidecar_path(output_path)) as tmp:
            tmp.write_text(json.dumps(sidecar, indent=1))
            write_labels(out, g, output_path, table)
        return sidecar


def _points(geometry, points_lps, what: str) -> list:
    if isinstance(points_lps, (str, bytes, dict)) or not hasattr(points_lps, "__iter__"):
        raise InputError(f"{what}: a list of points [X, Y, Z] (LPS mm) is needed, got {points_lps!r}")
    return [physical_to_voxel(geometry, p) for p in points_lps]


def _stamp(path) -> tuple:
    p = Path(path)
    return (p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else ()
