"""The training set of the Fine-tune panel: a persistent folder of cases collected from the scene.

The folder lives under the user's SegBook folder, so cases corrected over several Slicer sessions add up. Its
`dataset.json` is the case list `segbook finetune` reads (see `segbook.dataset`):

    {"name": ..., "class_names": ["background", "a", "b"], "channel_names": ["image"],
     "cases": [{"name": "case1", "image": "cases/case1_image.nrrd", "label": "cases/case1_label.nrrd",
                "classes_present": ["a", "b"], "missing_as_background": false}]}

Segment names define the classes: a name is a class, its index in `class_names` is the label value written
for it, for every case.

A case may be partly annotated ("only the slices I annotated"): the slices, in the view's orientation, that
hold any segment are its annotation (their unsegmented voxels are background) and every other voxel gets
the "ignore" value, nnU-Net v2's convention that `segbook finetune` follows (no loss, no metric there). With
a segment named "background" the annotation is exactly the painted voxels, so scribbles that do not fill a
structure work. The set then says `"ignore": len(class_names)`; when classes are appended later, the ignore
value moves up with them (those labels are rewritten). Such a case's entry records "annotated_slices",
"slices" and "orientation". A case that lacks one of the classes is refused unless the user says the missing
structure is truly absent there (then its voxels count as background).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import NodeIO

log = logging.getLogger(__name__)


class TrainingSetError(ValueError):
    """A case that cannot join the training set; one line saying what to fix."""


class _StoreLock:
    """Held while a Slicer window reads, changes and writes the training set, so that two windows adding
    cases to one folder lose none. The operating system's lock on an open file (flock, or a locked byte on
    Windows): released when its holder exits in any way, so a crashed Slicer never leaves it locked. The
    core's segbook.lockfile does the same; it is written out here because Slicer may run without the core."""

    def __init__(self, folder: Path, wait: float = 120.0):
        self.path, self.wait, self.fd = folder / ".dataset.lock", wait, None

    def _tryLock(self) -> bool:
        if os.name == "nt":
            import msvcrt
            try:
                msvcrt.locking(self.fd, msvcrt.LK_NBLCK, 1)
            except OSError:
                return False
            return True
        import fcntl
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.wait
        while not self._tryLock():
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise TrainingSetError(f"{self.path.parent}: another Slicer is still changing this training set; "
                                       f"try again when it is done")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        if os.name == "nt":
            import msvcrt
            os.lseek(self.fd, 0, os.SEEK_SET)
            msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
        os.close(self.fd)   # releases flock
        return False


def _safeName(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "case"


def _writeVerified(path: Path, write, verify) -> None:
    """write(tmp) to a fresh temporary name beside `path`, fsync, check verify(tmp), then rename onto `path`;
    on any failure the temporary file goes and TrainingSetError names `path` and the reason (a full disk...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)       # Windows flushes only a handle open for writing
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not verify(tmp):
            raise OSError(errno.EIO, "the file read back is incomplete")
        os.replace(tmp, path)
    except OSError as e:
        raise TrainingSetError(f"{path}: cannot write ({e.strerror or e}); the training set is unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _writeImage(image, path: Path) -> None:
    """A SimpleITK image to a compressed file, read back and compared before it replaces anything (ITK's
    writers can stop short on a full disk without raising)."""
    import SimpleITK as sitk

    def same(tmp) -> bool:
        try:
            back = sitk.ReadImage(str(tmp))
        except RuntimeError:
            return False
        return back.GetSize() == image.GetSize() and np.array_equal(sitk.GetArrayViewFromImage(back),
                                                                      sitk.GetArrayViewFromImage(image))
    _writeVerified(path, lambda tmp: sitk.WriteImage(image, str(tmp), True), same)


ORIENTATION_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}     # the RAS axis a view looks along


def sliceAxis(ijkToRas: np.ndarray, orientation: str) -> int:
    """The (z, y, x) array axis whose slices are the views of `orientation` (axial, coronal, sagittal):
    the voxel axis most aligned with the view's normal (S, A or R)."""
    normal = ORIENTATION_AXES.get(orientation.lower())
    if normal is None:
        raise TrainingSetError(f"unknown view orientation '{orientation}' (axial, coronal or sagittal)")
    directions = np.asarray(ijkToRas, float)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return 2 - int(np.argmax(np.abs(directions[normal])))       # i, j, k -> array axes 2, 1, 0


def sparseLabels(labels: np.ndarray, axis: int, ignore: int, background: Optional[np.ndarray] = None) -> tuple:
    """(labels with unannotated voxels set to `ignore`, number of annotated slices along `axis`).

    labels (z, y, x): class values, 0 where no class segment is. Without `background` the slices along `axis`
    that hold a class are annotated whole; with `background` (the voxels of an explicit background segment)
    only the painted voxels are."""
    if background is None:
        other = tuple(a for a in range(3) if a != axis)
        keep = labels.any(axis=other)
        annotated = np.expand_dims(keep, other)
    else:
        annotated = (labels > 0) | background
    out = np.where(annotated, labels, ignore).astype(np.uint8 if ignore < 256 else np.uint16)
    slices = np.broadcast_to(annotated, labels.shape).any(axis=tuple(a for a in range(3) if a != axis))
    return out, int(slices.sum())


def annotationNote(case: dict) -> str:
    """How much of a saved case is annotated, for the case list."""
    if "annotated_slices" not in case:
        return " [all slices]"
    what = "scribbles on" if case.get("scribbles") else "annotated:"
    return f" [{what} {case['annotated_slices']} of {case['slices']} {case.get('orientation', '')} slices]"


def _addDatasetFolder(trainingDirectory: str, folder: str, missingAsBackground: bool) -> list:
    return TrainingSet(trainingDirectory).addDatasetFolder(folder, missingAsBackground)


class TrainingSet:
    def __init__(self, trainingDirectory, python: Optional[str] = None):
        """`python`: the interpreter that has the core (default: Slicer's own, see ProcessRunner.pythonExecutable)."""
        self.python = python or None
        self.trainingDirectory = Path(trainingDirectory)

    # -- the training set -------------------------------------------------------------------------
    @property
    def datasetPath(self) -> Path:
        return self.trainingDirectory / "dataset.json"

    def dataset(self) -> dict:
        try:
            dataset = json.loads(self.datasetPath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"name": "segbook-training", "class_names": ["background"], "channel_names": ["image"],
                    "cases": []}
        except (OSError, ValueError) as e:
            raise TrainingSetError(f"{self.datasetPath}: cannot read ({getattr(e, 'strerror', None) or e}); "
                                   f"restore it or choose another training folder") from None
        if not isinstance(dataset, dict) or not isinstance(dataset.get("class_names"), list) \
                or not isinstance(dataset.get("cases"), list):
            raise TrainingSetError(f"{self.datasetPath}: not a SegBook training set (class_names and cases "
                                   f"lists expected); restore it or choose another training folder")
        return dataset

    def _save(self, dataset: dict) -> None:
        """Write dataset.json atomically: a temporary file of its own (two windows never share one), flushed
        to the disk and read back before it replaces the previous list, which a failed write leaves as it was."""
        data = json.dumps(dataset, indent=1).encode("utf-8")
        _writeVerified(self.datasetPath, lambda tmp: Path(tmp).write_bytes(data),
                       lambda tmp: Path(tmp).read_bytes() == data)

    def classNames(self) -> list:
        return list(self.dataset()["class_names"])

    def setClasses(self, names: list) -> None:
        """Fix the class order (e.g. the base model's) before the first case is added."""
        with _StoreLock(self.trainingDirectory):
            dataset = self.dataset()
            if dataset["cases"]:
                raise TrainingSetError("the class list is fixed once cases have been added")
            dataset["class_names"] = ["background"] + [n for n in names if n != "background"]
            self._save(dataset)

    def cases(self) -> list:
        return list(self.dataset()["cases"])

    def removeCase(self, name: str) -> None:
        with _StoreLock(self.trainingDirectory):
            self._removeCase(name)

    def _removeCase(self, name: str) -> None:
        dataset = self.dataset()
        removed = [c for c in dataset["cases"] if c["name"] == name]
        dataset["cases"] = [c for c in dataset["cases"] if c["name"] != name]
        if not any("annotated_slices" in c for c in dataset["cases"]):
            dataset.pop("ignore", None)          # no partly annotated case left
        self._save(dataset)     # first: a list that cannot be written still names only files that exist
        for case in removed:
            for key in ("image", "label"):
                (self.trainingDirectory / case[key]).unlink(missing_ok=True)

    def addCase(self, volumeNode, segmentationNode, name: Optional[str] = None,
                missingAsBackground: bool = False, allowNewClasses: bool = True,
                baseClasses: Optional[list] = None, onlyAnnotatedSlices: bool = False,
                orientation: str = "axial") -> dict:
        """Export a volume + segmentation pair into the training folder; returns the case entry.

        Label values follow the training set's class list (new segment names are appended when
        `allowNewClasses`). Adding a case under an existing name replaces it (a corrected case).
        `baseClasses` (the base model's foreground classes) orders the first case's classes when they are
        the same set, so that fine-tuning one's own model again keeps its output heads. Several Slicer windows
        may add cases to one training folder at once: each addition holds the folder's lock from reading the
        class list to writing the case list, so none is lost. `onlyAnnotatedSlices`: a partly annotated case,
        its slices taken in the view `orientation` (module docstring).
        """
        with _StoreLock(self.trainingDirectory):
            return self._addCase(volumeNode, segmentationNode, name, missingAsBackground, allowNewClasses,
                                 baseClasses, onlyAnnotatedSlices, orientation)

    def _addCase(self, volumeNode, segmentationNode, name, missingAsBackground, allowNewClasses,
                 baseClasses, onlyAnnotatedSlices=False, orientation="axial") -> dict:
        if volumeNode is None or segmentationNode is None:
            raise TrainingSetError("select both a volume and its segmentation")
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        if not names:
            raise TrainingSetError(f"segmentation '{segmentationNode.GetName()}' has no segments")
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise TrainingSetError(f"two segments are named '{duplicate}'; segment names define the classes")
        dataset = self.dataset()
        classes = list(dataset["class_names"])
        drawn = [n for n in names if n.lower() != "background"]   # an explicit background segment is no class
        if len(classes) == 1 and baseClasses and set(baseClasses) - {"background"} == set(drawn):
            classes += [c for c in baseClasses if c != "background"]
        new = [n for n in drawn if n not in classes]
        if new and len(classes) > 1 and not allowNewClasses:
            raise TrainingSetError(f"segment(s) {', '.join(new)} are not classes of this training set "
                                   f"({', '.join(classes[1:])}); rename them")
        classes += new
        stale = self._moveIgnore(dataset, classes)
        missing = [c for c in classes[1:] if c not in drawn]
        if missing and not missingAsBackground:
            raise TrainingSetError(f"this case has no segment for {', '.join(missing)}; add it, or confirm "
                                   f"that it is absent here so that it counts as background")
        nameToValue = {n: classes.index(n) for n in drawn}
        labels = NodeIO.segmentationToLabels(segmentationNode, volumeNode, nameToValue)
        if not labels.any():
            raise TrainingSetError(f"segmentation '{segmentationNode.GetName()}' is empty on this volume's grid")
        sparse = {}
        if onlyAnnotatedSlices:
            explicit = [n for n in names if n.lower() == "background"]
            background = NodeIO.segmentationToLabels(segmentationNode, volumeNode, {explicit[0]: 1}) > 0 \
                if explicit else None
            axis = sliceAxis(NodeIO.ijkToRasArray(volumeNode), orientation)
            labels, count = sparseLabels(labels, axis, len(classes), background)
            sparse = {"annotated_slices": count, "slices": int(labels.shape[axis]),
                      "orientation": orientation.lower(), "scribbles": background is not None}
            dataset["ignore"] = len(classes)

        caseName = _safeName(name or volumeNode.GetName())
        imageRel, labelRel = f"cases/{caseName}_image.nrrd", f"cases/{caseName}_label.nrrd"
        import SimpleITK as sitk
        image = NodeIO.volumeToImage(volumeNode)
        labelImage = sitk.GetImageFromArray(np.ascontiguousarray(labels))
        labelImage.CopyInformation(image)
        _writeImage(image, self.trainingDirectory / imageRel)
        _writeImage(labelImage, self.trainingDirectory / labelRel)
        entry = {"name": caseName, "image": imageRel, "label": labelRel, "classes_present": drawn,
                 "missing_as_background": bool(missing), **sparse}
        dataset["class_names"] = classes
        dataset["cases"] = [c for c in dataset["cases"] if c["name"] != caseName] + [entry]
        self._save(dataset)
        self._removeStale(dataset, stale)
        log.info("case %s added (%s)", caseName, ", ".join(f"{n}={v}" for n, v in nameToValue.items()))
        return entry

    def addDatasetFolder(self, folder, missingAsBackground: bool = False) -> list:
        """Copy the cases of an nnU-Net/Decathlon raw folder or case list into the training set.

        Label values are rewritten into this set's class order, by class name. Runs in the engine's
        interpreter when that is not Slicer's own (reading the folder needs the core).
        """
        if self.python:
            from .ProcessRunner import callInCore
            return callInCore(self.python, f"{__name__}:_addDatasetFolder", str(self.trainingDirectory),
                              str(folder), bool(missingAsBackground))
        with _StoreLock(self.trainingDirectory):
            return self._addDatasetFolder(folder, missingAsBackground)

    def _addDatasetFolder(self, folder, missingAsBackground: bool) -> list:
        import SimpleITK as sitk
        from segbook.dataset import read_dataset
        source = read_dataset(folder)
        dataset = self.dataset()
        classes = list(dataset["class_names"])
        classes += [n for n in source.class_names[1:] if n not in classes]
        stale = self._moveIgnore(dataset, classes)
        missing = [c for c in classes[1:] if c not in source.class_names]
        if missing and not missingAsBackground:
            raise TrainingSetError(f"{folder}: has no class {', '.join(missing)}; confirm that it counts "
                                   f"as background there")
        remap = [classes.index(n) if n in classes else 0 for n in source.class_names]
        if source.ignore_label is not None:      # its unannotated voxels stay unannotated here
            remap.append(len(classes))
            dataset["ignore"] = len(classes)
        remap = np.array(remap, dtype=np.int32)
        added = []
        for case in source.cases:
            if len(case.images) != 1:
                raise TrainingSetError(f"{folder}: case {case.name} has {len(case.images)} channels; "
                                       f"the panel trains single-channel models")
            caseName = _safeName(case.name)
            imageRel, labelRel = f"cases/{caseName}_image.nrrd", f"cases/{caseName}_label.nrrd"
            _writeImage(sitk.ReadImage(str(case.images[0])), self.trainingDirectory / imageRel)
            label = sitk.ReadImage(str(case.label))
            values = sitk.GetArrayFromImage(label).astype(np.int32)
            if values.min() < 0 or values.max() >= len(remap):
                raise TrainingSetError(f"{case.label}: label values outside 0..{len(remap) - 1}")
            out = sitk.GetImageFromArray(remap[values].astype(np.uint8))
            out.CopyInformation(label)
            _writeImage(out, self.trainingDirectory / labelRel)
            entry = {"name": caseName, "image": imageRel, "label": labelRel,
                     "classes_present": list(source.class_names[1:]), "missing_as_background": bool(missing)}
            if source.ignore_label is not None:
                annotated = (values != source.ignore_label).any(axis=(1, 2))
                entry.update(annotated_slices=int(annotated.sum()), slices=int(values.shape[0]), orientation="k")
            added.append(entry)
        names = {c["name"] for c in added}
        dataset["class_names"] = classes
        dataset["cases"] = [c for c in dataset["cases"] if c["name"] not in names] + added
        self._save(dataset)
        self._removeStale(dataset, stale)
        return added

    def _moveIgnore(self, dataset: dict, classes: list) -> list:
        """Classes appended to a set holding partly annotated cases: the ignore value moves up to stay one
        above the last class. Those labels are rewritten under new names, which the list takes when it is
        saved (a failure before leaves the old, consistent set); returns the old files, to remove after."""
        old, new = dataset.get("ignore"), len(classes)
        if old is None or old == new:
            return []
        import SimpleITK as sitk
        stale = []
        for case in dataset["cases"]:
            if "annotated_slices" not in case:
                continue
            path = self.trainingDirectory / case["label"]
            image = sitk.ReadImage(str(path))
            values = sitk.GetArrayFromImage(image)
            moved = sitk.GetImageFromArray(np.where(values == old, new, values).astype(values.dtype))
            moved.CopyInformation(image)
            case["label"] = f"cases/{case['name']}_label_ignore{new}.nrrd"
            _writeImage(moved, self.trainingDirectory / case["label"])
            stale.append(path)
        dataset["ignore"] = new
        return stale

    def _removeStale(self, dataset: dict, stale: list) -> None:
        kept = {self.trainingDirectory / c["label"] for c in dataset["cases"]}
        for path in stale:
            if path not in kept:
                path.unlink(missing_ok=True)
